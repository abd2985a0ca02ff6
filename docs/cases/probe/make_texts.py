"""The English and French sentences of the probe case (en.txt, fr.txt), from the Debian
Administrator's Handbook in both languages (the same chapters, so the topics match and only the
language differs).

    python scripts/build_corpus.py --sources debian-handbook-en,debian-handbook-fr --holdout 0 \
        --out /tmp/probe_corpus
    python docs/cases/probe/make_texts.py /tmp/probe_corpus docs/cases/probe

Sentences are split at ". " before a capital letter; kept if 40-160 characters, ending in a full
stop, without code-like characters, and clearly in their language by function-word counts (the
French handbook leaves some paragraphs untranslated). 200 per language, drawn with a fixed seed.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np

N = 200
_WORDS = {
    "en": {"the", "and", "of", "to", "is", "are", "for", "with", "that", "this", "it", "be", "on",
           "by", "from", "as", "an", "or", "can", "which", "was", "not", "have", "has"},
    "fr": {"le", "la", "les", "des", "est", "et", "une", "un", "pour", "dans", "du", "que", "qui",
           "sur", "avec", "au", "aux", "ce", "cette", "pas", "il", "sont", "par", "ou", "se", "ne",
           "plus"},
}
_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-ZÀ-Ý])")
_CODE = re.compile(r"[$/=#{}<>_`|\\\[\]@*]|\d{3,}|\.\w+\.")


def sentences(path: Path, lang: str) -> list[str]:
    other = "fr" if lang == "en" else "en"
    out, seen = [], set()
    for para in path.read_text(encoding="utf-8").split("\n"):
        for s in _SPLIT.split(para.strip()):
            s = " ".join(s.split())
            words = re.findall(r"[a-zàâçéèêëîïôûùüÿœ']+", s.lower())
            if not (40 <= len(s) <= 160 and s.endswith(".") and not s.endswith("..")
                    and not _CODE.search(s) and s[0].isupper()):
                continue
            own = sum(w in _WORDS[lang] for w in words)
            foreign = sum(w in _WORDS[other] for w in words)
            if own >= 3 and foreign == 0 and s not in seen:
                seen.add(s)
                out.append(s)
    return out


def main() -> None:
    corpus, out = Path(sys.argv[1]), Path(sys.argv[2])
    rng = np.random.default_rng(0)
    for lang in ("en", "fr"):
        pool = sentences(corpus / f"debian-handbook-{lang}.txt", lang)
        pick = sorted(rng.choice(len(pool), size=N, replace=False))
        (out / f"{lang}.txt").write_text("\n".join(pool[i] for i in pick) + "\n",
                                         encoding="utf-8")
        print(f"{lang}: {len(pool)} candidate sentences, wrote {N} to {out / f'{lang}.txt'}")


if __name__ == "__main__":
    main()

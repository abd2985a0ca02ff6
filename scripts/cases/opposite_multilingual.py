"""Case study (b): "the opposite of small" in English, French and Chinese.

Traces the three prompts, reports each model's answer, and measures how many active features
(layer, index) the languages share: overall, at the last position, and among each graph's most
influential features (Jaccard overlaps). "Circuit Tracing"/"Biology" report language-independent
features in the middle layers; a small model with a small transcoder may show few.
Default model: the embedded SmolLM2-135M (English-centred); `--model gemma3-270m` with a Gemma
transcoder is the intended setting. Usage: python scripts/cases/opposite_multilingual.py
"""

import numpy as np
from common import Study, parser

PROMPTS = {"en": 'The opposite of "small" is "', "fr": 'Le contraire de "petit" est "',
           "zh": '"小"的反义词是"'}


def _sets(graph, rows):
    last = graph.n_pos - 1
    every = set(zip(graph.feature_layer.tolist(), graph.feature_index.tolist()))
    at_last = {(int(lay), int(i)) for lay, i, p in zip(graph.feature_layer, graph.feature_index,
                                                       graph.feature_pos) if p == last}
    top = {(lay, i) for _, lay, _, i, _, _ in rows}
    return every, at_last, top


def jaccard(a, b) -> float:
    return len(a & b) / max(1, len(a | b))


def main() -> None:
    ap = parser(__doc__)
    ap.set_defaults(top=30)
    s = Study("opposite_multilingual", ap.parse_args())
    sets = {}
    for lang, prompt in PROMPTS.items():
        graph, scores, page = s.trace(prompt, f"graph_{lang}")
        s.say(f"## {lang}: {prompt!r}\n")
        s.graph_summary(graph, scores, page)
        sets[lang] = _sets(graph, s.key_features(graph))
        s.say("")
    s.say("## Shared features (Jaccard overlap of (layer, feature) sets)\n")
    s.say("| pair | all active | at the last position | top-influence |")
    s.say("|---|---|---|---|")
    langs = list(PROMPTS)
    for i, a in enumerate(langs):
        for b in langs[i + 1:]:
            o = [jaccard(x, y) for x, y in zip(sets[a], sets[b])]
            s.say(f"| {a}-{b} | {o[0]:.3f} | {o[1]:.3f} | {o[2]:.3f} |")
    common = set.intersection(*(sets[x][1] for x in langs))
    layers = sorted({lay for lay, _ in common})
    s.say(f"\nFeatures active at the last position in all three languages: {len(common)}"
          f" (layers {layers[:12]}{'...' if len(layers) > 12 else ''}); per-layer mean "
          f"{np.mean([len(sets[x][1]) for x in langs]):.0f} active there per language.")
    s.write("Case study: the opposite of small across languages")


if __name__ == "__main__":
    main()

"""Case study (a): "The capital of France is" -> " Paris" on SmolLM2-135M.

Traces the prompt, lists the features with the most influence on " Paris", zeroes them one at a
time and together (free mode) and reports how p(" Paris") moves; writes out/cases/capital_france/.
Usage: python scripts/cases/capital_france.py [--model M] [--transcoder T]
"""

from common import Study, ablation_table, parser

PROMPT = "The capital of France is"


def main() -> None:
    s = Study("capital_france", parser(__doc__).parse_args())
    graph, scores, page = s.trace(PROMPT, "graph")
    s.say(f"## {PROMPT!r}\n")
    s.graph_summary(graph, scores, page)
    rows = s.key_features(graph, " Paris")
    s.say("\nKey features (influence on ' Paris'):\n")
    s.feature_table(graph, rows)
    ablation_table(s, PROMPT, graph, rows, " Paris")
    s.say(f"\nGreedy continuation: {s.generate(PROMPT)!r}")
    s.write("Case study: the capital of France")


if __name__ == "__main__":
    main()

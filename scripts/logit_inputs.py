"""The strongest direct inputs of one logit in a saved graph, and how many are features, errors
and tokens: what the page's panel shows when the answer's logit is clicked.

    python scripts/logit_inputs.py out/demo/graph.npz " Paris" -k 10
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attribution.graph import Graph  # noqa: E402


def strongest_inputs(graph: Graph, token: str, k: int) -> list[tuple[int, float]]:
    """(node, edge weight) of the k largest |edges| into the logit of `token`."""
    if token not in graph.logit_strings:
        raise SystemExit(f"{token!r} is not a logit of this graph: {graph.logit_strings}")
    row = graph.adjacency[graph.ranges.logit.start + graph.logit_strings.index(token)]
    order = np.argsort(-np.abs(row), kind="stable")[:k]
    return [(int(n), float(row[n])) for n in order if row[n] != 0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("graph", help="A graph .npz from `cltrace trace` (or its directory).")
    ap.add_argument("token", help="The logit's token string, e.g. ' Paris'.")
    ap.add_argument("-k", type=int, default=10, help="How many inputs (default 10).")
    args = ap.parse_args()
    graph = Graph.load(args.graph)
    rows = strongest_inputs(graph, args.token, args.k)
    counts: dict[str, int] = {}
    for node, w in rows:
        kind = graph.ranges.kind_of(node)
        counts[kind] = counts.get(kind, 0) + 1
        print(f"{w:+9.3f}  {graph.label(node)}")
    print("counts: " + ", ".join(f"{n} {kind}s" for kind, n in sorted(counts.items())))
    if graph.scores is not None:
        print(f"replacement {graph.scores.replacement:.3f}, "
              f"completeness {graph.scores.completeness:.3f}")


if __name__ == "__main__":
    main()

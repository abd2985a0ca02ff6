"""The strongest paths from the input tokens to each target, for the page's "top paths" panel.

A path's strength is the product of its edges' normalised weights, each edge taken as in
influence (`attribution.influence`): |A[t, s]| / sum_s |A[t, s]|, the share of its target's whole
input (the full graph's row sum, not only the held edges'). Influence sums these products over
all paths; the panel lists the few largest terms of that sum, so a reader sees which chains of
features carry a target's input rather than a total.

The k best paths of a DAG come from one dynamic programme per target: going from the target
down, each node keeps the k best paths from itself to the target, and a node's k best are among
its out-edges times the k best of each successor (a prefix of a best path need not be best, but
an extension of a path outside a successor's top k cannot enter the top k). Nodes are processed
in levels of their height (longest distance to a sink), so each level is one vectorised step and
a node is visited only after all its successors.

Targets are the graph's logit-range nodes, whatever they are (a token's logit, a logit
difference, a direction): nothing here reads their probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Path:
    """One path: its nodes from the token to the target, the edges between them (indices into
    the edge arrays given) and the product of their normalised weights."""

    score: float
    nodes: tuple[int, ...]
    edges: tuple[int, ...]


def heights(n: int, source, target) -> np.ndarray:
    """Each node's height in the DAG of edges source -> target: 0 for nodes with no out-edge,
    else 1 + the largest height of its successors. Raises on a cycle."""
    source, target = np.asarray(source, np.int64), np.asarray(target, np.int64)
    h = np.zeros(n, np.int64)
    # Reverse Kahn: peel the sinks, then the nodes whose successors are all peeled; a node's
    # height is final when it is peeled.
    remaining = np.bincount(source, minlength=n)
    frontier = np.nonzero(remaining == 0)[0]
    seen = len(frontier)
    while len(frontier):
        into = np.zeros(n, bool)
        into[frontier] = True
        es = np.nonzero(into[target])[0]
        src = source[es]
        np.maximum.at(h, src, h[target[es]] + 1)
        np.subtract.at(remaining, src, 1)
        frontier = np.unique(src[remaining[src] == 0])
        seen += len(frontier)
    if seen < n:
        raise ValueError("the graph has a cycle: paths need an acyclic graph")
    return h


def _grouped_top(group: np.ndarray, value: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices of each group's k largest values, their rank within the group; ties in index
    order). Two stable sorts, by value then by group, which is `np.lexsort((-value, group))`;
    groups below 2^15 sort as int16, by radix (1.7x faster than the lexsort at 200k values)."""
    by_value = np.argsort(-value, kind="stable")
    g = group[by_value]
    narrow = len(g) and 0 <= g.min() and g.max() < 2**15
    by_group = np.argsort(g.astype(np.int16) if narrow else g, kind="stable")
    order, g = by_value[by_group], g[by_group]
    first = np.concatenate([[0], np.nonzero(np.diff(g))[0] + 1]) if len(g) else np.zeros(0, int)
    start = np.repeat(first, np.diff(np.concatenate([first, [len(g)]])))
    rank = np.arange(len(g)) - start
    keep = rank < k
    return order[keep], rank[keep]


def top_paths(n: int, source, target, weight, starts, ends, k: int = 5
              ) -> dict[int, list[Path]]:
    """For each node in `ends`, its k strongest paths from any node in `starts`, strongest
    first (fewer when fewer exist). Edges are source -> target with positive weights (zero
    weights are no edge); a path's score is the product of its weights."""
    source, target = np.asarray(source, np.int64), np.asarray(target, np.int64)
    weight = np.asarray(weight, np.float64)
    live = weight > 0
    source, target, weight = source[live], target[live], weight[live]
    edge_id = np.nonzero(live)[0]
    h = heights(n, source, target)
    levels = [np.nonzero(h[source] == lv)[0] for lv in range(1, int(h.max(initial=0)) + 1)]
    out: dict[int, list[Path]] = {}
    for end in (int(e) for e in ends):
        if k <= 0:
            out[end] = []
            continue
        # score[v, j]: the j-th best path v -> end; via[v, j]: its first edge; then[v, j]: the
        # rank of its remainder among the successor's paths (-1: none).
        score = np.zeros((n, k))
        via = np.full((n, k), -1, np.int64)
        then = np.full((n, k), -1, np.int64)
        score[end, 0] = 1.0
        for es in levels:
            cand = weight[es, None] * score[target[es]]  # [edges at this level, k]
            e_idx, slot = np.nonzero(cand > 0)
            if not len(e_idx):
                continue
            e = es[e_idx]
            best, rank = _grouped_top(source[e], cand[e_idx, slot], k)
            v = source[e[best]]
            score[v, rank] = cand[e_idx[best], slot[best]]
            via[v, rank] = e[best]
            then[v, rank] = slot[best]
        starts_arr = np.asarray(starts, np.int64)
        s_node, s_slot = np.nonzero(score[starts_arr] > 0)
        s_node = starts_arr[s_node]
        vals = score[s_node, s_slot]
        top = np.argsort(-vals, kind="stable")[:k]
        paths = []
        for node, j in zip(s_node[top], s_slot[top]):
            nodes, edges, sc = [int(node)], [], float(score[node, j])
            while node != end:
                e = int(via[node, j])
                edges.append(int(edge_id[e]))
                node, j = int(target[e]), int(then[node, j])
                nodes.append(node)
            paths.append(Path(sc, tuple(nodes), tuple(edges)))
        out[end] = paths
    return out


__all__ = ["Path", "heights", "top_paths"]

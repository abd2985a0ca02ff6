"""Pruning an attribution graph, and its replacement / completeness scores.

As in "Circuit Tracing" (Ameisen et al., 2025, §5.2 "graph pruning", App. "graph scores") and
circuit-tracer's `graph.py`, with the same semantics. The formulas (influence, edge scores,
scores) are in `attribution.influence`; this module applies them to a `Graph`:

* Node pruning keeps the most influential nodes until their cumulative share of the total
  influence reaches `node_threshold` (ties at the cut kept); tokens and logits are always kept.
* Edge pruning scores each surviving edge by its normalised weight times its target's influence
  (plus the target's logit weight), and keeps the top edges up to `edge_threshold` of the total
  score. Then feature and error nodes left with no outgoing kept edge, and features left with no
  incoming one, are dropped, repeatedly until nothing changes.
* Streamed graphs (`Graph.streamed`) store the most influential features only: their node
  influence and scores are the full graph's, stored at trace time, and node pruning counts the
  shares of the full graph's total influence, so results match the full graph's while the cut
  stays among the stored features (a warning says when it does not).
* Slim graphs (`attribution.slim`, what `Graph.save` writes by default) store the graph pruned at
  their trace's thresholds: pruning them at those thresholds, or looser ones (with a warning),
  gives what they store; at tighter ones, pruning runs within it.
* `score` gives the graph's scores unpruned and pruned; the tracer stores them in every graph.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from attribution.graph import Graph, Scores
from attribution.influence import (
    cumulative_share,
    edge_scores,
    graph_scores_from,
    influence,
    normalize_rows,
    row_sums,
)


def node_influence(graph: Graph, adjacency: np.ndarray | None = None) -> np.ndarray:
    """Every node's influence on the logits: the full graph's, stored, for a streamed graph
    (whose adjacency is only part of it), else computed from `adjacency` (default: the graph's)."""
    if adjacency is None and graph.streamed:
        return graph.influence.astype(np.float64)
    a = graph.adjacency if adjacency is None else adjacency
    return influence(a, graph.logit_weights())


def find_threshold(scores: np.ndarray, fraction: float, total: float | None = None) -> float:
    """The smallest score among the top scores whose cumulative share reaches `fraction` (shares
    of `total` when given: scores of items not listed, all below these, count in it)."""
    s = np.sort(np.asarray(scores, np.float64).ravel())[::-1]
    total = s.sum() if total is None else max(float(total), s.sum())
    if s.size == 0 or total <= 0:
        return 0.0
    cum = np.cumsum(s) / total
    i = min(int(np.searchsorted(cum, fraction)), s.size - 1)
    return float(s[i])


@dataclass(frozen=True)
class PruneResult:
    node_mask: np.ndarray  # [node] bool, nodes kept
    edge_mask: np.ndarray  # [node node] bool, edges kept (target, source)
    cumulative_scores: np.ndarray  # [node] cumulative influence share at each node's rank
    influence: np.ndarray  # [node] node influence in the unpruned graph

    def adjacency(self, graph: Graph) -> np.ndarray:
        """The pruned adjacency: kept edges only."""
        return np.where(self.edge_mask, graph.adjacency, 0.0).astype(graph.adjacency.dtype)


def prune(graph: Graph, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> PruneResult:
    """Keep the nodes and edges that carry most of the influence on the logits."""
    for name, v in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{name} must be between 0 and 1, got {v}")
    r = graph.ranges
    weights = graph.logit_weights()
    infl = node_influence(graph)
    total = graph.influence_total() if graph.streamed else float(infl.sum())
    full = graph.full_graph
    if full is not None and full.slim and (node_threshold >= full.pruned_node_threshold
                                           or edge_threshold >= full.pruned_edge_threshold):
        if (node_threshold, edge_threshold) != (full.pruned_node_threshold,
                                                full.pruned_edge_threshold):
            warnings.warn(
                f"this graph file holds its graph pruned at node_threshold "
                f"{full.pruned_node_threshold}, edge_threshold {full.pruned_edge_threshold}: "
                f"pruning at {node_threshold}, {edge_threshold} gives that graph; trace with "
                "--save-full to keep every node and edge", stacklevel=2)
        return _stored(graph, infl, total)
    cut = find_threshold(infl, node_threshold, total)
    if graph.streamed and graph.full_graph.features_left_out and r.feature.stop and \
            cut <= infl[r.feature].min():
        # The cut reaches the least influential feature stored: features left out of the
        # streamed graph would have been kept too.
        warnings.warn(f"node_threshold {node_threshold} reaches past the {r.feature.stop} "
                      "features this streamed graph stores: the pruned graph misses some; trace "
                      "with a larger --stream-features", stacklevel=2)
    node_mask = infl >= cut
    node_mask[r.token.start:] = True  # tokens and logits, always

    pruned = graph.adjacency.copy()
    pruned[~node_mask] = 0
    pruned[:, ~node_mask] = 0
    scores = edge_scores(pruned, influence(pruned, weights) + weights)
    nonzero = scores[scores > 0]
    edge_mask = (scores >= find_threshold(nonzero, edge_threshold)) & (pruned != 0)

    sources_end = r.token.start  # features and errors: must keep an outgoing edge
    while True:
        before = node_mask.copy()
        edge_mask[~node_mask] = False
        edge_mask[:, ~node_mask] = False
        node_mask[:sources_end] &= edge_mask[:, :sources_end].any(axis=0)
        node_mask[r.feature] &= edge_mask[r.feature].any(axis=1)
        if np.array_equal(before, node_mask):
            break

    return PruneResult(node_mask, edge_mask, cumulative_share(infl, total)[0], infl)


def _stored(graph: Graph, infl: np.ndarray, total: float) -> PruneResult:
    """A slim graph's own pruned graph: every node and edge it stores (errors with no edge
    left are not kept)."""
    r = graph.ranges
    edge_mask = graph.adjacency != 0
    node_mask = np.ones(graph.n_nodes, bool)
    node_mask[r.error] = edge_mask[:, r.error].any(axis=0)
    return PruneResult(node_mask, edge_mask, cumulative_share(infl, total)[0], infl)


def graph_scores(graph: Graph, adjacency: np.ndarray | None = None) -> tuple[float, float]:
    """(replacement score, completeness score) of the graph, or of `adjacency` over its nodes
    (a pruned adjacency, for the scores of the pruned graph). A streamed graph's own scores are
    its full graph's, computed while tracing."""
    if adjacency is None and graph.streamed:
        return graph.full_graph.replacement_score, graph.full_graph.completeness_score
    r = graph.ranges
    a = graph.adjacency if adjacency is None else adjacency
    weights = graph.logit_weights()
    return graph_scores_from(influence(a, weights), weights, row_sums(a), row_sums(a, r.error),
                             r.token, r.error)


def score(graph: Graph, node_threshold: float = 0.8, edge_threshold: float = 0.98,
          pruned: PruneResult | None = None) -> Scores:
    """The graph's scores, unpruned and pruned at these thresholds (`pruned`: that pruning,
    when already made). The tracer stores them in every graph (`Graph.scores`). Pruning's
    warnings are left to the caller's own `prune` (the pruned graph it shows)."""
    if pruned is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pruned = prune(graph, node_threshold, edge_threshold)
    rep, comp = graph_scores(graph)
    rep_p, comp_p = graph_scores(graph, pruned.adjacency(graph))
    return Scores(rep, comp, rep_p, comp_p)


__all__ = ["PruneResult", "find_threshold", "graph_scores", "influence", "node_influence",
           "normalize_rows", "prune", "score"]

"""Influence, pruning, and the replacement / completeness scores of an attribution graph.

As in "Circuit Tracing" (Ameisen et al., 2025, §5.2 "graph pruning", App. "graph scores") and
circuit-tracer's `graph.py`, with the same semantics:

* Row-normalise |A| (each target's incoming absolute weights sum to 1). A node's *influence* is
  the total weight of all paths from it to the logits in that matrix, each logit weighted by its
  probability: w @ (Â + Â² + ...), computed by iterating until the (acyclic) paths run out.
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
* Replacement score: the share of the tokens' plus errors' influence that belongs to tokens.
  Completeness score: the influence-weighted (plus logit-weighted) average over nodes of the
  share of each node's normalised input that does not come from error nodes.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from attribution.graph import Graph


def normalize_rows(adjacency: np.ndarray, clamp: float = 1e-10) -> np.ndarray:
    """|A| with each row divided by its sum (rows that sum to ~0 stay ~0)."""
    a = np.abs(adjacency)
    return a / np.maximum(a.sum(axis=1, keepdims=True), clamp)


def influence(normalized: np.ndarray, weights: np.ndarray, max_iter: int = 1000) -> np.ndarray:
    """weights @ (Â + Â² + ...): every node's total path weight into the weighted targets.

    The graph is acyclic, so the products vanish exactly after at most (longest path) steps."""
    current = weights.astype(normalized.dtype) @ normalized
    total = current.copy()
    for _ in range(max_iter):
        if not current.any():
            return total
        current = current @ normalized
        total += current
    raise RuntimeError(f"influence did not converge in {max_iter} steps: is the graph acyclic?")


def node_influence(graph: Graph, adjacency: np.ndarray | None = None) -> np.ndarray:
    """Every node's influence on the logits: the full graph's, stored, for a streamed graph
    (whose adjacency is only part of it), else computed from `adjacency` (default: the graph's)."""
    if adjacency is None and graph.streamed:
        return graph.influence.astype(np.float64)
    a = graph.adjacency if adjacency is None else adjacency
    return influence(normalize_rows(a), graph.logit_weights())


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
    cut = find_threshold(infl, node_threshold, total)
    if graph.streamed and graph.info["full_graph"]["features_left_out"] and r.feature.stop and \
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
    norm = normalize_rows(pruned)
    target_weight = influence(norm, weights) + weights
    scores = norm * target_weight[:, None].astype(norm.dtype)
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

    order = np.argsort(-infl, kind="stable")
    cum = np.cumsum(infl[order]) / max(total, 1e-30)
    cumulative = np.zeros_like(infl)
    cumulative[order] = cum
    return PruneResult(node_mask, edge_mask, cumulative, infl)


def graph_scores(graph: Graph, adjacency: np.ndarray | None = None) -> tuple[float, float]:
    """(replacement score, completeness score) of the graph, or of `adjacency` over its nodes
    (a pruned adjacency, for the scores of the pruned graph). A streamed graph's own scores are
    its full graph's, computed while tracing."""
    if adjacency is None and graph.streamed:
        full = graph.info["full_graph"]
        return float(full["replacement_score"]), float(full["completeness_score"])
    r = graph.ranges
    a = graph.adjacency if adjacency is None else adjacency
    weights = graph.logit_weights()
    norm = normalize_rows(a)
    infl = influence(norm, weights)
    token = float(infl[r.token].sum())
    error = float(infl[r.error].sum())
    replacement = token / (token + error) if token + error > 0 else 0.0
    non_error = 1.0 - norm[:, r.error].sum(axis=1)
    out_weight = infl + weights
    completeness = float((non_error * out_weight).sum() / max(out_weight.sum(), 1e-30))
    return replacement, completeness


def partial_influence(rows: np.ndarray, row_nodes: np.ndarray, logit_probs: np.ndarray,
                      logit_nodes: np.ndarray, n_nodes: int, max_iter: int = 1000,
                      chunk: int = 1024) -> np.ndarray:
    """Influence of every node computed from only the rows known so far (greedy selection of
    feature nodes under `max_feature_nodes`): rows[i] holds the incoming edges of node
    row_nodes[i] over the first rows.shape[1] nodes. Normalises chunk by chunk, never copying
    the whole row buffer."""
    sums = np.maximum(np.abs(rows).sum(axis=1), 1e-10) if len(rows) <= chunk else np.concatenate(
        [np.maximum(np.abs(rows[i:i + chunk]).sum(axis=1), 1e-10)
         for i in range(0, len(rows), chunk)])
    prod = np.zeros(n_nodes, np.float64)
    prod[logit_nodes] = logit_probs
    total = np.zeros(n_nodes, np.float64)
    for _ in range(max_iter):
        w = prod[row_nodes] / sums
        nxt = np.zeros(n_nodes, np.float64)
        for i in range(0, len(rows), chunk):
            if w[i:i + chunk].any():
                nxt[:rows.shape[1]] += w[i:i + chunk] @ np.abs(rows[i:i + chunk])
        prod = nxt
        if not prod.any():
            return total
        total += prod
    raise RuntimeError("partial influence did not converge")


__all__ = ["PruneResult", "find_threshold", "graph_scores", "influence", "node_influence",
           "normalize_rows", "partial_influence", "prune"]

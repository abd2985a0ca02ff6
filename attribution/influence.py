"""Influence on the logits, edge scores and the graph scores: each formula written once.

"Circuit Tracing" (Ameisen et al., 2025, §5.2 "graph pruning" and the appendix on graph scores),
with circuit-tracer's semantics (`graph.py`: `normalize_matrix`, `compute_influence`,
`compute_graph_scores`):

* Â is |A| with each row (a target's incoming edges) divided by its sum; rows that sum to ~0 stay
  ~0 (`CLAMP`). `spread` applies it: weights on targets -> the share each source receives.
* A node's influence is w @ (Â + Â² + ...), w the logit probabilities on the logit nodes: the
  total weight of every path from the node to the logits (`influence`, iterated until the paths of
  the acyclic graph run out). The streamed tracer folds the same `spread` one batch at a time in
  topological order, which needs one pass (`attribution.stream`).
* An edge's score is its share of the target's input times the target's influence plus its logit
  weight (`edge_scores`); pruning and the page keep the edges with the largest scores.
* Replacement score: the share of the tokens' plus errors' influence that belongs to tokens.
  Completeness score: the influence- (plus logit-) weighted mean over nodes of the share of each
  node's input that does not come from error nodes (`graph_scores_from`).

Every path (dense, greedy, streamed, pruning, the page) calls these functions.
"""

from __future__ import annotations

import numpy as np
from jaxtyping import Float

CLAMP = 1e-10  # row sums below this count as this (circuit-tracer's clamp)
_WHOLE_BYTES = 1 << 30  # |A| held in one copy up to this size, else taken chunk by chunk


def normalize_rows(adjacency: Float[np.ndarray, "target source"]
                   ) -> Float[np.ndarray, "target source"]:
    """Â: |A| with each row divided by its sum (rows that sum to ~0 stay ~0)."""
    a = np.abs(adjacency)
    return a / np.maximum(a.sum(axis=1, keepdims=True), CLAMP)


def spread(weights, abs_rows, sums=None, xp=np):
    """weights @ Â over these rows: each row's weight split among its sources in proportion to
    |A| / (the row's sum of |A|). `abs_rows` is |A| of the rows; `sums` their full sums (default:
    summed here; a stored graph may know larger sums than its stored columns hold). `xp`: numpy,
    or jax.numpy inside a traced function."""
    if sums is None:
        sums = abs_rows.sum(axis=1)
    return (weights / xp.maximum(sums, CLAMP)).astype(abs_rows.dtype) @ abs_rows


def row_sums(rows: Float[np.ndarray, "row source"], columns: slice = slice(None),
             index: np.ndarray | None = None, chunk: int = 1024) -> Float[np.ndarray, " n"]:
    """Sum of |A| of each row (over `columns`; of rows[index] only, when given), in float64,
    chunk by chunk (rows may be long)."""
    index = np.arange(len(rows)) if index is None else np.asarray(index)
    if not len(index):
        return np.zeros(0)
    return np.concatenate([np.abs(rows[index[i:i + chunk], columns]).sum(axis=1, dtype=np.float64)
                           for i in range(0, len(index), chunk)])


def influence(rows: Float[np.ndarray, "row source"], weights: Float[np.ndarray, " node"],
              row_nodes: np.ndarray | None = None, *, max_iter: int = 1000
              ) -> Float[np.ndarray, " node"]:
    """Every node's influence, weights @ (Â + Â² + ...), from the rows known: rows[i] holds the
    incoming edges of node row_nodes[i] over the first rows.shape[1] nodes (default: the square
    adjacency, row i is node i). `weights` has one entry per node (the logit probabilities on the
    logit nodes). Rows not given count as having no inputs (the greedy visit's partial graph).
    Holds |A| once when it is small, else takes it chunk by chunk, never copying all rows."""
    n = len(weights)
    row_nodes = np.arange(len(rows)) if row_nodes is None else np.asarray(row_nodes)
    width = rows.shape[1] if rows.ndim == 2 else 0
    whole = rows.nbytes <= _WHOLE_BYTES
    chunk = max(len(rows), 1) if whole else max(1, (64 << 20) // max(1, width * rows.itemsize))
    held = np.abs(rows) if whole else None
    sums = held.sum(axis=1, dtype=np.float64) if whole else row_sums(rows, chunk=chunk)
    current = np.asarray(weights, np.float64)
    total = np.zeros(n, np.float64)
    for _ in range(max_iter):
        w = current[row_nodes]
        current = np.zeros(n, np.float64)
        for i in range(0, len(rows), chunk):
            if w[i:i + chunk].any():
                a = held[i:i + chunk] if whole else np.abs(rows[i:i + chunk])
                current[:width] += spread(w[i:i + chunk], a, sums[i:i + chunk])
        if not current.any():
            return total
        total += current
    raise RuntimeError(f"influence did not converge in {max_iter} steps: is the graph acyclic?")


def edge_scores(rows: Float[np.ndarray, "row source"], target_weight: Float[np.ndarray, " row"],
                sums=None) -> Float[np.ndarray, "row source"]:
    """|A| / (row sum) x the target's weight (its influence plus its logit weight), per edge,
    in the rows' dtype. `sums`: the rows' full sums of |A| (default: summed over `rows`)."""
    s = np.abs(rows)
    if sums is None:
        sums = s.sum(axis=1)
    s /= np.maximum(sums, CLAMP)[:, None].astype(s.dtype)
    s *= np.asarray(target_weight)[:, None].astype(s.dtype)
    return s


def graph_scores_from(infl: Float[np.ndarray, " node"], weights: Float[np.ndarray, " node"],
                      input_abs: Float[np.ndarray, " node"],
                      input_error_abs: Float[np.ndarray, " node"], token: slice, error: slice
                      ) -> tuple[float, float]:
    """(replacement, completeness) from every node's influence, logit weight, sum of |incoming
    edges| and the part of it from error nodes (nodes without inputs: 0 and 0)."""
    t, e = float(infl[token].sum()), float(infl[error].sum())
    replacement = t / (t + e) if t + e > 0 else 0.0
    non_error = 1.0 - np.asarray(input_error_abs, np.float64) / np.maximum(input_abs, CLAMP)
    out = np.asarray(infl, np.float64) + weights
    return replacement, float((non_error * out).sum() / max(out.sum(), 1e-30))


def cumulative_share(infl: Float[np.ndarray, " node"], total: float | None = None
                     ) -> tuple[Float[np.ndarray, " node"], Float[np.ndarray, " node"]]:
    """(share of the total influence held by the nodes at least as influential as each node, the
    same without the node itself). `total`: the full graph's, for a streamed graph (default: the
    sum of `infl`)."""
    total = max(float(infl.sum() if total is None else total), 1e-30)
    order = np.argsort(-infl, kind="stable")
    cum = np.zeros(len(infl), np.float64)
    cum[order] = np.cumsum(infl[order] / total)
    return cum, cum - infl / total


__all__ = ["CLAMP", "cumulative_share", "edge_scores", "graph_scores_from", "influence",
           "normalize_rows", "row_sums", "spread"]

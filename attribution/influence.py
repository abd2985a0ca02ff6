"""Influence on the logits, edge scores and the graph scores: each formula written once.

"Circuit Tracing" (Ameisen et al., 2025, §5.2 "graph pruning" and the appendix on graph scores),
with circuit-tracer's semantics (`graph.py`: `normalize_matrix`, `compute_influence`,
`compute_graph_scores`):

* Â is |A| with each row (a target's incoming edges) divided by its sum; rows that sum to ~0 stay
  ~0 (`CLAMP`). `spread` applies it: weights on targets -> the share each source receives.
* A node's influence is w @ (Â + Â² + ...), w the logit probabilities on the logit nodes: the
  total weight of every path from the node to the logits (`influence`). Given each node's level
  (its layer: every edge points from a lower level to a higher one) it takes one pass over the
  rows, top level first, each row weighted by its target's influence (final by then) plus its
  logit weight; a row that breaks the order sends it back to iterating w Â^k until the paths of
  the acyclic graph run out. The streamed tracer folds the same `spread` the same way, one batch
  at a time as rows are made (`attribution.stream`).
* An edge's score is its share of the target's input times the target's influence plus its logit
  weight (`edge_scores`); pruning and the page keep the edges with the largest scores.
* `MaskedRows` is a pruned adjacency (entries zeroed by masks) read chunk by chunk, so pruning
  and the pruned graph's scores never copy the whole dense adjacency.
* Replacement score: the share of the tokens' plus errors' influence that belongs to tokens.
  Completeness score: the influence- (plus logit-) weighted mean over nodes of the share of each
  node's input that does not come from error nodes (`graph_scores_from`).

Every path (dense, greedy, streamed, pruning, the page) calls these functions.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from jaxtyping import Float

CLAMP = 1e-10  # row sums below this count as this (circuit-tracer's clamp)
_WHOLE_BYTES = 1 << 30  # |A| held in one copy up to this size, else taken chunk by chunk
# Rows taken at a time when not held whole: a chunk and its few temporaries (|A|, a mask, a
# where) sit beside the whole adjacency at the end of a trace, so they are kept small.
_CHUNK_BYTES = 16 << 20


def node_slots(n: int, nodes) -> np.ndarray:
    """[n] int: each node's row/column in a mask held over `nodes` (in their order), -1 for a
    node outside it (`block_entries`' `slot`)."""
    nodes = np.asarray(nodes)
    slot = np.full(n, -1)
    slot[nodes] = np.arange(len(nodes))
    return slot


def block_entries(block: np.ndarray, slot: np.ndarray, rows: np.ndarray, cols: np.ndarray
                  ) -> np.ndarray:
    """[len(rows), len(cols)] bool: a mask held over some nodes only (`block`, square over them;
    `slot[node]` is the node's row/column in it, -1 for a node outside), read at node ids
    `rows` x `cols`; False outside the block."""
    rs, cs = slot[rows], slot[cols]
    out = np.zeros((len(rs), len(cs)), bool)
    ok_r, ok_c = rs >= 0, cs >= 0
    out[np.ix_(ok_r, ok_c)] = block[np.ix_(rs[ok_r], cs[ok_c])]
    return out


class MaskedRows:
    """An adjacency with entries zeroed where `keep` ([row, column] bool) is False, and in rows
    and columns where `row_mask` / `col_mask` ([row] / [column] bool) are False: a pruned graph
    read without copying the whole. With `keep_nodes` (ascending node ids), `keep` covers those
    rows and columns only ([len(keep_nodes)] square; entries elsewhere are zeroed), as a pruned
    graph holds its edges (`attribution.prune.PruneResult`). Indexing (`m[rows]`,
    `m[rows, columns]`, rows a slice or an index array, columns a slice) returns a fresh array;
    `influence`, `row_sums` and pruning take it in place of an array."""

    def __init__(self, adjacency: np.ndarray, keep: np.ndarray | None = None,
                 row_mask: np.ndarray | None = None, col_mask: np.ndarray | None = None,
                 keep_nodes: np.ndarray | None = None):
        self.adjacency, self.keep, self.row_mask, self.col_mask = (adjacency, keep, row_mask,
                                                                   col_mask)
        self.shape, self.dtype, self.ndim = adjacency.shape, adjacency.dtype, adjacency.ndim
        self.itemsize, self.nbytes = adjacency.itemsize, adjacency.nbytes
        # node -> its row/column of `keep` (-1: none), under keep_nodes
        self.slot = None if keep_nodes is None else node_slots(max(self.shape), keep_nodes)

    def __len__(self) -> int:
        return len(self.adjacency)

    def __getitem__(self, key) -> np.ndarray:
        r, c = key if isinstance(key, tuple) else (key, slice(None))
        if self.keep is None:
            cond = True
        elif self.slot is None:
            cond = self.keep[r, c]
        else:  # `keep` over keep_nodes, read at these rows and columns
            cond = block_entries(self.keep, self.slot, np.arange(self.shape[0])[r],
                                 np.arange(self.shape[1])[c])
        if self.row_mask is not None:
            cond = cond & self.row_mask[r][:, None]
        if self.col_mask is not None:
            cond = cond & self.col_mask[c][None, :]
        return np.where(cond, self.adjacency[r, c], self.dtype.type(0))


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


def row_sums(rows: Float[np.ndarray, "row source"] | MaskedRows, columns: slice = slice(None),
             index: np.ndarray | None = None, chunk: int | None = None) -> Float[np.ndarray, " n"]:
    """Sum of |A| of each row (over `columns`; of rows[index] only, when given), in float64,
    `chunk` rows at a time (default `row_chunk`: rows may be long)."""
    index = np.arange(len(rows)) if index is None else np.asarray(index)
    chunk = row_chunk(rows) if chunk is None else chunk
    if not len(index):
        return np.zeros(0)
    return np.concatenate([np.abs(rows[index[i:i + chunk], columns]).sum(axis=1, dtype=np.float64)
                           for i in range(0, len(index), chunk)])


class RowSums(NamedTuple):
    """Each row's sum of |A|, over all columns and over `error_cols`, in float64, as `influence`
    takes them while it reads the rows (NaN for a row it did not read: one with no weight, or
    past a pass that fell back to iterating). `graph_scores` needs both sums of the same rows:
    filled here, the adjacency is read once instead of three times."""

    all: np.ndarray  # [rows]
    errors: np.ndarray  # [rows]
    error_cols: slice

    @classmethod
    def empty(cls, n: int, error_cols: slice) -> RowSums:
        return cls(np.full(n, np.nan), np.full(n, np.nan), error_cols)

    @classmethod
    def reuse(cls, sums: RowSums | None, n: int, error_cols: slice) -> RowSums:
        """`sums` when taken over these n rows and error columns (e.g. a pruning's,
        `PruneResult.sums`), else an empty one: `at` then sums every row it is asked for."""
        if sums is None or sums.error_cols != error_cols or len(sums.all) != n:
            return cls.empty(n, error_cols)
        return sums

    def at(self, rows, index: np.ndarray, errors: bool = True
           ) -> tuple[np.ndarray, np.ndarray | None]:
        """(sums, error sums, or None without `errors`) of rows[index] (`rows`: the rows these
        were taken from): those taken, and the others summed here (`row_sums`)."""
        index = np.asarray(index)
        total = self.all[index]
        err = self.errors[index] if errors else None
        missing = np.isnan(total)
        if missing.any():
            total[missing] = row_sums(rows, index=index[missing])
            if errors:
                err[missing] = row_sums(rows, self.error_cols, index=index[missing])
        return total, err


def row_chunk(rows) -> int:
    """Rows taken at a time: ~_CHUNK_BYTES of them."""
    width = rows.shape[1] if rows.ndim == 2 else 0
    return max(1, _CHUNK_BYTES // max(1, width * rows.itemsize))


def _by_level(rows, weights: np.ndarray, row_nodes: np.ndarray, levels: np.ndarray,
              sums: RowSums | None = None) -> np.ndarray | None:
    """`influence` in one pass (module docstring): row groups by level, top level first, each
    row weighted by its target's weight plus its influence, final by then since every row that
    feeds it is at a higher level. None when a row sends weight to a node at its own level or
    above (the levels do not order the graph). `sums`: the rows read get theirs there."""
    width = rows.shape[1]
    row_level = np.asarray(levels)[row_nodes]
    col_level = np.asarray(levels)[:width]
    total = np.zeros(len(weights), np.float64)
    chunk = row_chunk(rows)
    for level in np.unique(row_level)[::-1]:
        idx = np.nonzero(row_level == level)[0]
        up = col_level >= level
        x_all = weights[row_nodes[idx]] + total[row_nodes[idx]]
        idx, x_all = idx[x_all != 0], x_all[x_all != 0]  # rows with no weight give nothing
        for i in range(0, len(idx), chunk):
            c, x = idx[i:i + chunk], x_all[i:i + chunk]
            contiguous = c[-1] - c[0] + 1 == len(c)
            a = np.abs(rows[c[0]:c[-1] + 1] if contiguous else rows[c])
            whole = a.sum(axis=1, dtype=np.float64)
            if sums is not None:
                sums.all[c] = whole
                sums.errors[c] = a[:, sums.error_cols].sum(axis=1, dtype=np.float64)
            part = spread(x, a, whole)
            if part[up].any():
                return None
            total[:width] += part
    return total


def influence(rows: Float[np.ndarray, "row source"] | MaskedRows, weights: Float[np.ndarray, " node"],
              row_nodes: np.ndarray | None = None, *, levels: np.ndarray | None = None,
              max_iter: int = 1000, sums: RowSums | None = None) -> Float[np.ndarray, " node"]:
    """Every node's influence, weights @ (Â + Â² + ...), from the rows known: rows[i] holds the
    incoming edges of node row_nodes[i] over the first rows.shape[1] nodes (default: the square
    adjacency, row i is node i). `rows` may be a `MaskedRows`. `weights` has one entry per node
    (the logit probabilities on the logit nodes). Rows not given count as having no inputs (the
    greedy visit's partial graph). With `levels` (each node's level, e.g.
    `attribution.graph.node_levels`) it takes one pass, when they order the graph; else (or
    without them) it iterates, holding |A| once when it is small, else taking it chunk by chunk,
    never copying all rows. `sums` (`RowSums`, one entry per row), when given, gets the |A| sums
    of the rows the one pass reads."""
    n = len(weights)
    row_nodes = np.arange(len(rows)) if row_nodes is None else np.asarray(row_nodes)
    weights = np.asarray(weights, np.float64)
    if levels is not None and len(rows) and rows.ndim == 2:
        total = _by_level(rows, weights, row_nodes, levels, sums)
        if total is not None:
            return total
    width = rows.shape[1] if rows.ndim == 2 else 0
    whole = rows.nbytes <= _WHOLE_BYTES
    chunk = max(len(rows), 1) if whole else row_chunk(rows)
    held = np.abs(rows[:len(rows)]) if whole else None
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


__all__ = ["CLAMP", "MaskedRows", "RowSums", "block_entries", "cumulative_share", "edge_scores",
           "graph_scores_from", "influence", "node_slots", "normalize_rows", "row_chunk",
           "row_sums", "spread"]

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
    MaskedRows,
    RowSums,
    block_entries,
    cumulative_share,
    edge_scores,
    graph_scores_from,
    influence,
    node_slots,
    normalize_rows,
    row_chunk,
)


def node_influence(graph: Graph, adjacency: np.ndarray | None = None,
                   sums: RowSums | None = None) -> np.ndarray:
    """Every node's influence on the logits: the full graph's, stored, for a streamed graph
    (whose adjacency is only part of it), else computed from `adjacency` (default: the graph's;
    `sums`: its rows' |A| sums, filled on the way, `influence`)."""
    if adjacency is None and graph.streamed:
        return graph.influence.astype(np.float64)
    a = graph.adjacency if adjacency is None else adjacency
    return influence(a, graph.logit_weights(), levels=graph.node_levels(), sums=sums)


_BUCKET_SHIFT = 16  # float32 scores bucketed by their top 16 bits: sign, exponent, 7 of mantissa


def kept_edges(rows, target_weight: np.ndarray, fraction: float,
               among: np.ndarray | None = None) -> np.ndarray:
    """[row, column] bool: the nonzero entries of `rows` (an array or a `MaskedRows`) whose edge
    score (`edge_scores` with each row's `target_weight`) is at least `find_threshold` of all
    the positive scores at `fraction`. With `among` (sorted node ids holding every nonzero row
    and column of `rows`, e.g. the nodes a pruning keeps), the mask covers those rows and
    columns only: [len(among), len(among)], a full graph's N x N never made (fresh large arrays
    get 2 MB pages, so even a sparsely written N x N mask is resident nearly whole). Two passes
    over row chunks, never holding every score:
    the first sums the scores per bucket of float32 values (ordered as their bits), which names
    the bucket holding the threshold; the second keeps the edges of higher buckets and collects
    that bucket's scores, whose sorted cumulative share (after the higher buckets' mass) gives
    the threshold. Scores below it lie in lower buckets."""
    chunk = max(1, row_chunk(rows) // 4)  # a score's float32, bucket and float64 copies
    weight = np.asarray(target_weight)
    n_rows, n_cols = rows.shape
    if among is not None and n_rows != n_cols:
        raise ValueError("kept_edges(among=...) takes a square adjacency")
    at = np.arange(max(n_rows, n_cols)) if among is None else np.asarray(among)
    slot = node_slots(max(n_rows, n_cols), at)  # row/column -> mask index (-1: not in the mask)
    live = np.nonzero(weight > 0)[0]  # rows whose target has no weight score 0 throughout
    live = live[slot[live] >= 0]  # (rows outside `among` hold no edge)
    parts = [live[i:i + chunk] for i in range(0, len(live), chunk)]

    def scored(c):
        return edge_scores(rows[c[0]:c[-1] + 1] if c[-1] - c[0] + 1 == len(c) else rows[c],
                           weight[c])

    n_buckets = 1 << (32 - _BUCKET_SHIFT)
    mass = np.zeros(n_buckets, np.float64)
    for c in parts:
        pos = scored(c)
        pos = pos[pos > 0]
        mass += np.bincount(pos.astype(np.float32).view(np.uint32) >> _BUCKET_SHIFT,
                            weights=pos, minlength=n_buckets)
    total = mass.sum()
    mask = np.zeros(rows.shape if among is None else (len(at), len(at)), bool)

    outside = None if among is None else slot[:n_cols] < 0

    def put(r, m, nonzero):  # rows r's [len(r), n_cols] mask into the (maybe smaller) mask
        if among is None:
            mask[r] = m
            return
        if nonzero[:, outside].any():
            raise ValueError("kept_edges: an edge to a column outside `among`")
        mask[slot[r]] = m[:, at]

    if total <= 0:  # no positive score: the threshold is 0, every edge scoring 0 is kept
        for i in range(0, n_rows, chunk):
            r = np.arange(i, min(i + chunk, n_rows))
            r = r if among is None else r[slot[r] >= 0]
            nonzero = rows[r] != 0
            put(r, nonzero & (weight[r, None] >= 0), nonzero)
        return mask
    at_least = np.cumsum(mass[::-1])[::-1]  # mass of each bucket and those above it
    reached = np.nonzero((at_least / total >= fraction) & (mass > 0))[0]
    b = int(reached.max()) if reached.size else int(np.nonzero(mass)[0].min())
    where, values = [], []
    for c in parts:
        s = scored(c)
        bucket = s.astype(np.float32).view(np.uint32) >> _BUCKET_SHIFT
        positive = s > 0
        put(c, (bucket > b) & positive, positive)
        i, j = np.nonzero((bucket == b) & positive)
        where.append((slot[c[i]], slot[j]))
        values.append(s[i, j])
    values = np.concatenate(values)
    above = float(at_least[b + 1]) if b + 1 < n_buckets else 0.0
    mask[tuple(np.concatenate(w) for w in zip(*where))] = values >= find_threshold(
        values, fraction, total, above)
    return mask


def find_threshold(scores: np.ndarray, fraction: float, total: float | None = None,
                   above: float = 0.0) -> float:
    """The smallest score among the top scores whose cumulative share reaches `fraction` (shares
    of `total` when given: scores of items not listed, all below these, count in it; `above`:
    the sum of scores not listed that are all above these)."""
    s = np.sort(np.asarray(scores, np.float64).ravel())[::-1]
    total = s.sum() if total is None else max(float(total), s.sum())
    if s.size == 0 or total <= 0:
        return 0.0
    cum = (above + np.cumsum(s)) / total
    i = min(int(np.searchsorted(cum, fraction)), s.size - 1)
    return float(s[i])


@dataclass(frozen=True)
class PruneResult:
    """The nodes and edges a pruning keeps. Every kept edge joins two kept nodes, so the edges
    are held among those only (`edge_block`): a full graph's [node, node] mask would be N^2
    bytes, nearly all resident (fresh large arrays get 2 MB pages)."""

    node_mask: np.ndarray  # [node] bool, nodes kept
    edge_block: np.ndarray  # [kept, kept] bool, edges kept (target, source) among `kept_nodes`
    cumulative_scores: np.ndarray  # [node] cumulative influence share at each node's rank
    influence: np.ndarray  # [node] node influence in the unpruned graph
    # The unpruned adjacency's row sums, taken with `influence` (for `score`; None: not taken)
    sums: RowSums | None = None

    @property
    def kept_nodes(self) -> np.ndarray:
        """The kept nodes' ids, ascending: the rows and columns of `edge_block`."""
        return np.nonzero(self.node_mask)[0]

    @property
    def n_edges(self) -> int:
        return int(np.count_nonzero(self.edge_block))

    def edges(self) -> tuple[np.ndarray, np.ndarray]:
        """(target ids, source ids) of the kept edges, row by row."""
        t, s = np.nonzero(self.edge_block)
        kept = self.kept_nodes
        return kept[t], kept[s]

    def edges_among(self, nodes: np.ndarray) -> np.ndarray:
        """[len(nodes), len(nodes)] bool: the kept edges among `nodes` (target, source)."""
        slot = node_slots(len(self.node_mask), self.kept_nodes)
        nodes = np.asarray(nodes)
        return block_entries(self.edge_block, slot, nodes, nodes)

    @property
    def edge_mask(self) -> np.ndarray:
        """[node, node] bool, the kept edges (target, source), made whole: N^2 bytes."""
        return self.edges_among(np.arange(len(self.node_mask)))

    def masked(self, adjacency: np.ndarray) -> MaskedRows:
        """`adjacency` with every edge not kept zeroed, read chunk by chunk (no copy)."""
        return MaskedRows(adjacency, keep=self.edge_block, keep_nodes=self.kept_nodes)

    def adjacency(self, graph: Graph) -> np.ndarray:
        """The pruned adjacency: kept edges only (a whole [node, node] copy)."""
        return self.masked(graph.adjacency)[:]


def prune(graph: Graph, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> PruneResult:
    """Keep the nodes and edges that carry most of the influence on the logits."""
    for name, v in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{name} must be between 0 and 1, got {v}")
    r = graph.ranges
    weights = graph.logit_weights()
    sums = None if graph.streamed else RowSums.empty(graph.n_nodes, r.error)
    infl = node_influence(graph, sums=sums)
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

    # The graph with the nodes dropped (their rows and columns zeroed), read chunk by chunk;
    # every edge left lies among the nodes kept, so the edge mask is made over those only.
    kept = MaskedRows(graph.adjacency, row_mask=node_mask, col_mask=node_mask)
    nodes = np.nonzero(node_mask)[0]
    block = kept_edges(kept, influence(kept, weights, levels=graph.node_levels()) + weights,
                       edge_threshold, among=nodes)

    # Then drop sources (features, errors) left with no outgoing edge and features left with no
    # incoming one, until nothing changes.
    alive = np.ones(len(nodes), bool)
    source, feature = nodes < r.token.start, nodes < r.feature.stop
    while True:
        before = alive.copy()
        block[~alive] = False
        block[:, ~alive] = False
        alive &= ~source | block.any(axis=0)
        alive &= ~feature | block.any(axis=1)
        if np.array_equal(before, alive):
            break
    node_mask[nodes] = alive
    return PruneResult(node_mask, block[np.ix_(alive, alive)], cumulative_share(infl, total)[0],
                       infl, sums)


def _stored(graph: Graph, infl: np.ndarray, total: float) -> PruneResult:
    """A slim graph's own pruned graph: every node and edge it stores (errors with no edge
    left are not kept)."""
    r = graph.ranges
    edge_mask = graph.adjacency != 0
    node_mask = np.ones(graph.n_nodes, bool)
    node_mask[r.error] = edge_mask[:, r.error].any(axis=0)
    kept = np.nonzero(node_mask)[0]
    return PruneResult(node_mask, edge_mask[np.ix_(kept, kept)],
                       cumulative_share(infl, total)[0], infl)


def graph_scores(graph: Graph, adjacency=None, infl: np.ndarray | None = None,
                 sums: RowSums | None = None) -> tuple[float, float]:
    """(replacement score, completeness score) of the graph, or of `adjacency` over its nodes
    (a pruned adjacency, an array or a `MaskedRows`, for the scores of the pruned graph).
    `infl`: its nodes' influence, when already known, and `sums` its rows' |A| sums taken with
    it (`influence`), when known: rows without theirs are summed here. A streamed graph's own
    scores are its full graph's, computed while tracing."""
    if adjacency is None and graph.streamed:
        return graph.full_graph.replacement_score, graph.full_graph.completeness_score
    r = graph.ranges
    a = graph.adjacency if adjacency is None else adjacency
    weights = graph.logit_weights()
    sums = RowSums.reuse(sums, len(a), r.error)
    if infl is None:
        infl = influence(a, weights, levels=graph.node_levels(), sums=sums)
    # Input sums weigh in as (influence + weight): rows without either need none.
    live = np.nonzero(np.asarray(infl) + weights)[0]
    total, err_sums = np.zeros(graph.n_nodes), np.zeros(graph.n_nodes)
    total[live], err_sums[live] = sums.at(a, live)
    return graph_scores_from(infl, weights, total, err_sums, r.token, r.error)


def score(graph: Graph, node_threshold: float = 0.8, edge_threshold: float = 0.98,
          pruned: PruneResult | None = None) -> Scores:
    """The graph's scores, unpruned and pruned at these thresholds (`pruned`: that pruning,
    when already made). The tracer stores them in every graph (`Graph.scores`). Pruning's
    warnings are left to the caller's own `prune` (the pruned graph it shows)."""
    if pruned is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pruned = prune(graph, node_threshold, edge_threshold)
    rep, comp = graph_scores(graph, infl=None if graph.streamed else pruned.influence,
                             sums=pruned.sums)
    rep_p, comp_p = graph_scores(graph, pruned.masked(graph.adjacency))
    return Scores(rep, comp, rep_p, comp_p)


__all__ = ["PruneResult", "find_threshold", "graph_scores", "influence", "kept_edges",
           "node_influence",
           "normalize_rows", "prune", "score"]

"""Pruning and scores on a hand-built 12-node graph, influence computed by hand; the chunked,
one-pass pruning against the copy-and-sort one it replaced on random trace-shaped graphs."""

from __future__ import annotations

import numpy as np
import pytest

from attribution import influence as influence_module
from attribution.graph import Graph
from attribution.influence import MaskedRows, edge_scores
from attribution.prune import find_threshold, graph_scores, influence, kept_edges, prune, score


def hand_graph() -> Graph:
    """Nodes: features f0..f5 (0-5), errors e0, e1 (6-7), tokens t0, t1 (8-9), logits l0, l1
    (10-11), p(l0) = 0.75, p(l1) = 0.25. Rows are targets. Every row's |weights| sum to 1 or 2,
    so that the normalised matrix is easy to write down.

        l0 <- f4 (0.5), f5 (0.25), e1 (0.25)             l1 <- f4 (-1)
        f4 <- f2 (1), f3 (-1)        (normalised 0.5 each)
        f5 <- f3 (0.5), t1 (0.5)
        f2 <- f0 (0.5), e0 (0.5)     f3 <- f1 (1)          f0 <- t0 (1)
        f1 <- t1 (0.25), e0 (0.75)
    """
    A = np.zeros((12, 12), np.float32)
    A[10, [4, 5, 7]] = [0.5, 0.25, 0.25]
    A[11, 4] = -1.0
    A[4, [2, 3]] = [1.0, -1.0]
    A[5, [3, 9]] = [0.5, 0.5]
    A[2, [0, 6]] = [0.5, 0.5]
    A[3, 1] = 1.0
    A[0, 8] = 1.0
    A[1, [9, 6]] = [0.25, 0.75]
    return Graph(
        tokens=np.array([1, 7], np.int32), token_strings=["<bos>", "a"],
        feature_layer=np.array([0, 0, 1, 1, 2, 2], np.int32),
        feature_pos=np.array([0, 1, 1, 1, 1, 1], np.int32),
        feature_index=np.arange(6, dtype=np.int32), activation=np.ones(6, np.float32),
        error_layer=np.array([0, 2], np.int32), error_pos=np.array([1, 1], np.int32),
        logit_tokens=np.array([3, 4], np.int32), logit_strings=["x", "y"],
        logit_probs=np.array([0.75, 0.25], np.float32), adjacency=A, n_layers=3, bos=True)


# Influence by hand: w = (l0: 0.75, l1: 0.25). Paths (products of normalised weights):
#   f4: 0.75*0.5 + 0.25*1            = 0.625
#   f5: 0.75*0.25                    = 0.1875
#   e1: 0.75*0.25                    = 0.1875
#   f2: 0.625*0.5                    = 0.3125
#   f3: 0.625*0.5 + 0.1875*0.5       = 0.40625
#   t1: 0.1875*0.5 + f1 * 0.25       (f1 = f3*1 = 0.40625) = 0.09375 + 0.1015625 = 0.1953125
#   f0: f2*0.5 = 0.15625;  e0: f2*0.5 + f1*0.75 = 0.15625 + 0.3046875 = 0.4609375
#   t0: f0*1 = 0.15625;    logits: 0
HAND = np.array([0.15625, 0.40625, 0.3125, 0.40625, 0.625, 0.1875,
                 0.4609375, 0.1875, 0.15625, 0.1953125, 0.0, 0.0])


def test_influence_by_hand(monkeypatch):
    g = hand_graph()
    infl = influence(g.adjacency.astype(np.float64), g.logit_weights())
    np.testing.assert_allclose(infl, HAND, rtol=1e-6)
    # The same from rows only (greedy selection), logit rows given first.
    order = np.array([10, 11, 0, 1, 2, 3, 4, 5])
    part = influence(g.adjacency[order], g.logit_weights(), order)
    np.testing.assert_allclose(part, HAND, rtol=1e-6)
    # Chunk by chunk (rows too large to hold |A| once): the same numbers.
    monkeypatch.setattr(influence_module, "_WHOLE_BYTES", 0)
    np.testing.assert_allclose(influence(g.adjacency[order], g.logit_weights(), order), HAND,
                               rtol=1e-6)


def test_find_threshold():
    s = np.array([4.0, 3.0, 2.0, 1.0])  # cumulative shares 0.4, 0.7, 0.9, 1.0
    assert find_threshold(s, 0.5) == 3.0
    assert find_threshold(s, 0.7) == 3.0
    assert find_threshold(s, 0.71) == 2.0
    assert find_threshold(s, 1.0) == 1.0


def test_prune_by_hand():
    g = hand_graph()
    A = g.adjacency
    # Sorted influences: f4 .625, e0 .461, f1 .406, f3 .406, f2 .3125, t1 .195, f5 .1875,
    # e1 .1875, f0 .156, t0 .156 (total 3.1015625). Cumulative share after 7 values is 0.788,
    # after 8 it is 0.849: the 80% cut is at 0.1875, so f0 (and t0, a token: kept) fall below.
    res = prune(g, node_threshold=0.8, edge_threshold=0.98)
    np.testing.assert_allclose(res.influence, HAND, rtol=1e-6)
    no_f0 = np.ones(12, bool)
    no_f0[0] = False
    np.testing.assert_array_equal(res.node_mask, no_f0)
    # Without f0, f2's row is e0 alone (normalised 1) and the influences become: f4 .625,
    # f5 .1875, e1 .1875, f2 .3125, f3 .40625, f1 .40625, e0 .6171875, t1 .1953125, t0 0.
    # Edge scores = normalised weight x (target influence + logit weight):
    #   l0<-f4 .375, l0<-f5 .1875, l0<-e1 .1875, l1<-f4 .25, f4<-f2 .3125, f4<-f3 .3125,
    #   f5<-f3 .09375, f5<-t1 .09375, f2<-e0 .3125, f3<-f1 .40625, f1<-t1 .1015625,
    #   f1<-e0 .3046875; total 2.9375. Sorted: .40625 .375 .3125 .3125 .3125 .3046875 .25 .1875
    #   .1875 .1015625 .09375 .09375, cumulative shares .138 .266 .372 .479 .585 .689 .774 .838
    #   .9016 .936 .968 1.0. At 98% the cut is the smallest score, 0.09375: every edge among
    #   the kept nodes stays.
    np.testing.assert_array_equal(res.edge_mask, (A != 0) & no_f0[:, None] & no_f0[None, :])
    # At 90% the cut is 0.1875 (the 9th score, share .9016): f5's two inputs and t1->f1 go; f5
    # has no incoming edge left and is dropped, and with it its edge into l0.
    res = prune(g, node_threshold=0.8, edge_threshold=0.9)
    keep = no_f0.copy()
    keep[5] = False
    np.testing.assert_array_equal(res.node_mask, keep)
    want = (A != 0) & keep[:, None] & keep[None, :]
    want[1, 9] = False
    np.testing.assert_array_equal(res.edge_mask, want)
    # Cumulative scores: the top node (f4) has share 0.625 / total; the last, 1.
    assert res.cumulative_scores[4] == pytest.approx(0.625 / HAND.sum(), rel=1e-6)
    assert res.cumulative_scores.max() == pytest.approx(1.0)
    # Tokens and logits always stay, even at a tiny node threshold.
    tiny = prune(g, node_threshold=0.1, edge_threshold=0.98)
    assert tiny.node_mask[8:].all()


def test_scores_by_hand():
    g = hand_graph()
    rep, comp = graph_scores(g)
    # Replacement: token influence / (token + error influence).
    tok, err = HAND[8] + HAND[9], HAND[6] + HAND[7]
    assert rep == pytest.approx(tok / (tok + err), rel=1e-6)
    # Completeness: rows' non-error share (f1: 0.25, f2: 0.5, l0: 0.75, the rest 1), weighted
    # by influence + logit weight.
    non_error = np.ones(12)
    non_error[[1, 2, 10]] = [0.25, 0.5, 0.75]
    w = HAND + np.array([0] * 10 + [0.75, 0.25])
    assert comp == pytest.approx((non_error * w).sum() / w.sum(), rel=1e-6)
    # A graph with no error nodes in use is complete.
    no_err = hand_graph()
    no_err.adjacency[:, 6:8] = 0
    assert graph_scores(no_err) == (pytest.approx(1.0), pytest.approx(1.0))


def test_thresholds_validated():
    with pytest.raises(ValueError, match="node_threshold"):
        prune(hand_graph(), node_threshold=1.5)


def _old_prune_edges(A: np.ndarray, node_mask: np.ndarray, weights: np.ndarray,
                     fraction: float) -> np.ndarray:
    """The edge mask as pruning made it before `kept_edges`: the node-pruned adjacency copied
    whole, every edge score held, all positive scores sorted (`find_threshold`)."""
    pruned = A.copy()
    pruned[~node_mask] = 0
    pruned[:, ~node_mask] = 0
    scores = edge_scores(pruned, influence(pruned, weights) + weights)
    return (scores >= find_threshold(scores[scores > 0], fraction)) & (pruned != 0)


def layered_graph(seed: int, n_layers: int = 5, per_layer: int = 40, T: int = 6,
                  n_logit: int = 3, dtype=np.float32) -> Graph:
    """A random graph shaped like a trace's: features at layer l take edges from features and
    errors of lower layers and from tokens; logits from everything but logits; about half the
    allowed entries nonzero, with magnitudes over several decades (many bucket boundaries)."""
    rng = np.random.default_rng(seed)
    f_layer = np.repeat(np.arange(n_layers), per_layer).astype(np.int32)
    e_layer = np.repeat(np.arange(n_layers), T - 1).astype(np.int32)
    levels = np.concatenate([f_layer, e_layer, np.full(T, -1), np.full(n_logit, n_layers)])
    N = len(levels)
    allowed = levels[:, None] > levels[None, :]
    allowed[len(f_layer):len(f_layer) + len(e_layer) + T] = False  # errors, tokens: no inputs
    A = (rng.standard_normal((N, N)) * 10.0 ** rng.uniform(-4, 1, (N, N))).astype(dtype)
    A *= allowed & (rng.random((N, N)) < 0.5)
    probs = rng.dirichlet(np.ones(n_logit)).astype(np.float32)
    nf = len(f_layer)
    return Graph(
        tokens=np.arange(T, dtype=np.int32), token_strings=[str(i) for i in range(T)],
        feature_layer=f_layer, feature_pos=rng.integers(0, T, nf).astype(np.int32),
        feature_index=np.arange(nf, dtype=np.int32), activation=np.ones(nf, np.float32),
        error_layer=e_layer, error_pos=np.tile(np.arange(1, T), n_layers).astype(np.int32),
        logit_tokens=np.arange(n_logit, dtype=np.int32), logit_strings=["a", "b", "c"][:n_logit],
        logit_probs=probs, adjacency=A, n_layers=n_layers, bos=True)


@pytest.mark.parametrize("seed", [0, 1])
def test_influence_one_pass_equals_iteration(seed, monkeypatch):
    """Influence by levels (one pass) = the iterated series, on the whole graph, on masked rows
    and on a partial graph's rows; a graph the levels do not order (an edge within a layer)
    falls back to iterating, same numbers."""
    g = layered_graph(seed, dtype=np.float64)
    w, lv = g.logit_weights(), g.node_levels()
    want = influence(g.adjacency, w)
    np.testing.assert_allclose(influence(g.adjacency, w, levels=lv), want, rtol=1e-10)
    monkeypatch.setattr(influence_module, "_CHUNK_BYTES", 8 * 37 * g.n_nodes)  # ragged chunks
    np.testing.assert_allclose(influence(g.adjacency, w, levels=lv), want, rtol=1e-10)
    keep = np.random.default_rng(seed).random(g.n_nodes) < 0.7
    masked = MaskedRows(g.adjacency, row_mask=keep, col_mask=keep)
    copy = g.adjacency * keep[:, None] * keep[None, :]
    np.testing.assert_array_equal(masked[3:50], copy[3:50])
    np.testing.assert_array_equal(masked[np.array([5, 2, 9]), 4:30], copy[[5, 2, 9], 4:30])
    np.testing.assert_allclose(influence(masked, w, levels=lv), influence(copy, w), rtol=1e-10)
    # Rows of some nodes only, in shuffled order (the greedy visit's partial graph).
    r = g.ranges
    order = np.random.default_rng(seed).permutation(np.r_[r.logit, 0:r.feature.stop:2])
    np.testing.assert_allclose(influence(g.adjacency[order], w, order, levels=lv),
                               influence(g.adjacency[order], w, order), rtol=1e-10)
    # An edge inside layer 2: the one pass would miss its paths; iterating does not.
    bad = g.adjacency.copy()
    f2 = np.nonzero(g.feature_layer == 2)[0]
    bad[f2[1], f2[0]] = 5.0
    np.testing.assert_allclose(influence(bad, w, levels=lv), influence(bad, w), rtol=1e-10)
    assert not np.allclose(influence(bad, w), want)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("fraction", [0.0, 0.5, 0.9, 0.98, 0.999, 1.0])
def test_kept_edges_equals_sorting_every_score(fraction, dtype, monkeypatch):
    """kept_edges (bucketed, chunk by chunk) keeps exactly the edges that sorting every score
    keeps, over several chunks; prune's edge mask is the old copy-based one."""
    monkeypatch.setattr(influence_module, "_CHUNK_BYTES", 4 * 23 * 300)
    for seed in range(3):
        g = layered_graph(seed, dtype=dtype)
        w = g.logit_weights()
        node_mask = np.random.default_rng(seed).random(g.n_nodes) < 0.6
        node_mask[g.ranges.token.start:] = True
        want = _old_prune_edges(g.adjacency, node_mask, w, fraction)
        kept = MaskedRows(g.adjacency, row_mask=node_mask, col_mask=node_mask)
        got = kept_edges(kept, influence(kept, w, levels=g.node_levels()) + w, fraction)
        assert (got != want).sum() == 0, (seed, (got != want).sum(), want.sum())
    # No positive score (every target weight 0): every edge kept, as find_threshold's 0 does.
    np.testing.assert_array_equal(kept_edges(g.adjacency, np.zeros(g.n_nodes), 0.5),
                                  g.adjacency != 0)


def test_prune_equals_copying_prune():
    """prune (masked rows, one-pass influence, bucketed threshold) = the copy-based pruning it
    replaced, on random trace-shaped graphs; the pruned scores match the copied adjacency's."""
    for seed in range(3):
        g = layered_graph(seed)
        res = prune(g, 0.8, 0.98)
        infl = influence(g.adjacency, g.logit_weights())  # float32 rows: rounding differs
        np.testing.assert_allclose(res.influence, infl, rtol=1e-6)
        node_mask = res.influence >= find_threshold(res.influence, 0.8)
        node_mask[g.ranges.token.start:] = True
        edge_mask = _old_prune_edges(g.adjacency, node_mask, g.logit_weights(), 0.98)
        edge_mask[~res.node_mask] = False  # what the consistency loop then drops
        edge_mask[:, ~res.node_mask] = False
        np.testing.assert_array_equal(res.edge_mask, edge_mask)
        s = score(g, 0.8, 0.98, res)
        np.testing.assert_allclose([s.pruned_replacement, s.pruned_completeness],
                                   graph_scores(g, res.adjacency(g)), rtol=1e-9)


@pytest.mark.parametrize("fraction", [0.0, 0.9, 0.98])
def test_edges_held_among_kept_nodes(fraction, monkeypatch):
    """kept_edges(among=nodes) is the whole mask's block over those nodes (over several chunks,
    the threshold's bucket included), and a pruning's edges read through `edge_block` (edges,
    n_edges, edges_among, masked rows) are those of its whole [node, node] mask."""
    monkeypatch.setattr(influence_module, "_CHUNK_BYTES", 4 * 23 * 300)
    for seed in range(3):
        g = layered_graph(seed)
        w = g.logit_weights()
        node_mask = np.random.default_rng(seed).random(g.n_nodes) < 0.6
        node_mask[g.ranges.token.start:] = True
        nodes = np.nonzero(node_mask)[0]
        kept = MaskedRows(g.adjacency, row_mask=node_mask, col_mask=node_mask)
        target = influence(kept, w, levels=g.node_levels()) + w
        whole = kept_edges(kept, target, fraction)
        np.testing.assert_array_equal(kept_edges(kept, target, fraction, among=nodes),
                                      whole[np.ix_(nodes, nodes)])
        assert not whole[~node_mask].any() and not whole[:, ~node_mask].any()
        with pytest.raises(ValueError, match="outside"):  # an edge the nodes given do not hold
            kept_edges(g.adjacency, target, fraction, among=nodes)
        res = prune(g, 0.8, fraction)
        mask = res.edge_mask
        t, s = res.edges()
        np.testing.assert_array_equal(np.stack([t, s]), np.stack(np.nonzero(mask)))
        assert res.n_edges == mask.sum() and (res.n_edges > 0) == (fraction > 0)
        some = np.sort(np.random.default_rng(seed).choice(g.n_nodes, 40, replace=False))
        np.testing.assert_array_equal(res.edges_among(some), mask[np.ix_(some, some)])
        m = res.masked(g.adjacency)
        np.testing.assert_array_equal(m[:], np.where(mask, g.adjacency, 0))
        np.testing.assert_array_equal(m[np.array([7, 3, 40]), 5:60],
                                      np.where(mask, g.adjacency, 0)[[7, 3, 40], 5:60])


@pytest.mark.parametrize("seed", [0, 1])
def test_row_sums_taken_with_influence_are_the_rows_sums(seed, monkeypatch):
    """The |A| sums `influence` fills while reading rows (`RowSums`) equal a naive per-row
    float64 sum (over several chunks, masked rows too), NaN only where no row was read; and the
    scores made from them (prune -> score, and graph_scores of a masked adjacency) equal the
    scores summed afresh (`graph_scores` given the influence without sums)."""
    from attribution.influence import RowSums

    monkeypatch.setattr(influence_module, "_CHUNK_BYTES", 4 * 29 * 300)
    g = layered_graph(seed)
    r, w, lv = g.ranges, g.logit_weights(), g.node_levels()
    keep = np.random.default_rng(seed).random(g.n_nodes) < 0.7
    keep[r.token.start:] = True
    for rows, dense in [(g.adjacency, g.adjacency),
                        (MaskedRows(g.adjacency, row_mask=keep, col_mask=keep),
                         g.adjacency * keep[:, None] * keep[None, :])]:
        sums = RowSums.empty(g.n_nodes, r.error)
        infl = influence(rows, w, levels=lv, sums=sums)
        read = ~np.isnan(sums.all)
        live = (infl + w) != 0
        assert read[live].all() and read.sum() < g.n_nodes  # rows with no weight: not read
        for i in np.nonzero(read)[0]:
            a = np.abs(dense[i].astype(np.float64))
            assert sums.all[i] == pytest.approx(a.sum(), rel=1e-12, abs=1e-300)
            assert sums.errors[i] == pytest.approx(a[r.error].sum(), rel=1e-12, abs=1e-300)
        np.testing.assert_allclose(graph_scores(g, rows), graph_scores(g, rows, infl=infl),
                                   rtol=1e-12)
        # `at`: the rows read as taken, the others summed then; error sums on request.
        every = np.random.default_rng(seed).permutation(g.n_nodes)
        total, err = sums.at(rows, every)
        np.testing.assert_allclose(total, np.abs(dense[every].astype(np.float64)).sum(axis=1),
                                   rtol=1e-12)
        np.testing.assert_allclose(
            err, np.abs(dense[every][:, r.error].astype(np.float64)).sum(axis=1), rtol=1e-12)
        assert sums.at(rows, every, errors=False)[1] is None
        assert np.isnan(sums.all).sum() == (~read).sum()  # `at` fills no cache
    res = prune(g, 0.8, 0.98)
    assert res.sums is not None
    s = score(g, 0.8, 0.98, res)
    np.testing.assert_allclose([s.replacement, s.completeness],
                               graph_scores(g, infl=res.influence), rtol=1e-12)

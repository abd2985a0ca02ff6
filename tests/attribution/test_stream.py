"""Streamed graphs (TraceConfig.adjacency="stream") against the dense graph of the same prompt,
and position prefixes against whole-prompt sweeps.

The dense graph is the reference: influence, scores and pruning computed from its whole matrix by
`attribution.prune`. A streamed graph must give the same numbers from what it stores: the
influences and |A| sums folded in while the rows were made, and the adjacency of its most
influential features.
"""

from __future__ import annotations

import warnings

import jax.numpy as jnp
import numpy as np
import pytest

from attribution.graph import Graph
from attribution.prune import graph_scores, node_influence, normalize_rows, prune
from attribution.trace import TraceConfig, tiled_bucket, trace_tokens
from clt.configs import ConfigError
from clt.lm import load_model
from tests.attribution.helpers import calibrate, random_transcoder

IDS = [5, 9, 22, 7, 3, 100, 41, 12, 60, 8]


def _setup(tiny_dirs, family="llama", reach=None, skip=True):
    m = load_model(tiny_dirs(family), dtype=jnp.float64)
    tc_cfg, tc_params = random_transcoder(m.cfg, 16, max_reach=reach, skip=skip,
                                          dtype=jnp.float64)
    ids = [m.cfg.bos_token_id] + IDS
    tc_params = calibrate(m.params, m.cfg, tc_cfg, tc_params, ids, 3.0)
    return m.params, m.cfg, tc_cfg, tc_params


def _trace(setup, **kw):
    params, cfg, tc_cfg, tc_params = setup
    config = TraceConfig(prompt="t", dtype="float64", **{"batch_size": 8, "position_bucket": 3,
                                                          **kw})
    return trace_tokens(params, cfg, tc_cfg, tc_params, IDS, config)


def _stored(dense: Graph, streamed: Graph) -> np.ndarray:
    """The dense graph's node indices of the streamed graph's nodes."""
    key = {k: i for i, k in enumerate(zip(dense.feature_layer, dense.feature_pos,
                                          dense.feature_index))}
    sel = [key[k] for k in zip(streamed.feature_layer, streamed.feature_pos,
                               streamed.feature_index)]
    r = dense.ranges
    return np.concatenate([np.asarray(sel, np.int64), np.arange(r.error.start, r.logit.stop)])


@pytest.fixture(scope="module")
def graphs(tiny_dirs):
    import jax

    before = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        setup = _setup(tiny_dirs)
        dense = _trace(setup, adjacency="dense")
        whole = _trace(setup, adjacency="stream", stream_features=10**6)
        part = _trace(setup, adjacency="stream", stream_features=40)
        yield dense, whole, part
    finally:
        jax.config.update("jax_enable_x64", before)


def test_stream_with_every_feature_is_the_dense_graph(graphs):
    dense, whole, _ = graphs
    assert dense.info["adjacency"] == "dense" and whole.info["adjacency"] == "stream"
    assert not dense.streamed and whole.streamed
    n_feat = dense.ranges.feature.stop
    assert 50 < n_feat and whole.ranges.feature.stop == n_feat
    np.testing.assert_allclose(whole.adjacency, dense.adjacency, rtol=1e-12, atol=1e-14)
    infl = node_influence(dense)
    assert infl[dense.ranges.feature].min() >= 0 and infl.max() > 0
    np.testing.assert_allclose(whole.influence, infl, rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(whole.input_abs, np.abs(dense.adjacency).sum(1), rtol=1e-12)
    np.testing.assert_allclose(graph_scores(whole), graph_scores(dense), rtol=1e-9)
    full = whole.full_graph
    assert full.edges == dense.n_edges and full.features_left_out == 0
    # Both carry their scores, computed by the tracer (the streamed one from its sums).
    np.testing.assert_allclose(
        [whole.scores.replacement, whole.scores.completeness], graph_scores(dense), rtol=1e-9)
    np.testing.assert_allclose(
        [dense.scores.replacement, dense.scores.completeness], graph_scores(dense), rtol=1e-12)
    a, b = prune(dense), prune(whole)
    assert a.node_mask.sum() < dense.n_nodes  # pruning removes something
    np.testing.assert_array_equal(a.node_mask, b.node_mask)
    np.testing.assert_array_equal(a.edge_mask, b.edge_mask)


def test_streamed_subgraph_keeps_the_full_graphs_numbers(graphs):
    dense, _, part = graphs
    n_feat = part.ranges.feature.stop
    assert n_feat == 40 and part.full_graph.features_left_out == \
        dense.ranges.feature.stop - 40
    keep = _stored(dense, part)
    infl = node_influence(dense)
    # The 40 most influential features of the full graph, rows and columns as in it.
    feat_infl = infl[dense.ranges.feature]
    assert feat_infl[keep[:n_feat]].min() >= np.sort(feat_infl)[::-1][39] - 1e-15
    np.testing.assert_allclose(part.adjacency, dense.adjacency[np.ix_(keep, keep)], rtol=1e-12,
                               atol=1e-14)
    np.testing.assert_allclose(part.influence, infl[keep], rtol=1e-9, atol=1e-15)
    left_out = np.setdiff1d(np.arange(dense.ranges.feature.stop), keep[:n_feat])
    np.testing.assert_allclose(part.full_graph.influence_left_out,
                               infl[left_out].sum(), rtol=1e-9)
    np.testing.assert_allclose(part.influence_total(), infl.sum(), rtol=1e-9)
    np.testing.assert_allclose(part.input_abs, np.abs(dense.adjacency[keep]).sum(1), rtol=1e-12)
    err = dense.ranges.error
    np.testing.assert_allclose(part.input_error_abs,
                               np.abs(dense.adjacency[keep][:, err]).sum(1), rtol=1e-12)
    # The scores are the full graph's, not those of the stored part.
    np.testing.assert_allclose(graph_scores(part), graph_scores(dense), rtol=1e-9)
    assert abs(graph_scores(part)[1] - graph_scores(part, part.adjacency)[1]) > 1e-6


def test_streamed_pruning_matches_while_the_cut_is_among_stored_features(graphs):
    dense, _, part = graphs
    keep = _stored(dense, part)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a, b = prune(dense, 0.95, 0.9), prune(part, 0.95, 0.9)
    assert 0 < b.node_mask[part.ranges.feature].sum() < 40
    np.testing.assert_array_equal(b.node_mask, a.node_mask[keep])
    assert not a.node_mask[np.setdiff1d(np.arange(dense.n_nodes), keep)].any()
    np.testing.assert_array_equal(b.edge_mask, a.edge_mask[np.ix_(keep, keep)])
    # Cumulative shares are exact down to the least influential stored feature (below it, the
    # features left out would rank in between).
    above = part.influence > part.influence[part.ranges.feature].min()
    assert above.sum() > 40
    np.testing.assert_allclose(b.cumulative_scores[above], a.cumulative_scores[keep][above],
                               rtol=1e-9)
    np.testing.assert_allclose(graph_scores(part, b.adjacency(part)),
                               graph_scores(dense, a.adjacency(dense)), rtol=1e-9)
    with pytest.warns(UserWarning, match="stream-features"):
        prune(part, 0.999, 0.98)


def test_streamed_graph_saves_loads_and_renders(graphs, tmp_path):
    from viewer.embed import ViewConfig, select

    _, _, part = graphs
    path = part.save(tmp_path / "g.npz", full=True, exact=True)
    back = Graph.load(path)
    assert back.streamed and back.full_graph == part.full_graph
    assert back.scores == part.scores
    for name in ("influence", "input_abs", "input_error_abs", "adjacency"):
        np.testing.assert_array_equal(getattr(back, name), getattr(part, name))
    sel = select(back, ViewConfig())
    assert sel.report["features_held"] > 0
    assert sel.report["full_graph"]["features_left_out"] == \
        back.n_active_total - back.ranges.feature.stop
    # Edge scores are shares of the full graph's row sums, not of the stored columns'.
    score_rows = normalize_rows(back.adjacency)
    assert not np.allclose(score_rows.sum(1)[back.ranges.feature],
                           (np.abs(back.adjacency) / np.maximum(back.input_abs, 1e-10)[:, None]
                            ).sum(1)[back.ranges.feature])


def test_auto_streams_when_dense_is_too_large(tiny_dirs, x64):
    setup = _setup(tiny_dirs, "gemma2", reach=2, skip=False)
    dense = _trace(setup)  # fits the default budget: dense
    assert not dense.streamed
    n = dense.n_nodes
    n_stored = n - dense.ranges.feature.stop + 30
    gb = (n**2 + n_stored**2) / 2 * 4 / 2**30  # between the stored and the dense sizes
    g = _trace(setup, max_adjacency_gb=gb, stream_features=30)
    assert g.streamed and g.info["adjacency"] == "stream" and g.ranges.feature.stop == 30
    with pytest.raises(ConfigError, match="--adjacency stream"):
        _trace(setup, max_adjacency_gb=gb, adjacency="dense")
    with pytest.raises(ConfigError, match="--stream-features"):
        _trace(setup, max_adjacency_gb=gb / 4, adjacency="stream", stream_features=30)


@pytest.mark.parametrize("family,reach,skip,layout", [
    ("gpt2", 1, True, "slots"), ("gemma2", None, False, "values"), ("llama", 2, False, "slots"),
    ("llama", None, True, "sources")])
def test_position_prefixes_give_the_whole_prompts_rows(tiny_dirs, x64, family, reach, skip,
                                                       layout):
    """Each batch on the shortest position prefix holding its targets (a multiple of the bucket,
    or the automatic one), against every batch on the whole prompt: the same adjacency, for the
    decoder rows laid out slot by slot or at the values (cut into blocks of positions: a batch
    reads the blocks below its prefix) and gathered by every batch."""
    setup = _setup(tiny_dirs, family, reach=reach, skip=skip)
    kw = {"adjacency": "dense", "decoder_rows_gb": 0.0 if layout == "sources" else 1.0,
          "value_contraction": "on" if layout == "values" else "off"}
    whole = _trace(setup, position_bucket=64, **kw)  # one prefix: the prompt
    assert whole.info["position_bucket"] >= len(IDS)
    assert whole.info["decoder_layout"] == layout
    for bucket in (1, 4, 0):
        g = _trace(setup, position_bucket=bucket, **kw)
        assert g.info["decoder_layout"] == layout
        T = g.ranges.token.stop - g.ranges.token.start
        if bucket:
            assert g.info["position_bucket"] == bucket
        elif layout == "sources":  # automatic: the whole of a short prompt
            assert g.info["position_bucket"] >= T
        else:  # automatic: a prompt laid out in blocks, one per batch of each layer's features
            assert g.info["position_bucket"] == tiled_bucket(
                T, g.ranges.feature.stop, len(set(g.feature_layer)), 8) < T
        np.testing.assert_allclose(g.adjacency, whole.adjacency, rtol=1e-12, atol=1e-15)
        if g.info["position_bucket"] < T:  # less arithmetic than on the whole prompt (0.81-0.93
            # measured on these 3-layer models, the logit batch on the whole prompt)
            assert g.info["row_flops"] < 0.95 * whole.info["row_flops"]


@pytest.mark.parametrize("family,reach,skip", [("llama", None, True), ("gemma2", 2, False),
                                               ("gpt2", 1, True)])
def test_slot_layout_gives_the_per_source_rows(tiny_dirs, x64, family, reach, skip):
    """The decoder rows laid out slot by slot (`SlotTiles`, on one device when they fit
    decoder_rows_gb) and gathered by every batch source by source (decoder_rows_gb 0): the same
    adjacency, on position prefixes (bucket 3) and every batch layer."""
    setup = _setup(tiny_dirs, family, reach=reach, skip=skip)
    slots = _trace(setup, adjacency="dense", decoder_rows_gb=1.0, position_bucket=0,
                   value_contraction="off")
    sources = _trace(setup, adjacency="dense", decoder_rows_gb=0.0)
    assert slots.info["decoder_layout"] == "slots" and sources.info["decoder_layout"] == "sources"
    # At the attention values (`_edges_by_values`), where there is no skip connection.
    values = _trace(setup, adjacency="dense", decoder_rows_gb=1.0, position_bucket=0,
                    value_contraction="on")
    assert values.info["decoder_layout"] == ("slots" if skip else "values")
    np.testing.assert_allclose(values.adjacency, sources.adjacency, rtol=1e-12, atol=1e-15)
    # On position prefixes (bucket 3), the layout is cut into blocks of positions.
    blocks = _trace(setup, adjacency="dense", decoder_rows_gb=1.0, value_contraction="on")
    assert blocks.info["decoder_layout"] == values.info["decoder_layout"]
    np.testing.assert_allclose(blocks.adjacency, sources.adjacency, rtol=1e-12, atol=1e-15)
    assert slots.ranges.feature.stop == sources.ranges.feature.stop > 50
    np.testing.assert_allclose(slots.adjacency, sources.adjacency, rtol=1e-12, atol=1e-15)
    assert slots.info["row_flops"] < sources.info["row_flops"] * 1.5


def test_slot_layout_places_every_feature_once_per_slot():
    """`SlotTiles`: for every MLP slot, each feature of a layer writing it is in exactly one
    main or overflow cell, whose accumulator row is the feature's; padding cells are empty
    and read zero decoder rows; every window lies inside the accumulator."""
    from attribution.replacement import ActiveFeatures
    from attribution.tiling import SlotTiles

    rng = np.random.default_rng(0)
    L, T, F, D, reach = 5, 7, 64, 3, 3
    layer, pos = [], []
    for s in range(L):  # uneven: one busy position per layer
        counts = rng.integers(0, 4, T)
        counts[s % T] = 30
        for q, c in enumerate(counts):
            layer += [s] * c
            pos += [q] * c
    layer, pos = np.asarray(layer, np.int32), np.asarray(pos, np.int32)
    index = rng.integers(0, F, len(layer)).astype(np.int32)
    order = np.lexsort((index, pos, layer))  # graph order: (layer, pos, index)
    active = ActiveFeatures(layer[order], pos[order], index[order],
                            rng.uniform(0.5, 2.0, len(layer)))
    writers = lambda t: range(max(0, t - reach + 1), t + 1)
    tiles = SlotTiles.build(active, L, writers, T)
    W = [rng.normal(size=(F, min(reach, L - s), D)) for s in range(L)]
    mats = tiles.decoders(W, active, np.float64)
    assert any(len(sl[6]) for sl in tiles.slots)  # overflow tiles are exercised
    for (t, K, Ko, main, m_start, over, o_pos, o_start), (Dm, Do) in zip(tiles.slots, mats):
        cells = np.concatenate([main.ravel(), over.ravel()])
        rows = np.concatenate([(m_start[:, None] + np.arange(K)).ravel(),
                               (o_start[:, None] + np.arange(Ko)).ravel()])
        cell_pos = np.concatenate([np.repeat(np.arange(T), K), np.repeat(o_pos, Ko)])
        dec = np.concatenate([Dm.reshape(-1, D), Do.reshape(-1, D)])
        assert rows.max() < tiles.n_rows
        want = np.flatnonzero(np.isin(active.layer, list(writers(t))))
        got = cells[cells >= 0]
        assert sorted(got) == sorted(want)  # each writer's feature once
        f = cells[cells >= 0]
        np.testing.assert_array_equal(rows[cells >= 0], tiles.row_of[f])
        np.testing.assert_array_equal(cell_pos[cells >= 0], active.pos[f])
        ref = np.stack([W[s][i, t - s] * v for s, i, v in zip(active.layer[f], active.index[f],
                                                               active.value[f])])
        np.testing.assert_array_equal(dec[cells >= 0], ref)
        assert np.all(dec[cells < 0] == 0)
    # Accumulator rows: position-major, so a position prefix is a prefix of rows.
    assert np.all(np.diff(active.pos[np.argsort(tiles.row_of)]) >= 0)


@pytest.mark.parametrize("group", [1, 3])
def test_cumulative_layout_holds_each_features_running_write(group):
    """`SlotTiles.cumulative` (tiles with every lower layer writing each slot): a feature's
    running write at slot t is the sum of its decoder rows into slots <= t (none past its reach)
    times its activation; the last slot's cells hold it; a value group's last slot holds, side by
    side for each slot t of the group, value_fn(t + 1, the running write at t, its position)
    (zero below the feature's layer and in a short last group's padding columns); padding cells
    are zero; the other slots have no cumulative rows, and no value rows but a group's last. The
    direct edges of a feature at (l, p): its read times the running write at l - 1 of each
    feature at p below l, in accumulator order. Checked against naive sums, on uneven activity
    with overflow tiles and chunks smaller than a slot."""
    from attribution.replacement import ActiveFeatures
    from attribution.tiling import SlotTiles, value_groups

    rng = np.random.default_rng(1)
    L, T, F, D, V, reach = 5, 6, 40, 4, 3, 2
    layer, pos = [], []
    for s in range(L):
        counts = rng.integers(0, 3, T)
        counts[(s + 2) % T] = 25
        for q, c in enumerate(counts):
            layer += [s] * c
            pos += [q] * c
    layer, pos = np.asarray(layer, np.int32), np.asarray(pos, np.int32)
    index = rng.integers(0, F, len(layer)).astype(np.int32)
    order = np.lexsort((index, pos, layer))
    active = ActiveFeatures(layer[order], pos[order], index[order],
                            rng.uniform(0.5, 2.0, len(layer)))
    W = [rng.normal(size=(F, min(reach, L - s), D)) for s in range(L)]
    R = rng.normal(size=(L, D, V))
    calls = []

    def value_fn(b, x, p):
        calls.append(len(x))
        return (x @ R[b]) * (1.0 + p)[:, None]

    def running(f, t):  # feature f's cumulative write at slot t, naively
        s, w = active.layer[f], np.zeros(D)
        for u in range(s, min(t, s + reach - 1) + 1):
            w += W[s][active.index[f], u - s] * active.value[f]
        return w

    tiles = SlotTiles.build(active, L, lambda t: range(t + 1), T)
    reads = rng.normal(size=(len(layer), D))
    mats, (flat, offset, length, start) = tiles.cumulative(W, active, np.float64, value_fn, L,
                                                           reads, group=group, chunk=16)
    acc_order = np.argsort(tiles.row_of)  # accumulator row -> feature
    for i in range(len(layer)):
        p, l = active.pos[i], active.layer[i]
        src = acc_order[start[i]:start[i] + length[i]]
        want = np.flatnonzero((active.pos == p) & (active.layer < l))
        assert sorted(src) == list(want)
        np.testing.assert_allclose(flat[offset[i]:offset[i] + length[i]],
                                   [running(j, l - 1) @ reads[i] for j in src], rtol=1e-12,
                                   atol=1e-12)
    assert set(calls) == {16} and any(len(sl.over_pos) for sl in tiles.slots)
    groups = {last: first for first, last in value_groups(L, group)}
    assert sorted(groups) == ([0, 1, 2, 3] if group == 1 else [2, 3])
    for sl, (Cm, Co, Vm, Vo) in zip(tiles.slots, mats):
        cells = np.concatenate([sl.main.ravel(), sl.over.ravel()])
        cell_pos = np.concatenate([np.repeat(np.arange(T), sl.K), np.repeat(sl.over_pos, sl.Ko)])
        assert sorted(cells[cells >= 0]) == list(np.flatnonzero(active.layer <= sl.t))
        want = np.zeros((len(cells), D))
        for i in np.flatnonzero(cells >= 0):
            want[i] = running(cells[i], sl.t)
        if sl.t < L - 1:
            assert Cm is None and Co is None
        else:
            C = np.concatenate([Cm.reshape(-1, D), Co.reshape(-1, D)])
            np.testing.assert_allclose(C, want, rtol=1e-12, atol=1e-12)
        if sl.t not in groups:
            assert Vm is None and Vo is None
            continue
        Vs = np.concatenate([Vm.reshape(-1, group * V), Vo.reshape(-1, group * V)])
        want_v = np.zeros_like(Vs)
        for j, t in enumerate(range(groups[sl.t], groups[sl.t] + group)):
            if t > sl.t:  # a short group's padding columns
                continue
            at_t = np.zeros_like(want)
            for i in np.flatnonzero(cells >= 0):
                at_t[i] = running(cells[i], t) if active.layer[cells[i]] <= t else 0
            want_v[:, j * V:(j + 1) * V] = value_fn(t + 1, at_t, cell_pos)
        np.testing.assert_allclose(Vs, want_v, rtol=1e-12, atol=1e-12)
        assert np.all(Vs[cells < 0] == 0)


def test_sources_layout_places_every_feature_once():
    """`Sources`: main rows of K slots per position, overflow tiles for the rest (uneven
    activity: one position holds 40 features, the others 0-3)."""
    from attribution.replacement import ActiveFeatures
    from attribution.tiling import Sources

    rng = np.random.default_rng(0)
    counts = np.array([0, 40, 3, 0, 1, 2, 3])
    pos = np.repeat(np.arange(len(counts)), counts).astype(np.int32)
    index = np.concatenate([np.sort(rng.choice(64, c, replace=False)) for c in counts])
    active = ActiveFeatures(np.full(len(pos), 2, np.int32), pos, index.astype(np.int32),
                            rng.uniform(0.5, 2.0, len(pos)))
    src = Sources.build(active, 2, len(counts))
    K, Ko = src.index.shape[1], src.over_index.shape[1]
    assert 0 < K < 40 and len(src.over_pos) >= 1 and np.all(src.over_pos == 1)
    for P in (2, 5, len(counts)):
        n_over, col = src.columns(P)
        n = int((pos < P).sum())
        assert len(col) == n and n_over == len(src.over_pos)  # overflow all at position 1
        cells_i = np.concatenate([src.index[:P].ravel(), src.over_index[:n_over].ravel()])
        cells_v = np.concatenate([src.value[:P].ravel(), src.over_value[:n_over].ravel()])
        cell_pos = np.concatenate([np.repeat(np.arange(P), K), np.repeat(src.over_pos, Ko)])
        assert len(np.unique(col)) == n
        np.testing.assert_array_equal(cells_i[col], index[:n])
        np.testing.assert_array_equal(cells_v[col], active.value[:n])
        np.testing.assert_array_equal(cell_pos[col], pos[:n])
        padding = np.setdiff1d(np.arange(len(cells_v)), col)
        assert np.all(cells_v[padding] == 0)  # padding slots contribute nothing


@pytest.mark.parametrize("widths", [(0, 3), (2, 2), (16, 16)])
def test_decoder_layouts_give_the_same_rows(tiny_dirs, x64, monkeypatch, widths):
    """Every feature in overflow tiles, a mix, or every feature in the main rows: the same
    adjacency as the layout the tracer picks (a CLT with skip, so each source writes to every
    later layer)."""
    import importlib

    tiling = importlib.import_module("attribution.tiling")
    setup = _setup(tiny_dirs, "llama", reach=None, skip=True)
    ref = _trace(setup, adjacency="dense")
    monkeypatch.setattr(tiling, "tile_widths", lambda counts, *_: widths)
    g = _trace(setup, adjacency="dense")
    assert g.ranges.feature.stop == ref.ranges.feature.stop > 50
    np.testing.assert_allclose(g.adjacency, ref.adjacency, rtol=1e-12, atol=1e-15)


def test_rows_ahead_makes_the_next_batch_before_handing_out_this_one():
    """`rows_ahead` yields every batch's rows (cut to the batch, on the host) in order, and the
    next batch is dispatched before a batch's rows are fetched: never more than two ahead."""
    import jax

    from attribution.replacement import ActiveFeatures
    from attribution.stream import rows_ahead

    z = np.zeros(10, np.int32)
    active = ActiveFeatures(z, z, z, z.astype(np.float32))
    events = []

    class Rows:  # a device result: its fetch is logged
        def __init__(self, i, a):
            self.i, self.a = i, a

        def __array__(self, dtype=None, copy=None):
            events.append(("fetch", self.i))
            return np.asarray(self.a, dtype)

    class Make:
        def features(self, active, c, host=True, padded=False):
            assert not host and padded  # left on the device, padded to the batch
            events.append(("make", int(c[0])))
            return Rows(int(c[0]), np.concatenate([np.outer(c, [1.0, 2.0]),
                                                   np.full((4 - len(c), 2), -1.0)]))

    batches = [np.arange(0, 4), np.arange(4, 8), np.arange(8, 10)]
    real_get = jax.device_get
    try:
        jax.device_get = lambda x: x  # `Rows` stands for a device array
        got = list(rows_ahead(Make(), active, batches))
    finally:
        jax.device_get = real_get
    assert [c.tolist() for c, _ in got] == [c.tolist() for c in batches]
    for c, r in got:
        np.testing.assert_array_equal(r, np.outer(c, [1.0, 2.0]))  # the padding cut off
    assert events == [("make", 0), ("make", 4), ("fetch", 0), ("make", 8), ("fetch", 4),
                      ("fetch", 8)]


def test_rows_kept_on_the_device_give_the_offloaded_graph(tiny_dirs, x64):
    """`offload=False` (every batch's rows left on the device, copied once at the end) gives
    the graph `offload=True` does (each batch stored while the next is made), and so does a
    prompt with no active feature (no batch at all)."""
    import dataclasses

    setup = _setup(tiny_dirs)
    on, off = _trace(setup, adjacency="dense"), _trace(setup, adjacency="dense", offload=False)
    assert on.n_active_total > 0
    np.testing.assert_array_equal(off.adjacency, on.adjacency)
    params, cfg, tc_cfg, tc_params = setup
    silent = dataclasses.replace(tc_params, b_enc=tc_params.b_enc - 1e6)  # nothing fires
    g_on, g_off = (_trace((params, cfg, tc_cfg, silent), adjacency="dense", offload=o)
                   for o in (True, False))
    assert g_on.n_active_total == 0 and g_on.n_nodes == on.n_nodes - on.n_active_total
    assert np.abs(g_on.adjacency).sum() > 0  # the errors' and tokens' edges to the logits
    np.testing.assert_array_equal(g_off.adjacency, g_on.adjacency)


def test_row_compiler_options_and_their_fallback(tiny_dirs, x64, monkeypatch):
    """The row programs compile with `ROW_COMPILER_OPTIONS` (XLA:CPU's own dot emitter) where
    this XLA accepts them; an option it does not know is refused on a trivial program once, and
    the rows then compile without it: the same adjacency (float64, to 1e-12) either way."""
    import importlib

    trace_mod = importlib.import_module("attribution.trace")
    setup = _setup(tiny_dirs)
    assert trace_mod.accepted_options({"xla_no_such_option": "1"}) is None
    trace_mod._row_program.cache_clear()
    with_options = _trace(setup, adjacency="dense")
    monkeypatch.setattr(trace_mod, "ROW_COMPILER_OPTIONS", {"xla_no_such_option": "1"})
    trace_mod._row_program.cache_clear()
    try:
        without = _trace(setup, adjacency="dense")
    finally:
        trace_mod._row_program.cache_clear()
    np.testing.assert_allclose(without.adjacency, with_options.adjacency, rtol=1e-12,
                               atol=1e-15)

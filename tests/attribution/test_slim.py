"""Graph files: sparse float16 edges (error bound stated in `attribution.graph`), slim graphs
(the pruned graph plus every node's full-graph influence) against the in-memory full graph they
come from, and graphs written by the previous schema (a dense adjacency) still loading."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from attribution.graph import EDGE_ATOL_OF_ROW_MAX, EDGE_RTOL, Graph
from attribution.prune import node_influence, prune
from attribution.slim import slim
from tests.attribution.test_prune import hand_graph
from tests.attribution.test_stream import _setup, _trace


def _wide_graph(seed=0) -> Graph:
    """The hand graph with random weights over twelve decades, some of them negative."""
    g = hand_graph()
    rng = np.random.default_rng(seed)
    nz = g.adjacency != 0
    g.adjacency[nz] = (rng.choice([-1, 1], nz.sum()) * 10.0 ** rng.uniform(-10, 2, nz.sum()))
    return g


def test_float16_edges_within_the_stated_bound(tmp_path):
    for seed in range(5):
        g = _wide_graph(seed)
        back = Graph.load(g.save(tmp_path / "g.npz", full=True))
        a, b = g.adjacency.astype(np.float64), back.adjacency.astype(np.float64)
        row_max = np.abs(a).max(axis=1, keepdims=True)
        assert np.all(np.abs(b - a) <= EDGE_RTOL * np.abs(a) + EDGE_ATOL_OF_ROW_MAX * row_max)
        assert not b[a == 0].any()  # no edge appears
        exact = Graph.load(g.save(tmp_path / "e.npz", full=True, exact=True))
        np.testing.assert_array_equal(exact.adjacency, g.adjacency)


@pytest.fixture(scope="module")
def dense(tiny_dirs):
    import jax

    before = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        return _trace(_setup(tiny_dirs), node_threshold=0.95,
                      edge_threshold=0.95)
    finally:
        jax.config.update("jax_enable_x64", before)


def _key(g: Graph, i: int):
    return (int(g.feature_layer[i]), int(g.feature_pos[i]), int(g.feature_index[i]))


def test_slim_file_holds_the_pruned_graph_with_full_influence(dense, tmp_path):
    g = dense
    back = Graph.load(g.save(tmp_path / "g.npz"))
    full = back.full_graph
    assert back.streamed and full.slim and (full.pruned_node_threshold,
                                            full.pruned_edge_threshold) == (0.95, 0.95)
    assert back.scores == g.scores and full.nodes == g.n_nodes and full.edges == g.n_edges
    r, rb = g.ranges, back.ranges
    assert 0 < rb.feature.stop < r.feature.stop
    # Stored and left-out features are the whole set of active features, each with its
    # activation and full-graph influence.
    infl = node_influence(g)
    where = {_key(g, i): i for i in range(r.feature.stop)}
    stored = [where[_key(back, i)] for i in range(rb.feature.stop)]
    left = [where[k] for k in zip(back.left_out.layer, back.left_out.pos, back.left_out.index)]
    assert sorted(stored + left) == list(range(r.feature.stop))
    np.testing.assert_allclose(back.influence[:rb.feature.stop], infl[stored], rtol=1e-12)
    np.testing.assert_allclose(back.left_out.influence, infl[left], rtol=1e-6)
    np.testing.assert_array_equal(back.left_out.activation, g.activation[left])
    np.testing.assert_allclose(back.influence_total(), infl.sum(), rtol=1e-6)
    # Pruning the file at its thresholds gives the in-memory graph's pruned nodes and edges.
    a, b = prune(g, 0.95, 0.95), prune(back, 0.95, 0.95)
    node_map = np.concatenate([stored, np.arange(r.error.start, r.logit.stop)])
    np.testing.assert_array_equal(b.node_mask, a.node_mask[node_map])
    assert a.node_mask[:r.feature.stop].sum() == rb.feature.stop
    np.testing.assert_array_equal(b.edge_mask, a.edge_mask[np.ix_(node_map, node_map)])
    want = np.where(a.edge_mask, g.adjacency, 0)[np.ix_(node_map, node_map)]
    row_max = np.abs(want).max(axis=1, keepdims=True)
    assert np.all(np.abs(back.adjacency - want) <= EDGE_RTOL * np.abs(want)
                  + EDGE_ATOL_OF_ROW_MAX * row_max)
    # Looser thresholds cannot be met from the file: it says so and gives what it holds.
    with pytest.warns(UserWarning, match="--save-full"):
        c = prune(back, 0.99, 0.99)
    np.testing.assert_array_equal(c.node_mask, b.node_mask)
    # Tighter ones prune within it.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        d = prune(back, 0.8, 0.9)
    assert d.node_mask.sum() < b.node_mask.sum()
    assert slim(back) is back


def test_slim_file_is_smaller_and_renders(dense, tmp_path):
    from viewer.embed import ViewConfig, select

    small = dense.save(tmp_path / "s.npz").stat().st_size
    big = dense.save(tmp_path / "f.npz", full=True, exact=True).stat().st_size
    assert small < big / 2
    sel = select(Graph.load(tmp_path / "s.npz"), ViewConfig())
    assert sel.report["features_held"] > 0 and sel.report["edges_held"] > 0


def test_schema_1_files_still_load(tmp_path):
    """A file as the previous version wrote it: the dense adjacency under `adjacency`."""
    g = hand_graph()
    meta = {"schema_version": 1, "kind": "attribution_graph", "n_layers": g.n_layers,
            "bos": g.bos, "prompt": "", "token_strings": g.token_strings,
            "logit_strings": g.logit_strings, "config": {}, "info": {},
            "n_active_total": -1}
    arrays = {n: getattr(g, n) for n in ("tokens", "feature_layer", "feature_pos",
                                         "feature_index", "activation", "error_layer",
                                         "error_pos", "logit_tokens", "logit_probs",
                                         "adjacency")}
    np.savez(tmp_path / "v1.npz", meta=np.array(json.dumps(meta)), **arrays)
    back = Graph.load(tmp_path / "v1.npz")
    np.testing.assert_array_equal(back.adjacency, g.adjacency)
    assert not back.streamed and back.ranges == g.ranges


def test_slim_input_sums_are_the_full_graphs(dense):
    """A slim graph's input sums (those pruning took with the influence, the rest summed then)
    are each kept node's sums of |incoming edges| over the whole graph, and over its errors."""
    pruned = dense.pruned
    assert pruned is not None and pruned.sums is not None
    r = dense.ranges
    keep = np.concatenate([np.nonzero(pruned.node_mask[r.feature])[0],
                           np.arange(r.error.start, dense.n_nodes)])
    assert np.isnan(pruned.sums.all[keep]).any()  # some kept rows were not read: summed here
    s = slim(dense)
    a = np.abs(dense.adjacency.astype(np.float64))
    np.testing.assert_allclose(s.input_abs, a[keep].sum(axis=1), rtol=1e-12)
    np.testing.assert_allclose(s.input_error_abs, a[keep][:, r.error].sum(axis=1), rtol=1e-12)

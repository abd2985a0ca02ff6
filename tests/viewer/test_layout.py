"""The layout of the papers: x by token position (wider columns where crowded), y by layer
(embeddings at the bottom, logits at the top), errors apart, no two nodes on the same spot."""

from __future__ import annotations

import numpy as np

from tests.viewer.helpers import random_graph
from viewer.embed import ViewConfig, _kinds, select
from viewer.layout import ERROR, FEATURE, LOGIT, TOKEN, layout


def _layout_of(graph):
    kind = _kinds(graph)
    r = graph.ranges
    layer = np.concatenate([graph.feature_layer, graph.error_layer, np.full(graph.n_pos, -1),
                            np.full(len(graph.logit_tokens), graph.n_layers)])
    pos = np.concatenate([graph.feature_pos, graph.error_pos, np.arange(graph.n_pos),
                          np.full(len(graph.logit_tokens), graph.n_pos - 1)])
    infl = np.random.default_rng(0).uniform(size=graph.n_nodes)
    assert len(kind) == r.n_nodes
    return kind, layer, pos, *layout(kind, layer, pos, infl, graph.n_pos, graph.n_layers)


def test_rows_columns_and_glyph_slots():
    g = random_graph(n_layers=5, n_pos=9, n_features=200, n_logits=4, seed=3)
    kind, layer, pos, x, y, axis = _layout_of(g)
    left = axis.column_x - axis.column_width / 2
    right = axis.column_x + axis.column_width / 2
    # Every non-logit node inside its position's column.
    body = kind != LOGIT
    assert np.all(x[body] > left[pos[body]]) and np.all(x[body] < right[pos[body]])
    # Columns in token order, touching.
    np.testing.assert_allclose(left[1:], right[:-1])
    # y: embeddings lowest on screen (largest y), then layers upwards, logits on top.
    assert np.all(y[kind == TOKEN] == y.max()) and np.all(y[kind == LOGIT] == y.min())
    band = np.array([y[(kind <= ERROR) & (layer == a)].mean() for a in range(g.n_layers)])
    assert np.all(np.diff(band) < 0)
    # Features of a band stay within it (sub-rows), errors on the band line.
    for a in range(g.n_layers):
        f = (kind == FEATURE) & (layer == a)
        assert np.all(np.abs(y[f] - axis.row_y[a + 1]) < 32)
    np.testing.assert_allclose(y[kind == ERROR], axis.row_y[g.error_layer + 1])
    # Errors set apart: right of every feature of their cell.
    for e in np.nonzero(kind == ERROR)[0]:
        cell = (kind == FEATURE) & (layer == layer[e]) & (pos == pos[e])
        if cell.any():
            assert x[e] > x[cell].max() + 8
    # No two nodes on the same spot.
    spots = {(round(a, 3), round(b, 3)) for a, b in zip(x, y)}
    assert len(spots) == len(x)
    # Logits: the most probable right above the last position, the others to its left.
    lg = np.nonzero(kind == LOGIT)[0]
    assert x[lg[0]] == axis.column_x[-1] and np.all(np.diff(x[lg]) < 0)


def test_crowded_columns_are_wider():
    g = random_graph(n_layers=3, n_pos=6, n_features=30, seed=1)
    # Pile 20 features into one cell: its column widens, the others stay narrow.
    g.feature_pos[:] = np.where(np.arange(30) < 20, 3, g.feature_pos)
    g.feature_layer[:20] = 1
    *_, axis = _layout_of(g)
    assert axis.column_width[3] > 2 * np.median(axis.column_width)
    assert axis.column_width.min() >= 44


def test_page_positions_are_deterministic():
    g = random_graph(seed=5)
    s1, s2 = select(g, ViewConfig()), select(g, ViewConfig())
    np.testing.assert_array_equal(s1.nodes, s2.nodes)
    np.testing.assert_array_equal(s1.edge_source, s2.edge_source)

"""Suggested supernodes (`viewer.supernodes`): hand-built out-edge vectors grouped by the stated
rule (same position; nearby layers and similar out-edges, or the same top output token), with
complete linkage; the out-edge vectors are influence's normalisation; a graph with planted
twin features gets them suggested, as page indices."""

from __future__ import annotations

import numpy as np

from tests.viewer.helpers import plant_twins, random_graph
from viewer.embed import ViewConfig, budget, select, suggested_supernodes
from viewer.supernodes import out_vectors, suggest

V = np.array([1.0, -2.0, 0.5, 0.0])
W = np.array([0.0, 0.5, 2.0, 1.0])  # orthogonal to V


def test_groups_by_position_layers_and_similarity():
    # a, b: same place, similar; c: same place, orthogonal; d: other position; e: far layer.
    layer = [1, 2, 2, 1, 7]
    pos = [3, 3, 3, 4, 3]
    vectors = np.stack([V, 2 * V, W, V, 0.5 * V])
    infl = [0.5, 0.4, 0.3, 0.2, 0.1]
    got = suggest(layer, pos, vectors, infl)
    assert [g["members"] for g in got] == [[0, 1]]
    assert got[0]["cosine"] == 1.0 and got[0]["name"] == "L1–2 @3"
    # The same top output token joins e across the layer gap (and only where the out-edges
    # agree: c shares the token but is orthogonal).
    got = suggest(layer, pos, vectors, infl, top_token=[9, 9, 9, 9, 9],
                  token_text=lambda t: " Paris", pos_text=lambda p: " is")
    assert [g["members"] for g in got] == [[0, 1, 4]]
    assert got[0]["name"] == 'say " Paris" @3 " is"'


def test_complete_linkage_does_not_chain():
    x, z = np.array([1.0, 0.0]), np.array([0.0, 1.0])
    y = (x + z) / np.sqrt(2)  # cos(x, y) = cos(y, z) = 0.71, cos(x, z) = 0
    got = suggest([1, 2, 3], [0, 0, 0], np.stack([x, y, z]), [0.3, 0.2, 0.1])
    assert len(got) == 1 and len(got[0]["members"]) == 2


def test_out_vectors_are_influences_normalisation():
    rng = np.random.default_rng(0)
    A = rng.normal(size=(6, 9)) * (rng.random((6, 9)) < 0.6)
    cols = [2, 5]
    sums = np.abs(A).sum(axis=1)
    got = out_vectors(A[:, cols], sums)
    np.testing.assert_allclose(got, (A[:, cols] / sums[:, None]).T, rtol=1e-12)


def test_planted_twins_are_suggested():
    g = random_graph(n_layers=6, n_pos=6, n_features=150, seed=7, connected=True)
    pairs = plant_twins(g)
    assert pairs
    config = ViewConfig(node_budget=20)
    sel = select(g, config)
    page = {int(node): i for i, node in enumerate(sel.nodes)}
    first_view = set(budget(sel, 20).tolist())
    found = suggested_supernodes(g, sel, config)
    groups = [set(s["members"]) for s in found]
    for a, b in pairs:  # both twins are influential enough to be in the first view
        assert {page[a], page[b]} <= first_view
        assert any({page[a], page[b]} <= m for m in groups), (a, b, found)
    for s in found:  # members: features of the first view at one position
        assert set(s["members"]) <= first_view and (sel.kind[s["members"]] == 0).all()
        assert len({int(g.feature_pos[sel.nodes[i]]) for i in s["members"]}) == 1
    assert suggested_supernodes(g, sel, ViewConfig(node_budget=20, suggested_supernodes=0)) == []

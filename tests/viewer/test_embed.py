"""What a page holds: nodes by influence (the pruning rule of attribution.prune), edges under
per-node and total caps by the edge score of attribution.prune, a report of everything left out,
and a page under ~15 MB for a 1,024-token prompt."""

from __future__ import annotations

import numpy as np
import pytest

from attribution.influence import cumulative_share
from attribution.prune import find_threshold, node_influence, normalize_rows, prune
from tests.viewer.helpers import random_cards, random_graph
from viewer.embed import ViewConfig, budget, select
from viewer.html import render_html
from viewer.layout import ERROR, FEATURE


@pytest.fixture(scope="module")
def graph():
    return random_graph(n_layers=5, n_pos=10, n_features=300, n_logits=4, edges_per_target=12,
                        seed=2, connected=True)


def test_cumulative_matches_prune(graph):
    cum, before = cumulative_share(node_influence(graph))
    # prune accumulates in float32, we in float64
    np.testing.assert_allclose(cum, prune(graph).cumulative_scores, rtol=1e-5)
    infl = node_influence(graph)
    np.testing.assert_allclose(cum - before, infl / infl.sum(), atol=1e-6)  # cancellation


@pytest.mark.parametrize("t", [0.3, 0.6, 0.8, 0.95])
def test_slider_rule_is_prunes_node_rule(graph, t):
    """The page shows a feature or error when the more influential ones have not reached the
    threshold: the node set of attribution.prune's first step (before its edge pruning)."""
    sel = select(graph, ViewConfig(max_influence=1.0))
    infl = sel.influence
    n_src = graph.ranges.token.start
    page = set(np.nonzero(sel.before[:n_src] < t)[0])
    prune_rule = set(np.nonzero(infl[:n_src] >= find_threshold(infl, t))[0])
    assert page == prune_rule


def test_node_cap_keeps_the_most_influential(graph):
    sel = select(graph, ViewConfig(max_nodes=25, max_influence=1.0))
    held = sel.nodes[sel.kind <= ERROR]
    n_src = graph.ranges.token.start
    top = np.argsort(-sel.influence[:n_src], kind="stable")[:25]
    assert set(held) == set(top)
    rep = sel.report
    assert rep["nodes_held"] == 25 + graph.n_pos + len(graph.logit_tokens)
    assert rep["nodes_held"] + rep["nodes_left_out"] == graph.n_nodes
    assert rep["left_out_over_node_cap"] == n_src - 25 - rep["left_out_below_influence"]
    # Tokens and logits always held.
    assert set(range(graph.ranges.token.start, graph.n_nodes)) <= set(sel.nodes)


@pytest.mark.parametrize("n", [1, 10, 57])
def test_budget_is_the_most_influential(graph, n):
    """The page's first view: the n feature and error nodes of the graph with the largest
    node_influence (of all the graph's, not only those held), in that order."""
    infl = node_influence(graph)
    n_src = graph.ranges.token.start
    sel = select(graph, ViewConfig(node_budget=n))
    want = np.argsort(-infl[:n_src], kind="stable")[:n]
    got = sel.nodes[budget(sel, n)]
    np.testing.assert_array_equal(got, want)
    assert infl[got].min() >= np.sort(infl[:n_src])[::-1][n - 1]
    # Errors off: the n most influential features.
    feats = np.argsort(-infl[graph.ranges.feature], kind="stable")[:n]
    np.testing.assert_array_equal(sel.nodes[budget(sel, n, errors=False)], feats)


def test_edge_caps_by_influence_score(graph):
    k, cap = 3, 400
    sel = select(graph, ViewConfig(max_influence=1.0, max_edges_per_node=k, max_edges=10**9))
    n = sel.nodes
    # The edge score, computed independently: normalised |A| times target influence + logit p.
    score = normalize_rows(graph.adjacency) * (sel.influence + graph.logit_weights())[:, None]
    sub = score[np.ix_(n, n)]
    kept = np.zeros_like(sub, bool)
    kept[sel.edge_target, sel.edge_source] = True
    nz = graph.adjacency[np.ix_(n, n)] != 0
    for i in range(len(n)):  # each node's k strongest inputs and outputs are held, and no other
        row = np.argsort(-np.where(nz[i], sub[i], -1))[:min(k, nz[i].sum())]
        col = np.argsort(-np.where(nz[:, i], sub[:, i], -1))[:min(k, nz[:, i].sum())]
        assert kept[i, row].all() and kept[col, i].all()
    for t, s in zip(sel.edge_target, sel.edge_source):
        in_rank = int((np.where(nz[t], sub[t], -1) > sub[t, s]).sum())
        out_rank = int((np.where(nz[:, s], sub[:, s], -1) > sub[t, s]).sum())
        assert in_rank < k or out_rank < k
    # Weights are the graph's, strongest |weight| first.
    np.testing.assert_array_equal(sel.edge_weight, graph.adjacency[n[sel.edge_target],
                                                                   n[sel.edge_source]])
    assert np.all(np.diff(np.abs(sel.edge_weight)) <= 0)
    # The total cap keeps the highest scores among those.
    capped = select(graph, ViewConfig(max_influence=1.0, max_edges_per_node=k, max_edges=cap))
    assert len(capped.edge_weight) == cap
    s_all = sub[sel.edge_target, sel.edge_source]
    s_cap = sub[capped.edge_target, capped.edge_source]
    assert s_cap.min() >= np.sort(s_all)[::-1][cap - 1] - 1e-12
    rep = capped.report
    assert rep["edges_held"] == cap and rep["edges_in_graph"] == graph.n_edges
    assert (rep["edges_held"] + rep["left_out_edge_total_cap"] + rep["left_out_edge_per_node_cap"]
            + rep["left_out_edges_of_left_out_nodes"]) == rep["edges_left_out"] + rep["edges_held"]
    assert rep["edges_held"] + rep["edges_left_out"] == graph.n_edges


def test_errors_off_and_config_validation(graph):
    sel = select(graph, ViewConfig(errors=False))
    assert not (sel.kind == ERROR).any() and (sel.kind == FEATURE).any()
    assert sel.report["left_out_errors_off"] == len(graph.error_layer)
    from clt.configs import ConfigError

    for bad in ({"max_influence": 0.0}, {"node_threshold": 1.5}, {"max_edges": -1},
                {"node_budget": 0}, {"node_budget": 100_001}, {"top_paths": -1}):
        with pytest.raises(ConfigError, match=f"ViewConfig.{next(iter(bad))} "):
            ViewConfig(**bad)


def test_page_for_a_1024_token_prompt_stays_under_15_mb():
    """1,024 positions, 2 layers (2,046 error nodes), 2,000 features, ~120k edges, with a card
    for every feature: the caps bound the page whatever the prompt length."""
    g = random_graph(n_layers=2, n_pos=1024, n_features=2000, n_logits=10, edges_per_target=60,
                     seed=4, connected=True)
    cards = random_cards(2, 10_000)
    page, rep = render_html(g, ViewConfig(max_nodes=3000), cards=cards)
    size = len(page.encode("utf-8"))
    assert size < 15 * 2**20, size / 2**20
    assert rep["nodes_held"] == 3000 + 1024 + 10 and rep["left_out_over_node_cap"] > 0
    assert rep["edges_held"] <= 100_000 and rep["edges_left_out"] > 0
    assert rep["cards"] == rep["features_held"] > 0


def test_select_with_the_tracers_pruning_is_select_without(graph):
    """A page made from a graph carrying its pruning (`Graph.pruned`, as the tracer leaves it:
    influence and row sums already taken) holds what a page made afresh holds."""
    import dataclasses

    g = dataclasses.replace(graph, adjacency=graph.adjacency.copy())
    g.adjacency[:, g.ranges.token.start] = 0  # a token without influence: its row is not read
    fresh = select(g, ViewConfig())
    pruned = prune(g)
    assert pruned.sums is not None and np.isnan(pruned.sums.all[g.ranges.token.start])
    reused = select(dataclasses.replace(g, pruned=pruned), ViewConfig())
    np.testing.assert_array_equal(reused.nodes, fresh.nodes)
    np.testing.assert_array_equal(reused.influence, fresh.influence)
    np.testing.assert_array_equal(reused.input_abs, fresh.input_abs)
    for f in ("edge_target", "edge_source", "edge_weight", "edge_norm"):
        np.testing.assert_array_equal(getattr(reused, f), getattr(fresh, f))


@pytest.mark.parametrize("lines", [7, 256])
def test_top_mask_is_each_lines_k_largest_with_ties(monkeypatch, lines):
    """`_top_mask` (partitions of copies made `TOP_LINES` lines at a time, the last block short;
    columns transposed `TOP_BLOCK` rows at a time; zeros as distinct negative stand-ins)
    against a naive rank per row and per column: an entry is kept when fewer than k entries of
    its line are larger (ties with the k-th all kept; k = 25 is past the nonzero entries of
    most lines, whose zeros are then all kept)."""
    from viewer import embed

    monkeypatch.setattr(embed, "TOP_LINES", lines)
    monkeypatch.setattr(embed, "TOP_BLOCK", 6)
    rng = np.random.default_rng(3)
    score = np.round(rng.random((40, 33)), 1).astype(np.float32)  # many ties
    score[rng.random(score.shape) < 0.4] = 0
    for k in (1, 3, 10, 25):
        for axis in (1, 0):
            got = embed._top_mask(score, k, axis)
            s = score if axis == 1 else score.T
            want = (s[:, :, None] < s[:, None, :]).sum(-1) < k  # larger entries in its line
            np.testing.assert_array_equal(got, want if axis == 1 else want.T)

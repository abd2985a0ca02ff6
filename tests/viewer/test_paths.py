"""Top paths (`viewer.paths`): the k-best dynamic programme against enumerating every path of a
small hand-built DAG, and the page's paths against the graph's own adjacency (each edge
normalised by its target's whole row of |A|, as influence)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from tests.viewer.helpers import random_graph
from viewer.embed import ViewConfig, page_paths, select
from viewer.layout import LOGIT, TOKEN
from viewer.paths import heights, top_paths


def all_paths(n, src, tgt, w, start, end):
    """Every path start -> end by depth-first search: (score, nodes, edges)."""
    out_edges = [[e for e in range(len(src)) if src[e] == v and w[e] > 0] for v in range(n)]
    found = []

    def walk(v, nodes, edges, score):
        if v == end:
            found.append((score, tuple(nodes), tuple(edges)))
            return
        for e in out_edges[v]:
            walk(tgt[e], nodes + [tgt[e]], edges + [e], score * w[e])

    walk(start, [start], [], 1.0)
    return found


# A hand-built DAG: tokens 0, 1; middle nodes 2..6; targets 7, 8. Edges source -> target with
# weights chosen so that short and long paths interleave in the ranking.
EDGES = [(0, 2, .9), (0, 3, .5), (1, 3, .8), (1, 4, .6), (2, 5, .7), (3, 5, .9), (3, 6, .4),
         (4, 6, .95), (5, 7, .8), (6, 7, .6), (2, 7, .3), (1, 7, .05), (5, 8, .5), (6, 8, .9),
         (4, 8, .2), (2, 6, .35), (0, 8, .01), (6, 5, .5)]


@pytest.mark.parametrize("k", [1, 2, 3, 5, 8, 30])
def test_k_best_paths_equal_brute_force(k):
    src, tgt, w = (np.array(c) for c in zip(*EDGES))
    got = top_paths(9, src, tgt, w, starts=[0, 1], ends=[7, 8], k=k)
    for end in (7, 8):
        every = sorted((p for s in (0, 1) for p in all_paths(9, src, tgt, w, s, end)),
                       key=lambda p: -p[0])
        want = every[:k]
        assert len(got[end]) == len(want) == min(k, len(every))
        np.testing.assert_allclose([p.score for p in got[end]], [p[0] for p in want], rtol=1e-12)
        # The same paths (ties: none among these weights), their edges joining their nodes.
        assert [p.nodes for p in got[end]] == [p[1] for p in want]
        assert [p.edges for p in got[end]] == [p[2] for p in want]


def test_random_dags_equal_brute_force():
    rng = np.random.default_rng(3)
    for trial in range(20):
        n = 10
        pairs = [(s, t) for s, t in itertools.combinations(range(n), 2) if rng.random() < 0.35]
        src = np.array([p[0] for p in pairs])
        tgt = np.array([p[1] for p in pairs])
        w = rng.uniform(0.01, 1.0, len(pairs))
        w[rng.random(len(pairs)) < 0.1] = 0.0  # zero weights are no edge
        got = top_paths(n, src, tgt, w, starts=[0, 1, 2], ends=[8, 9], k=4)
        for end in (8, 9):
            every = sorted((p for s in (0, 1, 2) for p in all_paths(n, src, tgt, w, s, end)),
                           key=lambda p: -p[0])
            np.testing.assert_allclose([p.score for p in got[end]],
                                       [p[0] for p in every[:4]], rtol=1e-12, err_msg=str(trial))
            for p in got[end]:
                assert p.nodes[0] in (0, 1, 2) and p.nodes[-1] == end
                assert np.isclose(np.prod(w[list(p.edges)]), p.score)


def test_heights_and_cycles():
    src, tgt, _ = (np.array(c) for c in zip(*EDGES))
    h = heights(9, src, tgt)
    assert h[7] == h[8] == 0 and all(h[s] > h[t] for s, t in zip(src, tgt))
    assert h[1] == 4  # 1 -> 4 -> 6 -> 5 -> 7
    with pytest.raises(ValueError, match="cycle"):
        heights(3, np.array([0, 1, 2]), np.array([1, 2, 0]))


def test_page_paths_are_the_graphs():
    """Each page path goes from a token to a logit over held edges; its score is the product
    of |A[t, s]| / sum over the full row of |A[t, :]|, computed here from the adjacency."""
    g = random_graph(n_layers=4, n_pos=6, n_features=60, seed=5, connected=True)
    g.logit_probs[:] = [0.6, 0.0, 0.7]  # custom targets: weights need not be probabilities
    sel = select(g, ViewConfig(max_edges_per_node=6))
    found = page_paths(sel, 4)
    A = np.abs(g.adjacency.astype(np.float64))
    n = sel.nodes
    assert [t["target"] for t in found] == list(np.nonzero(sel.kind == LOGIT)[0])
    assert found[0]["paths"] and found[2]["paths"]
    for t in found:
        scores = [p[0] for p in t["paths"]]
        assert scores == sorted(scores, reverse=True)
        for score, nodes, edges in t["paths"]:
            assert sel.kind[nodes[0]] == TOKEN and nodes[-1] == t["target"]
            want = 1.0
            for e, (s, d) in zip(edges, itertools.pairwise(nodes)):
                assert (sel.edge_source[e], sel.edge_target[e]) == (s, d)
                want *= A[n[d], n[s]] / A[n[d]].sum()
            assert score == pytest.approx(want, rel=1e-3)


@pytest.mark.parametrize("wide", [False, True])
def test_grouped_top_is_the_lexsort_cut(wide):
    """`_grouped_top` (two stable sorts, the group's as int16 when it fits) against the lexsort
    it replaces and a naive loop per group: the k largest of each group, ties in index order,
    for groups past 2^15 too."""
    from viewer.paths import _grouped_top

    rng = np.random.default_rng(5)
    n = 3000
    group = rng.integers(0, 40, n) + (2**15 if wide else 0)
    value = np.round(rng.random(n), 2)  # many ties
    for k in (1, 3, 200):
        idx, rank = _grouped_top(group, value, k)
        order = np.lexsort((-value, group))
        g = group[order]
        first = np.searchsorted(g, g)  # each entry's group start, in the sorted order
        want = order[np.arange(n) - first < k]
        np.testing.assert_array_equal(idx, want)
        for gr in np.unique(group):  # naive: the group's entries by value, then index
            members = np.nonzero(group == gr)[0]
            best = sorted(members, key=lambda i: (-value[i], i))[:k]
            got = idx[group[idx] == gr]
            np.testing.assert_array_equal(got, best)
            np.testing.assert_array_equal(rank[group[idx] == gr], np.arange(len(best)))
    assert _grouped_top(group[:0], value[:0], 3)[0].size == 0

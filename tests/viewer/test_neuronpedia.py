"""Neuronpedia / circuit-tracer JSON: the export loads back into our Graph and matches the schema
(ids, fields, logit labels `Output "tok" (p=…)`); pinned subgraphs with supernodes; bad input."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from attribution.export import node_ids, to_neuronpedia, write_neuronpedia
from attribution.influence import cumulative_share
from attribution.prune import prune
from clt.configs import ConfigError
from tests.viewer.helpers import random_graph
from viewer.neuronpedia import (
    NODE_FIELDS,
    QPARAMS_FIELDS,
    from_neuronpedia,
    node_record,
    pinned_subgraph,
)

# circuit-tracer's frontend/graph_models.py: field -> accepted types.
SCHEMA = {"node_id": str, "feature": int, "layer": str, "ctx_idx": int, "feature_type": str,
          "token_prob": float, "is_target_logit": bool, "run_idx": int, "reverse_ctx_idx": int,
          "jsNodeId": str, "clerp": str, "influence": (float, type(None)),
          "activation": (float, type(None))}
META = {"slug": str, "scan": str, "transcoder_list": list, "prompt_tokens": list, "prompt": str,
        "node_threshold": (float, type(None)), "schema_version": int}
ID = {"cross layer transcoder": r"^\d+_\d+_\d+$", "mlp reconstruction error": r"^\d+_-1_\d+$",
      "embedding": r"^E_\d+_\d+$", "logit": r"^\d+_\d+_\d+$"}


def check_schema(data: dict) -> None:
    for k, tp in META.items():
        assert isinstance(data["metadata"][k], tp), k
    assert set(data["qParams"]) == set(QPARAMS_FIELDS)
    ids = [n["node_id"] for n in data["nodes"]]
    assert len(set(ids)) == len(ids)
    for n in data["nodes"]:
        assert set(n) == set(NODE_FIELDS)
        for k, tp in SCHEMA.items():
            assert isinstance(n[k], tp) and not (tp is int and isinstance(n[k], bool)), (k, n)
        assert re.match(ID[n["feature_type"]], n["node_id"]), n["node_id"]
        if n["feature_type"] == "logit":
            assert re.fullmatch(r'Output ".*" \(p=\d\.\d{3}\)', n["clerp"], re.DOTALL), n["clerp"]
    for lk in data["links"]:
        assert set(lk) == {"source", "target", "weight"} and lk["source"] in ids
        assert lk["target"] in ids and isinstance(lk["weight"], float)


@pytest.fixture(scope="module")
def graph():
    g = random_graph(n_layers=4, n_pos=7, n_features=80, n_logits=4, seed=7, connected=True)
    g.logit_strings[1] = 'say "hi"'  # quotes inside a logit label survive the round trip
    return g


@pytest.mark.parametrize("bad", [False, True])
def test_written_json_is_the_dicts_json(graph, tmp_path, bad):
    """`write_neuronpedia` writes its links as text: the file is `json.dumps` of
    `to_neuronpedia`'s dict, byte for byte (with a non-finite weight too: json's NaN)."""
    import dataclasses

    g = graph
    pruned = prune(g, 0.9, 0.99)
    if bad:
        t, s = pruned.edges()
        adj = g.adjacency.copy()
        adj[t[0], s[0]], adj[t[1], s[1]] = np.nan, -np.inf
        g = dataclasses.replace(g, adjacency=adj)
    path = write_neuronpedia(g, tmp_path / "g.json", pruned=pruned, node_threshold=0.9,
                             edge_threshold=0.99)
    want = json.dumps(to_neuronpedia(g, pruned, node_threshold=0.9, edge_threshold=0.99),
                      separators=(",", ":"))
    assert path.read_text() == want and len(json.loads(want)["links"]) == pruned.n_edges
    assert ("NaN" in want) == bad


def test_export_round_trips_into_our_graph(graph):
    pruned = prune(graph, 0.9, 0.99)
    text = json.dumps(to_neuronpedia(graph, pruned))
    data = json.loads(text)
    check_schema(data)
    back = from_neuronpedia(text)
    ids, back_ids = node_ids(graph), node_ids(back)
    assert set(back_ids) == {n["node_id"] for n in data["nodes"]}
    index = {nid: i for i, nid in enumerate(ids)}
    where = np.array([index[b] for b in back_ids])  # each node of `back` in `graph`
    r, rb = graph.ranges, back.ranges
    f = where[rb.feature] - r.feature.start
    np.testing.assert_array_equal(back.feature_layer, graph.feature_layer[f])
    np.testing.assert_array_equal(back.feature_pos, graph.feature_pos[f])
    np.testing.assert_array_equal(back.feature_index, graph.feature_index[f])
    np.testing.assert_allclose(back.activation, graph.activation[f])
    np.testing.assert_array_equal(back.tokens, graph.tokens)
    assert back.token_strings == graph.token_strings and back.prompt == graph.prompt
    assert back.logit_strings == graph.logit_strings and back.n_layers == graph.n_layers
    np.testing.assert_allclose(back.logit_probs, graph.logit_probs)
    assert back.bos == graph.bos
    # Links become the adjacency: the kept edges, to the JSON's 6 significant digits.
    want = np.where(pruned.edge_mask, graph.adjacency, 0)[np.ix_(where, where)]
    np.testing.assert_allclose(back.adjacency, want, rtol=5e-6, atol=0)
    assert np.array_equal(back.adjacency != 0, want != 0)
    # And our export of the reloaded graph lists the same nodes and links.
    again = to_neuronpedia(back, prune(back, 1.0, 1.0))
    assert {n["node_id"] for n in again["nodes"]} <= {n["node_id"] for n in data["nodes"]}


def test_node_records_by_hand(graph):
    """node_record (the one writer of records: the export, pinned subgraphs and the page use
    it) against records written out by hand from circuit-tracer's schema."""
    r = graph.ranges
    cum = np.linspace(0.0, 1.0, graph.n_nodes)
    base = {"token_prob": 0.0, "is_target_logit": False, "run_idx": 0, "reverse_ctx_idx": 0,
            "clerp": "", "activation": None}
    f = r.feature.start + 3
    a, i, p = (int(graph.feature_layer[3]), int(graph.feature_index[3]),
               int(graph.feature_pos[3]))
    assert node_record(graph, f, cum, "lbl") == base | {
        "node_id": f"{a}_{i}_{p}", "feature": (a + i) * (a + i + 1) // 2 + i, "layer": str(a),
        "ctx_idx": p, "feature_type": "cross layer transcoder", "jsNodeId": f"{a}_{i}-0",
        "clerp": "lbl", "influence": float(cum[f]), "activation": float(graph.activation[3])}
    e = r.error.start
    a, p = int(graph.error_layer[0]), int(graph.error_pos[0])
    assert node_record(graph, e, cum) == base | {
        "node_id": f"{a}_-1_{p}", "feature": -1, "layer": str(a), "ctx_idx": p,
        "feature_type": "mlp reconstruction error", "jsNodeId": f"{a}_-1-{p}",
        "influence": float(cum[e])}
    t = r.token.start + 2
    tok = int(graph.tokens[2])
    assert node_record(graph, t) == base | {
        "node_id": f"E_{tok}_2", "feature": 2, "layer": "E", "ctx_idx": 2,
        "feature_type": "embedding", "jsNodeId": f"E_{tok}-2", "influence": None}
    lg = r.logit.start
    tok, prob, last = int(graph.logit_tokens[0]), float(graph.logit_probs[0]), graph.n_pos - 1
    assert node_record(graph, lg, cum) == base | {
        "node_id": f"{graph.n_layers + 1}_{tok}_{last}", "feature": tok,
        "layer": str(graph.n_layers + 1), "ctx_idx": last, "feature_type": "logit",
        "jsNodeId": f"L_{tok}-{last}", "token_prob": prob, "is_target_logit": True,
        "clerp": f'Output "{graph.logit_strings[0]}" (p={prob:.3f})', "influence": None}
    # The export writes these records, with pruning's cumulative influence.
    pruned = prune(graph, 1.0, 1.0)
    data = to_neuronpedia(graph, pruned)
    index = {nid: i for i, nid in enumerate(node_ids(graph))}
    for n in data["nodes"]:
        assert node_record(graph, index[n["node_id"]], pruned.cumulative_scores) == n


def test_pinned_subgraph_with_supernodes(graph):
    ids = node_ids(graph)
    r = graph.ranges
    pins = [ids[r.feature.start], ids[r.feature.start + 40], ids[r.feature.stop - 1],
            ids[r.logit.start], ids[r.token.start + 3]]
    cum, _ = cumulative_share(np.asarray(prune(graph).influence, np.float64))
    out = pinned_subgraph(graph, pins, [["late", pins[1], pins[2]]], clicked_id=pins[0],
                          cumulative=cum, labels={(int(graph.feature_layer[0]),
                                                   int(graph.feature_index[0])): "first"})
    check_schema(out)
    assert [n["node_id"] for n in out["nodes"]] == pins
    assert out["nodes"][0]["clerp"] == "first"
    assert out["qParams"] == {"pinnedIds": pins, "supernodes": [["late", pins[1], pins[2]]],
                              "linkType": "both", "clickedId": pins[0], "sg_pos": ""}
    sel = [ids.index(p) for p in pins]
    sub = graph.adjacency[np.ix_(sel, sel)]
    assert len(out["links"]) == np.count_nonzero(sub)
    back = from_neuronpedia(out)
    assert set(node_ids(back)) >= set(pins)
    with pytest.raises(ConfigError, match="not in the graph"):
        pinned_subgraph(graph, ["99_1_1"])
    with pytest.raises(ConfigError, match="must be"):
        pinned_subgraph(graph, pins, [["lonely"]])


def test_bad_json_fails_in_one_line(graph, tmp_path):
    text = json.dumps(to_neuronpedia(graph))
    cases = {
        "truncated.json": (text[: len(text) // 2], "not valid JSON"),
        "v2.json": (text.replace('"schema_version": 1', '"schema_version": 2'),
                    "schema_version 2 is not supported"),
        "other.json": (json.dumps({"nodes": []}), "no 'metadata'"),
    }
    for name, (content, msg) in cases.items():
        p = tmp_path / name
        p.write_text(content)
        with pytest.raises(ConfigError, match=re.escape(msg)) as e:
            from_neuronpedia(p)
        assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="no graph JSON"):
        from_neuronpedia(tmp_path / "missing.json")

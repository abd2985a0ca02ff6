"""`cltrace view` on bad or hostile input: one line, nothing written, no allocation past what
a page holds (a 40,000-node graph JSON is refused before its dense adjacency is made)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.bad_inputs.harness import Case, run_case


def _node(nid, kind="cross layer transcoder", layer="0", ctx=1, **kw):
    return {"node_id": nid, "feature_type": kind, "layer": layer, "ctx_idx": ctx, **kw}


GOOD_JSON = {"metadata": {"prompt_tokens": ["<bos>", "a"], "schema_version": 1},
             "nodes": [_node("0_3_1"), _node("E_7_1", "embedding", "E"),
                       _node("3_5_1", "logit", "3", clerp='Output "x" (p=0.500)',
                             token_prob=0.5)],
             "links": [{"source": "E_7_1", "target": "0_3_1", "weight": 0.5},
                       {"source": "0_3_1", "target": "3_5_1", "weight": 1.0}]}


def _mutate(**changes) -> str:
    data = json.loads(json.dumps(GOOD_JSON))
    for k, v in changes.items():
        data[k] = v
    return json.dumps(data)


JSONS = {  # file name -> (text, expected message)
    "syntax.json": ('{"metadata": {', "is not valid JSON"),
    "empty.json": ("", "is not valid JSON"),
    "list.json": ("[1, 2]", "is not a graph JSON object"),
    "nonodes.json": ('{"metadata": {}, "links": []}', "no 'nodes'"),
    "nodes_obj.json": (_mutate(nodes={"a": 1}), "'nodes' must be a list"),
    "links_str.json": (_mutate(links="x"), "'links' must be a list"),
    "meta_list.json": (_mutate(metadata=[1]), "'metadata' must be a object"),
    "node_int.json": (_mutate(nodes=[1, 2]), "nodes and links must be objects"),
    "no_id.json": (_mutate(nodes=[{"feature_type": "embedding", "layer": "E", "ctx_idx": 0}]),
                   "lacks field 'node_id'"),
    "kind.json": (_mutate(nodes=[_node("0_1_1", "banana")]), "unknown feature_type"),
    "layer.json": (_mutate(nodes=[_node("0_1_1", layer="abc")]), "does not follow the schema"),
    "ctx.json": (_mutate(nodes=[_node("0_1_1", ctx="x")]), "does not follow the schema"),
    "id.json": (_mutate(nodes=[_node("zzz")], links=[]), "is malformed"),
    "link.json": (_mutate(links=[{"source": "nope", "target": "0_3_1", "weight": 1}]),
                  "names unknown node"),
    "weight.json": (_mutate(links=[{"source": "E_7_1", "target": "0_3_1", "weight": "w"}]),
                    "does not follow the schema"),
    "version.json": (_mutate(metadata={"schema_version": 99}), "schema_version 99"),
    "deep.json": ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    "binary.json": (None, "is not valid JSON"),
}


def _big_json(path, n=40_000):
    nodes = [_node(f"{i % 20}_{i}_{1 + i % 10}") for i in range(n)]
    path.write_text(json.dumps({"metadata": {"schema_version": 1}, "nodes": nodes,
                                "links": []}))


@pytest.fixture
def files(tmp_path_factory):
    from tests.attribution.test_prune import hand_graph

    d = tmp_path_factory.mktemp("view_inputs")
    g = hand_graph()
    good = g.save(d / "good.npz", full=True, exact=True)
    for name, (text, _) in JSONS.items():
        if text is None:
            (d / name).write_bytes(bytes(range(256)) * 4)
        else:
            (d / name).write_text(text)
    _big_json(d / "big.json")
    (d / "cut.npz").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (d / "text.npz").write_text("hello")
    with np.load(good) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(str(arrays["meta"]))
    np.savez(d / "n_nodes.npz", **{**arrays, "meta": np.array(json.dumps(
        {**meta, "n_nodes": 10**6}))})
    np.savez(d / "lengths.npz", **{**arrays, "feature_pos": arrays["feature_pos"][:2]})
    np.savez(d / "edges.npz", **{**arrays, "edge_source": arrays["edge_source"] + 1000})
    (d / "labels_bad.json").write_text("[1, 2]")
    (d / "empty_dir").mkdir()
    return d


BAD = [
    *[Case(("view", "{files}/" + name, "-o", "{tmp}/p.html"), msg, id=name)
      for name, (_, msg) in JSONS.items()],
    Case(("view", "{files}/big.json", "-o", "{tmp}/p.html"), "40,000 nodes, more than the 16,384",
         id="40k-nodes"),
    Case(("view", "{files}/big.json", "-o", "{tmp}/p.html", "--max-json-nodes", "100"),
         "raise --max-json-nodes", id="json-node-flag"),
    Case(("view", "{files}/nothing.npz"), "no graph at"),
    Case(("view", "{files}/empty_dir", "-o", "{tmp}/p.html"), "no graph at"),
    Case(("view", "{files}/cut.npz", "-o", "{tmp}/p.html"), "or is truncated"),
    Case(("view", "{files}/text.npz", "-o", "{tmp}/p.html"), "is not a cltrace graph"),
    Case(("view", "{files}/n_nodes.npz", "-o", "{tmp}/p.html"), "is not a cltrace graph"),
    Case(("view", "{files}/lengths.npz", "-o", "{tmp}/p.html"), "node arrays of different"),
    Case(("view", "{files}/edges.npz", "-o", "{tmp}/p.html"), "edge arrays do not fit"),
    *[Case(("view", "{files}/good.npz", "-o", "{tmp}/p.html", f"--{flag}", v), msg)
      for flag, v, msg in (
          ("max-influence", "0", "max_influence must be in (0, 1]"),
          ("max-influence", "nan", "max_influence must be in (0, 1]"),
          ("max-influence", "1.5", "max_influence must be in (0, 1]"),
          ("node-threshold", "2", "node_threshold must be in [0, 1]"),
          ("node-threshold", "nan", "node_threshold must be in [0, 1]"),
          ("node-budget", "0", "node_budget must be in [1, 100000]"),
          ("node-budget", "100001", "node_budget must be in [1, 100000]"),
          ("top-paths", "-1", "top_paths must be in"),
          ("max-nodes", "-1", "max_nodes must be >= 0"),
          ("max-edges", "-5", "max_edges must be >= 0"),
          ("max-edges-per-node", "-1", "max_edges_per_node must be >= 0"),
          ("strongest-edges", "-1", "strongest_edges must be >= 0"),
          ("suggested-supernodes", "-1", "suggested_supernodes must be >= 0"),
          ("max-json-nodes", "0", "max_json_nodes must be >= 1"),
          ("node-budget", "abc", "node_budget must be an integer"),
          ("max-influence", "x", "max_influence must be a number"))],
    Case(("view", "{files}/good.npz", "-o", "{dir}"), "is a directory"),
    Case(("view", "{files}/good.npz", "-o", "{file}/p.html"), "exists and is not a directory"),
    Case(("view", "{files}/good.npz", "-o", "/proc/cltrace-no/p.html"), "cannot create"),
    Case(("view", "{files}/good.npz", "-o", "{tmp}/p.html", "--labels", "{tmp}/none.json"),
         "no labels file"),
    Case(("view", "{files}/good.npz", "-o", "{tmp}/p.html", "--labels",
          "{files}/labels_bad.json"), "labels must be a JSON object"),
    Case(("view", "{files}/good.npz", "-o", "{tmp}/p.html", "--cards", "{tmp}/none.npz"),
         "no feature cards"),
    Case(("view",), "the following arguments are required"),
]


@pytest.mark.parametrize("case", BAD, ids=str)
def test_view_refuses(case, tmp_path, capsys, files):
    run_case(case, tmp_path, capsys, files=files)


def test_good_inputs_still_render(tmp_path, capsys, files):
    from cltrace.cli import main

    assert main(["view", str(files / "good.npz"), "-o", str(tmp_path / "g.html")]) == 0
    (tmp_path / "g.json").write_text(json.dumps(GOOD_JSON))
    assert main(["view", str(tmp_path / "g.json"), "-o", str(tmp_path / "j.html")]) == 0
    assert (tmp_path / "g.html").stat().st_size > 1000 and (tmp_path / "j.html").exists()


def test_oversized_files_are_refused_before_reading(files, tmp_path, capsys, monkeypatch):
    """A graph or cards file that would not fit once read (a zip bomb, or a hostile node count)
    is refused from its zip directory, before any array is read (limits lowered here)."""
    import attribution.graph
    import viewer.features

    monkeypatch.setattr(attribution.graph, "MAX_GRAPH_BYTES", 1000)
    run_case(Case(("view", "{files}/good.npz", "-o", "{tmp}/p.html"),
                  "more than the 0.0 GiB a graph file may hold"), tmp_path, capsys, files=files)
    monkeypatch.setattr(attribution.graph, "MAX_GRAPH_BYTES", 10**6)
    many = tmp_path / "many"
    many.mkdir()
    with np.load(files / "good.npz") as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(str(arrays["meta"]))
    n_extra = 2000  # 2,012 nodes: a 16 MB dense adjacency, over the lowered 1 MB
    arrays["tokens"] = np.zeros(2 + n_extra, np.int32)
    meta["token_strings"] = ["t"] * (2 + n_extra)
    meta["n_nodes"] = int(meta["n_nodes"]) + n_extra
    arrays["meta"] = np.array(json.dumps(meta))
    arrays["edge_indptr"] = np.concatenate([arrays["edge_indptr"],
                                            np.full(n_extra, arrays["edge_indptr"][-1])])
    np.savez(many / "g.npz", **arrays)
    run_case(Case(("view", str(many / "g.npz"), "-o", "{tmp}/p.html"),
                  "2,012 nodes: its dense adjacency would take"), tmp_path, capsys)
    monkeypatch.setattr(viewer.features, "MAX_CARDS_BYTES", 10)
    cards = tmp_path / "cards"
    cards.mkdir()
    np.savez(cards / "c.npz", meta=np.array("{}"), x=np.zeros(100))
    run_case(Case(("view", "{files}/good.npz", "-o", "{tmp}/p.html", "--cards",
                   str(cards / "c.npz")), "a feature-cards file may hold"), tmp_path, capsys,
             files=files)

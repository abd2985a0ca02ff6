"""The page is one self-contained file (no CDN, no external reference), holds what `select`
chose, is reproducible; `cltrace view` gives one-line errors for bad input."""

from __future__ import annotations

import base64
import gzip
import json
import re

import numpy as np
import pytest

from cltrace.cli import main
from tests.viewer.helpers import random_cards, random_graph
from viewer.embed import ViewConfig, select
from viewer.html import render_html, write_html


def page_blob(html: str, name: str):
    m = re.search(rf'<script type="application/octet-stream" id="{name}">([^<]*)</script>', html)
    text = m.group(1).strip()
    return json.loads(gzip.decompress(base64.b64decode(text))) if text else None


@pytest.fixture(scope="module")
def graph():
    return random_graph(n_layers=4, n_pos=8, n_features=120, seed=11, connected=True)


def test_page_is_self_contained(graph, tmp_path):
    report = write_html(graph, tmp_path / "g.html", cards=False)
    html = report.path.read_text(encoding="utf-8")
    # No reference to anything outside the file: no src/href attributes, no @import or url() to
    # a remote place, no CDN names, and no source map.
    assert not re.search(r"<(script|link|img|iframe)[^>]*\s(src|href)\s*=", html, re.IGNORECASE)
    assert not re.search(r"@import|url\(\s*['\"]?(https?:|//)", html, re.IGNORECASE)
    # (The gzip+base64 data blocks are left out of the name search: any short run of letters
    # turns up in them by chance.)
    code = re.sub(r'(<script type="application/octet-stream"[^>]*>)[A-Za-z0-9+/=]*', r"\1",
                  html).lower()
    assert len(code) < len(html)
    for name in ("cdn", "bootstrap", "jsdelivr", "unpkg", "cloudflare", "googleapis",
                 "sourceMappingURL"):
        assert name.lower() not in code, name
    assert "vis-network" in html and "window.cltrace" in html
    # options, graph data, cards data, vis-network, viewer (vis-network's code holds "<script>")
    assert len(re.findall(r"^<script", html, re.MULTILINE)) == 5


def test_page_holds_the_selection(graph, tmp_path):
    config = ViewConfig(max_nodes=50, max_edges_per_node=5, node_threshold=0.5)
    html, report = render_html(graph, config, cards=False)
    data = page_blob(html, "graph-data")
    sel = select(graph, config)
    assert len(data["kind"]) == len(sel.nodes) == report["nodes_held"]
    assert len(data["ew"]) == len(sel.edge_weight) == report["edges_held"]
    np.testing.assert_allclose(data["ew"], sel.edge_weight, rtol=1e-3)
    assert data["meta"]["node_threshold"] == 0.5
    assert data["meta"]["report"] == {**sel.report, "cards_note": "feature cards off"}
    assert data["tokens"] == graph.token_strings
    assert page_blob(html, "cards-data") is None
    # Reproducible: the same graph gives the same bytes.
    assert render_html(graph, config, cards=False)[0] == html


def test_cltrace_view_and_its_errors(graph, tmp_path, capsys):
    path = graph.save(tmp_path / "g.npz")
    assert main(["view", str(path), "--max-nodes", "30", "--no-cards"]) == 0
    assert (tmp_path / "g.html").exists()
    assert capsys.readouterr().out.startswith("page: ")  # a summary of what it holds
    # Another schema version.
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(str(arrays["meta"]))
    arrays["meta"] = np.array(json.dumps({**meta, "schema_version": 7}))
    np.savez(tmp_path / "v7.npz", **arrays)
    # A truncated file, and a file that is not a graph at all.
    (tmp_path / "cut.npz").write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    (tmp_path / "text.npz").write_text("hello")
    expected = {"v7.npz": "graph schema 7 is not supported",
                "cut.npz": "or is truncated",
                "text.npz": "is not a cltrace graph",
                "missing.npz": "no graph at"}
    for name, msg in expected.items():
        capsys.readouterr()
        assert main(["view", str(tmp_path / name), "-o", str(tmp_path / "x.html")]) == 2
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1, err
    # Bad flags and cards are one line too.
    capsys.readouterr()
    assert main(["view", str(path), "--cards", str(tmp_path / "nope.npz")]) == 2
    assert "no feature cards" in capsys.readouterr().err
    assert main(["view", str(path), "--max-influence", "0"]) == 2
    assert "max_influence" in capsys.readouterr().err
    # The node budget comes with the generated CLI, range-checked in one line.
    assert main(["view", str(path), "--node-budget", "0", "--no-cards"]) == 2
    err = capsys.readouterr().err
    assert "ViewConfig.node_budget must be in [1, 100000], got 0" in err and err.count("\n") == 1
    assert main(["view", str(path), "--node-budget", "7", "--no-cards", "-o",
                 str(tmp_path / "b.html")]) == 0
    data = page_blob((tmp_path / "b.html").read_text(encoding="utf-8"), "graph-data")
    assert data["meta"]["config"]["node_budget"] == 7


def test_cards_next_to_the_transcoder_are_found_or_skipped(graph, tmp_path):
    tc = tmp_path / "tc"
    tc.mkdir()
    g = random_graph(n_layers=4, n_pos=8, n_features=120, seed=11, connected=True)
    g.config["transcoder"] = str(tc)
    random_cards(4, 10_000).save(tc / "feature_cards.npz")
    assert write_html(g, tmp_path / "a.html").cards > 0
    # Cards of another transcoder shape: skipped with a note when found, refused when given.
    random_cards(3, 10_000).save(tc / "feature_cards.npz")
    report = write_html(g, tmp_path / "b.html")
    assert report.cards == 0 and "feature cards skipped" in report.summary()
    assert "skipped" in page_blob(report.path.read_text(), "graph-data")["meta"]["report"][
        "cards_note"]
    with pytest.raises(Exception, match="build cards for its transcoder"):
        write_html(g, tmp_path / "c.html", cards=tc / "feature_cards.npz")


def test_help_documents_every_field(capsys):
    from dataclasses import fields

    from viewer.features import FeaturesConfig

    for command, cls in (("view", ViewConfig), ("features", FeaturesConfig)):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = capsys.readouterr().out
        for f in fields(cls):
            if f.name != "schema_version":
                assert "--" + f.name.replace("_", "-") in text, (command, f.name)


def test_vis_options_are_pyvis_defaults_with_ours():
    """The page's vis-network options, written out (no pyvis import when a page is written),
    are pyvis's Network defaults with physics and dragging off, then ours."""
    from pyvis.network import Network

    from viewer.html import vis_options

    net = Network(directed=True, cdn_resources="remote")
    net.toggle_physics(False)
    net.toggle_drag_nodes(False)
    want = json.loads(net.options.to_json())
    want.pop("configure", None)
    want["layout"] = {"improvedLayout": False, "hierarchical": False}
    want["interaction"].update({"hover": True, "tooltipDelay": 250, "hideEdgesOnDrag": False,
                                "selectConnectedEdges": False, "multiselect": False,
                                "navigationButtons": False, "keyboard": False})
    want["edges"] = {"smooth": False, "chosen": False, "selectionWidth": 0, "hoverWidth": 0,
                     "arrows": {"to": {"enabled": True, "scaleFactor": 0.35}}}
    want["nodes"] = {"chosen": False, "borderWidth": 1, "font": {"size": 11}}
    assert vis_options() == want
    vis_options()["edges"]["smooth"] = True  # a copy: the next page's options are unchanged
    assert vis_options() == want


def test_writing_a_page_imports_no_pyvis(tmp_path):
    """vis-network's file is found without importing pyvis (0.4 s with networkx)."""
    import subprocess
    import sys

    code = ("import sys; from viewer.html import vis_network_js, vis_options; "
            "js = vis_network_js(); vis_options(); "
            "print(len(js) > 100000, 'pyvis' in sys.modules, 'networkx' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       check=False, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["True", "False", "False"]

"""`make demo`: `cltrace trace "The capital of France is" --model smollm2-135m` with the bundled
transcoder (no --transcoder), then the page it writes opened in headless Chromium, offline.

Checks: the command prints the scores and the page path last; the graph used the bundled
transcoder and has features; the page opens on the node budget's nodes (the rule restated in
`shown_mask`), with the edges among them drawn, labels written and top paths to every target,
with zero network requests; clicking the most influential feature shows its card from the
bundled feature cards."""

from __future__ import annotations

import re

import numpy as np
import pytest

from attribution.graph import Graph
from clt.bundled import bundled_transcoder
from tests.viewer.conftest import shown_mask, visible_nodes
from tests.viewer.helpers import click_node, network_events, wait_ready
from tests.viewer.test_html import page_blob

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from clt.configs import ConfigError
    from clt.lm.loading import resolve
    from cltrace.cli import main

    try:
        resolve("smollm2-135m")
    except ConfigError as e:  # the embedded model is installed by `make setup`
        pytest.skip(f"embedded SmolLM2 not installed ({e})")
    if bundled_transcoder("smollm2-135m") is None:
        pytest.fail("no transcoder bundled for smollm2-135m (clt/bundled/smollm2-135m)")
    out = tmp_path_factory.mktemp("demo")
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["trace", PROMPT, "--model", "smollm2-135m", "--out", str(out),
                     "--no-progress"]) == 0
    return out, buf.getvalue()


def test_demo_prints_scores_and_uses_the_bundle(demo):
    out, text = demo
    lines = text.strip().splitlines()
    assert lines[-1].startswith("page: ") and str(out / "graph.html") in lines[-1]
    m = re.search(r"replacement score ([\d.]+), completeness score ([\d.]+) \(unpruned\)", text)
    assert m, text
    rep, comp = float(m.group(1)), float(m.group(2))
    assert 0.0 < rep <= comp <= 1.0 + 1e-6
    graph = Graph.load(out / "graph.npz")
    assert graph.config["transcoder"] == "bundled:smollm2-135m"  # resolvable from any folder
    assert graph.ranges.feature.stop > 100
    assert " Paris" in graph.logit_strings
    assert np.isclose(graph.scores.replacement, rep, atol=1e-4)


def test_demo_page_renders_offline_with_cards(demo, browser):
    out, _ = demo
    page = out / "graph.html"
    html = page.read_text(encoding="utf-8")
    data, cards = page_blob(html, "graph-data"), page_blob(html, "cards-data")
    assert cards is not None and len(cards["cards"]) > 100  # the bundled feature cards
    browser.get(page.as_uri())
    wait_ready(browser)
    want = visible_nodes(data, data["meta"]["node_threshold"])
    assert browser.execute_script("return window.cltrace.state.net.body.nodeIndices.length") \
        == want > 20
    # The first view: at most the budget's feature and error nodes, their edges and labels.
    kind = np.asarray(data["kind"])
    mask = shown_mask(data, data["meta"]["node_threshold"])
    budget = data["meta"]["config"]["node_budget"]
    assert (mask & (kind <= 1)).sum() <= budget < (kind <= 1).sum()
    es, et = np.asarray(data["es"]), np.asarray(data["et"])
    between = set(np.nonzero(mask[es] & mask[et])[0].tolist())
    drawn = set(browser.execute_script("return window.cltrace.drawnEdges()"))
    labels = browser.execute_script("return window.cltrace.state.labelsDrawn")
    assert drawn == between and len(drawn) > budget and len(labels) >= 3
    print(f"\ndemo first view: {int(mask.sum())} nodes, {len(drawn)} edges, {len(labels)} labels")
    paths = {data["meta"]["logit_strings"][k]: t["paths"] for k, t in enumerate(data["paths"])}
    assert all(paths.values()) and paths[" Paris"][0][1][-1] == data["paths"][0]["target"]
    infl = np.asarray(data["infl"])
    visible = np.array(browser.execute_script(
        "return Array.from(window.cltrace.state.visible)"), bool)
    i = int(np.argmax(np.where((kind == 0) & visible, infl, -1)))
    click_node(browser, i)
    key = f"{data['layer'][i]}_{data['ref'][i]}"
    panel = browser.find_element("id", "panel").text
    assert key in cards["cards"] and "top activating examples" in panel.lower(), panel[:500]
    requested, failed = network_events(browser)
    assert failed == [] and requested == [page.as_uri()]

"""The page in a real browser: headless Chromium (Debian `chromium` + `chromium-driver`) under
Selenium, the network cut (dead proxy, no DNS, DevTools offline), opening a real graph traced and
carded end to end (see conftest.py).

Checks: the expected number of nodes is rendered (vis-network's own list of drawn nodes, at the
page's node budget); with the first view's edges turned off, a real mouse click on a feature
shows its card and exactly its edges; the pruning slider and the search box (by the canonical
name too); pinning, a supernode and the Neuronpedia export, equal to `pinned_subgraph`'s and
loadable into our Graph; and zero failed (or any) network requests. The first view itself (node
budget, labels, its edges, top paths, suggested supernodes, the steer command) is
test_first_view.py's. A screenshot is saved in the test's
temp dir (path printed; run with -s to see it)."""

from __future__ import annotations

import numpy as np
import pytest

from attribution.graph import Graph
from attribution.influence import cumulative_share
from tests.viewer.conftest import visible_nodes
from tests.viewer.helpers import click_node, js, network_events, next_frame, view_edges, wait_ready
from tests.viewer.test_html import page_blob
from viewer.embed import ViewConfig, select
from viewer.features import FeatureCards
from viewer.neuronpedia import from_neuronpedia, pinned_subgraph


@pytest.fixture(scope="module")
def page(request, browser):
    """(driver, page data, cards data, pipeline); the pipeline is asked for only once the browser
    is known to exist, so that a machine without one skips at once."""
    pipeline = request.getfixturevalue("pipeline")
    html = pipeline.page.read_text(encoding="utf-8")
    browser.get(pipeline.page.as_uri())
    wait_ready(browser)
    return browser, page_blob(html, "graph-data"), page_blob(html, "cards-data"), pipeline


def expected_edges(data, i, visible):
    es, et = np.asarray(data["es"]), np.asarray(data["et"])
    return {e for e in range(len(es)) if (et[e] == i and visible[es[e]])
            or (es[e] == i and visible[et[e]])}


def test_nodes_rendered_and_no_network(page):
    driver, data, cards, pipeline = page
    graph = Graph.load(pipeline.graph)
    sel = select(graph, ViewConfig())
    n_held = len(sel.nodes)
    assert len(data["kind"]) == n_held
    want = visible_nodes(data, data["meta"]["node_threshold"])
    assert 10 < want < n_held  # the slider hides some
    # vis-network's own list of the nodes it draws, our counter, and our count agree.
    assert js(driver, "return S.net.body.nodeIndices.length") == want
    assert js(driver, "return S.nodes.length") == n_held
    counter = driver.find_element("id", "counter")
    assert counter.get_attribute("data-shown") == str(want)
    assert counter.text.startswith(f"Showing {want} of {n_held} nodes")
    assert f"not in this file: {sel.report['nodes_left_out']} nodes" in counter.text
    requested, failed = network_events(driver)
    assert failed == [] and requested == [pipeline.page.as_uri()]
    assert js(driver, "return performance.getEntriesByType('resource').length") == 0
    feats = {f"{a}_{f}" for k, a, f in zip(data["kind"], data["layer"], data["ref"]) if k == 0}
    assert cards is not None and set(cards["cards"]) == feats  # one card per (layer, feature)


def test_click_a_feature_shows_its_card_and_edges(page, tmp_path):
    driver, data, _, pipeline = page
    kind, infl = np.asarray(data["kind"]), np.asarray(data["infl"])
    visible = np.array(js(driver, "return Array.from(S.visible)"), bool)
    i = int(np.argmax(np.where((kind == 0) & visible, infl, -1)))  # the most influential feature
    view_edges(driver, False)  # only the clicked node's edges, below
    click_node(driver, i)
    assert js(driver, "return S.clicked") == i
    # The card: its label, facts and top examples with the activating token highlighted.
    cards = FeatureCards.load(pipeline.cards)
    layer, f = data["layer"][i], data["ref"][i]
    card = cards.card(layer, f)
    assert driver.find_element("id", "card-label").text == card["label"]
    info = driver.find_element("id", "node-info").text
    assert f"layer {layer} · feature {f}" in info and "top output tokens" in info.lower()
    top = driver.find_elements("css selector", "#card-top .ex")
    assert len(top) == len(card["top"]) > 0
    assert len(driver.find_elements("css selector", "#card-top .ex span.max")) == len(top)
    # Exactly its held edges to visible nodes are drawn, and listed in the panel.
    drawn = set(js(driver, "return C.drawnEdges()"))
    assert drawn == expected_edges(data, i, visible) and drawn
    assert len(driver.find_elements("css selector", "#node-info .link")) > 0
    assert js(driver, "return C.lastClickMs") < 1000
    shot = tmp_path / "viewer.png"
    driver.save_screenshot(str(shot))
    print(f"\nscreenshot: {shot}")
    assert shot.stat().st_size > 20_000
    # Clicking an input in the panel selects that node.
    link = driver.find_elements("css selector", "#node-info .link")[0]
    j = int(link.get_attribute("data-node"))
    link.click()
    assert js(driver, "return S.clicked") == j
    requested, failed = network_events(driver)
    assert failed == [] and set(requested) <= {pipeline.page.as_uri()}  # nothing but the page


def test_slider_search_strongest_edges_and_hover(page):
    from selenium.webdriver.common.keys import Keys

    driver, data, *_ = page
    slider = driver.find_element("id", "threshold")
    slider.send_keys(Keys.HOME)  # the slider's real keyboard control: to its minimum (0.01)
    next_frame(driver)  # the slider applies on the next animation frame
    low = visible_nodes(data, 0.01)
    assert js(driver, "return S.net.body.nodeIndices.length") >= low
    slider.send_keys(Keys.END)
    next_frame(driver)
    high = visible_nodes(data, data["meta"]["config"]["max_influence"])
    assert js(driver, "return S.net.body.nodeIndices.length") == high >= low
    kind = np.asarray(data["kind"])
    i = int(np.nonzero(kind == 0)[0][-1])
    box = driver.find_element("id", "search")
    box.clear()
    box.send_keys(f"L{data['layer'][i]} #{data['ref'][i]}", Keys.ENTER)
    assert js(driver, "return S.clicked") == i
    assert driver.find_element("id", "search-info").text.startswith("1 match")
    js(driver, "C.select(-1)")
    box.clear()
    box.send_keys(data["name"][i], Keys.ENTER)  # the canonical LAYER:FEATURE@POS
    assert js(driver, "return S.clicked") == i
    assert driver.find_element("id", "search-info").text.startswith("1 match")
    view_edges(driver, False)
    # Strongest edges: the toggle adds edges with |w| >= frac * max among visible nodes, up to
    # the cap, to the clicked node's. (The pointer first leaves the canvas: no hovered node.)
    driver.execute_cdp_cmd("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": 5, "y": 5})
    next_frame(driver)
    assert js(driver, "return S.hovered") == -1
    visible = np.array(js(driver, "return Array.from(S.visible)"), bool)
    own = expected_edges(data, i, visible)
    assert set(js(driver, "return C.drawnEdges()")) == own
    driver.find_element("id", "strong-on").click()
    next_frame(driver)  # edges are redrawn on the next animation frame
    frac, cap = js(driver, "return [S.strong.frac, S.strong.cap]")
    ew, es, et = (np.asarray(data[k]) for k in ("ew", "es", "et"))
    strong = [e for e in range(len(ew)) if abs(ew[e]) >= frac * abs(ew[0])
              and visible[es[e]] and visible[et[e]] and e not in own][:cap]
    assert strong and set(js(driver, "return C.drawnEdges()")) == own | set(strong)
    driver.find_element("id", "strong-on").click()
    next_frame(driver)
    assert set(js(driver, "return C.drawnEdges()")) == own
    # Hovering another node draws its edges too.
    j = int(np.nonzero(np.asarray(data["kind"]) == 2)[0][-1])  # the last token
    p = js(driver, "const p = C.domPosition(arguments[0]), r = document.querySelector("
           "'#graph canvas').getBoundingClientRect(); return {x: r.left + p.x, y: r.top + p.y}", j)
    driver.execute_cdp_cmd("Input.dispatchMouseEvent", {"type": "mouseMoved", **p})
    next_frame(driver)
    assert js(driver, "return S.hovered") == j
    assert set(js(driver, "return C.drawnEdges()")) == own | expected_edges(data, j, visible)


def test_pins_supernode_and_export(page):
    driver, data, _, pipeline = page
    kind = np.asarray(data["kind"])
    visible = np.array(js(driver, "return Array.from(S.visible)"), bool)
    feats = [int(i) for i in np.nonzero((kind == 0) & visible)[0][:3]]
    logit = int(np.nonzero(kind == 3)[0][0])
    js(driver, "C.select(arguments[0])", feats[0])
    driver.find_element("id", "pin-btn").click()  # the panel's pin button
    click_node(driver, feats[1], shift=True)  # shift-click pins
    for i in (feats[2], logit):
        js(driver, "C.pin(arguments[0])", i)
    rows = driver.find_elements("css selector", "#subgraph input[data-pin]")
    assert [int(r.get_attribute("data-pin")) for r in rows] == [feats[0], feats[1], feats[2],
                                                                 logit]
    rows[1].click()
    rows[2].click()
    driver.find_element("id", "super-name").send_keys("my group")
    driver.find_element("id", "group-btn").click()
    out = js(driver, "return C.exportSubgraph()")
    ids = [data["id"][i] for i in (feats[0], feats[1], feats[2], logit)]
    assert out["qParams"]["pinnedIds"] == ids
    assert out["qParams"]["supernodes"] == [["my group", ids[1], ids[2]]]
    # The same JSON from Python (all edges among these nodes are held in this small page).
    graph = Graph.load(pipeline.graph)
    cards = FeatureCards.load(pipeline.cards)
    cum, _ = cumulative_share(select(graph, ViewConfig()).influence)
    labels = {(data["layer"][i], data["ref"][i]): cards.card(data["layer"][i],
                                                             data["ref"][i])["label"]
              for i in feats}
    ref = pinned_subgraph(graph, ids, [["my group", ids[1], ids[2]]],
                          clicked_id=out["qParams"]["clickedId"], cumulative=cum, labels=labels,
                          node_threshold=out["metadata"]["node_threshold"])
    assert out["qParams"] == ref["qParams"]
    assert out["metadata"] == {**ref["metadata"], "info": out["metadata"]["info"]}
    for a, b in zip(out["nodes"], ref["nodes"]):
        for key in b:
            if isinstance(b[key], float):
                assert a[key] == pytest.approx(b[key], rel=1e-3), key
            else:
                assert a[key] == b[key], key

    def ends(links):
        return sorted((lk["source"], lk["target"]) for lk in links)

    assert ends(out["links"]) == ends(ref["links"])
    back = from_neuronpedia(out)
    assert back.n_layers == graph.n_layers and len(back.feature_layer) == 3

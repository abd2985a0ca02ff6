"""The page's first view in headless Chromium (the harness of test_browser.py: network cut,
real clicks and keys), on a graph whose answers are known: a random graph with planted twin
features (`plant_twins`), random feature cards, a prompt full of shell metacharacters.

Checks: the page opens on exactly the `node_budget` most influential feature and error nodes by
`node_influence` (plus tokens and logits), their edges drawn and their labels written (card
label, else `LAYER:FEATURE@POS`), error nodes smaller and faded; typing a budget changes the
view; the top-paths panel lists, per target, paths from a token ending at that target whose
scores are products of the adjacency's normalised weights, and a click highlights one; the
planted twins are suggested and the suggestion can be renamed, accepted (a real supernode, in the
export) or dissolved; the "copy intervention" text goes through shlex and `cltrace steer`'s own
parser to exactly the pinned features' edits."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from attribution.interventions import FeatureEdit, parse_edit
from attribution.prune import node_influence
from tests.viewer.conftest import shown_mask
from tests.viewer.helpers import (
    click_node,
    js,
    network_events,
    next_frame,
    plant_twins,
    random_cards,
    random_graph,
    wait_ready,
)
from tests.viewer.test_html import page_blob
from tests.viewer.test_names import parse_steer
from viewer.embed import ViewConfig
from viewer.html import write_html
from viewer.names import steer_command

BUDGET = 20
PROMPT = "It's a \"test\": $HOME `id` \\ & ; done"


@pytest.fixture(scope="module")
def view(browser, tmp_path_factory):
    """(driver, page data, cards data, graph, planted pairs as graph node indices)."""
    g = random_graph(n_layers=6, n_pos=6, n_features=150, seed=7, connected=True)
    pairs = plant_twins(g, BUDGET)
    g.prompt = PROMPT
    g.config.update(model="tiny model", transcoder="/tmp/some dir/tc")
    cards = random_cards(6, 10_000)
    path = tmp_path_factory.mktemp("first_view") / "page.html"
    write_html(g, path, cards=cards, config=ViewConfig(node_budget=BUDGET))
    html = path.read_text(encoding="utf-8")
    browser.get(path.as_uri())
    wait_ready(browser)
    return browser, page_blob(html, "graph-data"), page_blob(html, "cards-data"), g, pairs


def shown(driver) -> set[int]:
    """The nodes vis-network itself draws."""
    return set(js(driver, "return S.net.body.nodeIndices.map(Number)"))


def expected_text(data, cards, i) -> str:
    c = cards["cards"].get(f"{data['layer'][i]}_{data['ref'][i]}")
    t = data["label"][i] or (c["label"] if c else "") or data["name"][i]
    return t if len(t) <= 28 else t[:27] + "…"


def test_opens_on_the_budget_with_edges_and_labels(view):
    driver, data, cards, g, _ = view
    kind = np.asarray(data["kind"])
    n_src = g.ranges.token.start
    # The budget's nodes are the graph's most influential feature and error nodes.
    top = np.argsort(-node_influence(g)[:n_src], kind="stable")[:BUDGET]
    page_of = {int(node): i for i, node in enumerate(data_nodes(data, g))}
    want = {page_of[int(n)] for n in top} | set(np.nonzero(kind >= 2)[0].tolist())
    got = shown(driver)
    assert got == want and len(got) == BUDGET + g.n_pos + len(g.logit_tokens) < len(kind)
    assert got == set(np.nonzero(shown_mask(data, data["meta"]["node_threshold"]))[0].tolist())
    # Their edges are drawn from the start: every held edge between two shown nodes.
    es, et = np.asarray(data["es"]), np.asarray(data["et"])
    between = {e for e in range(len(es)) if es[e] in got and et[e] in got}
    assert len(between) > BUDGET and set(js(driver, "return C.drawnEdges()")) == between
    assert set(js(driver, "return S.edges.getIds()")) == between  # in vis-network's data set
    # Labels: the card's label (else the canonical name) beside shown features, not overlapping.
    drawn = js(driver, "return S.labelsDrawn")
    assert len(drawn) >= 5
    for i, text in drawn:
        assert i in got and kind[i] == 0 and text == expected_text(data, cards, i)
    # Zoomed in on a feature whose label did not fit, its label is written.
    missing = [i for i in got if kind[i] == 0 and i not in {d[0] for d in drawn}]
    if missing:
        i = missing[0]
        js(driver, "S.net.moveTo({position: {x: S.D.x[arguments[0]], y: S.D.y[arguments[0]]},"
           "scale: 15, animation: false})", i)
        next_frame(driver)
        assert [i, expected_text(data, cards, i)] in js(driver, "return S.labelsDrawn")
        js(driver, "C.fit(false)")
    # Error nodes: smaller than any feature, faded.
    err, feat = int(np.nonzero(kind == 1)[0][0]), int(np.nonzero(kind == 0)[0][0])
    e_node, f_node = js(driver, "return [S.nodes.get(arguments[0]), S.nodes.get(arguments[1])]",
                        err, feat)
    assert e_node["size"] < 4 <= f_node["size"]
    assert e_node["color"]["background"].startswith("rgba(") and \
        float(e_node["color"]["background"].rsplit(",", 1)[1].rstrip(")")) < 1


def data_nodes(data, g):
    """The graph node index of each page node, from the page's own ids."""
    from attribution.export import node_ids

    ids = {nid: i for i, nid in enumerate(node_ids(g))}
    return [ids[nid] for nid in data["id"]]


def test_budget_control_changes_the_view(view):
    from selenium.webdriver.common.keys import Keys

    driver, data, *_ = view
    box = driver.find_element("id", "budget")
    for n in (5, 33, BUDGET):
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(str(n))
        next_frame(driver)
        want = set(np.nonzero(shown_mask(data, data["meta"]["node_threshold"], budget=n))[0])
        assert shown(driver) == want
        assert sum(1 for i in want if data["kind"][i] <= 1) == n


def test_canonical_names_in_panel(view):
    driver, data, *_ = view
    kind = np.asarray(data["kind"])
    i = int(next(j for j in js(driver, "return S.order") if kind[j] == 0))
    click_node(driver, i)
    assert js(driver, "return S.clicked") == i
    head = driver.find_element("css selector", "#node-info h2").text
    assert head.startswith(f"{data['layer'][i]}:{data['ref'][i]}@{data['pos'][i]} ")
    js(driver, "C.select(-1)")
    # Search by the name without @POS: that feature at every position held.
    js(driver, "C.search(arguments[0])", f"{data['layer'][i]}:{data['ref'][i]}")
    want = [j for j in range(len(kind)) if kind[j] == 0 and data["layer"][j] == data["layer"][i]
            and data["ref"][j] == data["ref"][i]]
    assert js(driver, "return S.matches") == want
    js(driver, "C.search('')")


def test_top_paths_panel(view):
    driver, data, _, g, _ = view
    kind = np.asarray(data["kind"])
    nodes = data_nodes(data, g)
    A = np.abs(g.adjacency.astype(np.float64))
    rows = driver.find_elements("css selector", "#paths .path")
    assert len(rows) == sum(len(t["paths"]) for t in data["paths"]) > 0
    assert {t["target"] for t in data["paths"]} == set(np.nonzero(kind == 3)[0].tolist())
    for t in data["paths"]:
        for score, path, edges in t["paths"]:
            assert kind[path[0]] == 2 and path[-1] == t["target"]  # token ... target
            want = np.prod([A[nodes[d], nodes[s]] / A[nodes[d]].sum()
                            for s, d in itertools.pairwise(path)])
            assert score == pytest.approx(want, rel=1e-3)
            assert [(data["es"][e], data["et"][e]) for e in edges] == list(itertools.pairwise(path))
    # Click the second path of the first target that has two: it is highlighted.
    a = next(k for k, t in enumerate(data["paths"]) if len(t["paths"]) > 1)
    _, path, edges = data["paths"][a]["paths"][1]
    row = driver.find_element("css selector", f'#paths .path[data-path="{a},1"]')
    row.click()
    next_frame(driver)
    assert "active" in row.get_attribute("class")
    assert set(js(driver, "return [...S.hl.nodes]")) == set(path)
    assert set(path) <= shown(driver)  # shown even where outside the budget
    assert set(edges) <= set(js(driver, "return C.drawnEdges()"))
    colours = js(driver, "return arguments[0].map(e => S.edges.get(e).color.color)", edges)
    assert set(colours) == {"#ff7f0e"}
    assert {js(driver, "return S.nodes.get(arguments[0]).color.border", i) for i in path} == \
        {"#ff7f0e"}
    row.click()  # again: cleared
    next_frame(driver)
    assert js(driver, "return S.hl.nodes.size") == 0 and "active" not in row.get_attribute("class")


def test_suggested_supernodes(view):
    driver, data, _, g, pairs = view
    page_of = {node: i for i, node in enumerate(data_nodes(data, g))}
    suggest = data["suggest"]
    assert pairs and suggest
    a, b = pairs[0]
    k = next(k for k, s in enumerate(suggest) if {page_of[a], page_of[b]} <= set(s["members"]))
    boxes = driver.find_elements("css selector", "#suggest .sugg")
    assert len(boxes) == len(suggest)
    # Dissolve: the suggestion goes, nothing is pinned or grouped.
    driver.find_element("css selector", f'#suggest button[data-dissolve="{k}"]').click()
    assert len(driver.find_elements("css selector", "#suggest .sugg")) == len(suggest) - 1
    assert js(driver, "return [S.pinned.length, S.supers.length]") == [0, 0]
    driver.refresh()  # the page afresh: the suggestion is back
    wait_ready(driver)
    # Rename, then accept: the members are pinned and grouped under the new name.
    name = driver.find_element("css selector", f'#suggest input[data-sname="{k}"]')
    name.clear()
    name.send_keys("twins")
    driver.find_element("css selector", f'#suggest button[data-accept="{k}"]').click()
    members = suggest[k]["members"]
    assert js(driver, "return S.supers.map(s => [s.name, s.members])") == [["twins", members]]
    assert js(driver, "return S.pinned") == members
    out = js(driver, "return C.exportSubgraph()")
    assert out["qParams"]["supernodes"] == [["twins"] + [data["id"][i] for i in members]]
    assert len(driver.find_elements("css selector", "#suggest .sugg")) == len(suggest) - 1
    # Rename the accepted supernode in the pinned panel.
    box = driver.find_element("css selector", '#subgraph input[data-rename="0"]')
    box.send_keys(" 2")
    assert js(driver, "return S.supers[0].name") == "twins 2"
    driver.find_element("id", "clear-btn").click()
    assert js(driver, "return [S.pinned.length, S.supers.length]") == [0, 0]


def test_copy_intervention_round_trips(view):
    driver, data, _, g, _ = view
    kind = np.asarray(data["kind"])
    order = [i for i in js(driver, "return S.order") if kind[i] == 0][:3]
    err = int(np.nonzero(kind == 1)[0][0])
    for i in order[:2]:
        js(driver, "C.pin(arguments[0])", i)
    click_node(driver, order[2], shift=True)  # shift-click pins
    js(driver, "C.pin(arguments[0])", err)  # an error node is not a feature: no edit
    driver.find_element("id", "steer-btn").click()
    text = driver.find_element("id", "steer-cmd").get_attribute("value")
    assert text == js(driver, "return C.copied") != ""
    names = [data["name"][i] for i in order]
    assert text == steer_command(g, names)
    sc = parse_steer(text)
    assert sc.prompt == PROMPT and sc.model == "tiny model" and sc.transcoder == "/tmp/some dir/tc"
    edits = tuple(parse_edit(s) for s in sc.edit_specs())
    assert edits == tuple(FeatureEdit(data["layer"][i], data["ref"][i], data["pos"][i])
                          for i in order)
    assert driver.find_element("id", "steer-note").text in ("copied", "selected: press Ctrl+C")
    requested, failed = network_events(driver)
    assert failed == [] and all(u.startswith("file://") for u in requested)

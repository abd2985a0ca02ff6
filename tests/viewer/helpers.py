"""Random attribution graphs (no model needed) and a headless-Chromium driver for the viewer's
tests and benchmark."""

from __future__ import annotations

import os
import shutil

import numpy as np

from attribution.graph import Graph, error_nodes


def random_graph(n_layers: int = 4, n_pos: int = 6, n_features: int = 40, n_logits: int = 3,
                 edges_per_target: int = 8, seed: int = 0, bos: bool = True,
                 connected: bool = False) -> Graph:
    """A random acyclic graph with the structure of a real one: features read from features of
    lower layers at earlier or equal positions, errors and tokens; logits read from everything.
    Each target gets about `edges_per_target` incoming edges (at least one from a token, so that
    every feature has a path from the input); with `connected`, also at least one outgoing edge
    to a later feature or a logit (so that every node has influence on the logits)."""
    rng = np.random.default_rng(seed)
    first = 1 if bos else 0
    layer = np.sort(rng.integers(0, n_layers, n_features)).astype(np.int32)
    pos = rng.integers(first, n_pos, n_features).astype(np.int32)
    order = np.lexsort((pos, layer))
    layer, pos = layer[order], pos[order]
    index = rng.choice(10_000, n_features, replace=False).astype(np.int32)
    err_layer, err_pos = error_nodes(n_layers, n_pos, bos)
    F, E, T = n_features, len(err_layer), n_pos
    N = F + E + T + n_logits
    src_layer = np.concatenate([layer, err_layer, np.full(T, -1)])
    src_pos = np.concatenate([pos, err_pos, np.arange(T)])
    A = np.zeros((N, N), np.float32)
    targets = list(range(F)) + list(range(F + E + T, N))
    for t in targets:
        if t < F:
            ok = (src_layer < layer[t]) & (src_pos <= pos[t])
        else:
            ok = np.ones(F + E + T, bool)
        cand = np.nonzero(ok)[0]
        k = min(len(cand), edges_per_target)
        chosen = rng.choice(cand, k, replace=False)
        A[t, chosen] = rng.normal(size=k) * rng.uniform(0.1, 2.0)
        tok = F + E + (pos[t] if t < F else n_pos - 1)
        A[t, tok] += rng.uniform(0.2, 1.0)
    if connected:  # every feature and error reaches a later feature or a logit: all have influence
        tgt_layer = np.concatenate([layer, np.full(n_logits, n_layers)])
        tgt_pos = np.concatenate([pos, np.full(n_logits, n_pos - 1)])
        tgt_node = np.concatenate([np.arange(F), np.arange(F + E + T, N)])
        for s in range(F + E):
            ok = np.nonzero((tgt_layer > src_layer[s]) & (tgt_pos >= src_pos[s]))[0]
            A[tgt_node[rng.choice(ok)], s] += rng.normal() * rng.uniform(0.1, 2.0)
    probs = np.sort(rng.dirichlet(np.ones(n_logits)))[::-1].astype(np.float32) * 0.9
    words = ["Paris", "London", "the", "Rome", "a", "Berlin", "Madrid", "it", "of", "and"]
    return Graph(
        tokens=rng.integers(3, 1000, n_pos).astype(np.int32),
        token_strings=(["<bos>"] if bos else []) + [f" w{i}" for i in range(n_pos - first)],
        feature_layer=layer, feature_pos=pos, feature_index=index,
        activation=rng.uniform(0.1, 5.0, F).astype(np.float32), error_layer=err_layer,
        error_pos=err_pos, logit_tokens=rng.choice(1000, n_logits, replace=False).astype(np.int32),
        logit_strings=[f" {words[i % len(words)]}{i // len(words) or ''}" for i in range(n_logits)],
        logit_probs=probs, adjacency=A, n_layers=n_layers, bos=bos,
        prompt="The capital of France is",
        config={"node_threshold": 0.8, "transcoder": ""},
        info={"model": "random", "transcoder": {"n_layers": n_layers, "n_features": 10_000}},
        n_active_total=F)


def chromium_paths() -> tuple[str, str] | None:
    """(browser, driver) of the system's Chromium, or None."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def start_chromium(width: int = 1400, height: int = 900):
    """Headless Chromium under Selenium with the network cut: every host resolves to nothing
    and every request goes to a dead proxy, and DevTools emulates an offline connection. The
    performance log records every request and failure (Network.* DevTools events)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver = chromium_paths()
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={width},{height}", "--proxy-server=http://127.0.0.1:9",
                "--host-resolver-rules=MAP * ~NOTFOUND", "--no-first-run",
                "--disable-background-networking", "--disable-extensions",
                "--allow-file-access-from-files"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    d = webdriver.Chrome(service=Service(driver, log_output=os.devnull), options=opts)
    d.execute_cdp_cmd("Network.enable", {})
    d.execute_cdp_cmd("Network.emulateNetworkConditions", {
        "offline": True, "latency": 0, "downloadThroughput": 0, "uploadThroughput": 0})
    return d


def network_events(driver) -> tuple[list[str], list[str]]:
    """(URLs requested, failures) from the performance log since the last call."""
    import json

    requested, failed = [], []
    for entry in driver.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        if msg["method"] == "Network.requestWillBeSent":
            requested.append(msg["params"]["request"]["url"])
        elif msg["method"] == "Network.loadingFailed":
            failed.append(f"{msg['params'].get('errorText')} ({msg['params'].get('type')})")
    return requested, failed


def wait_ready(driver, timeout: float = 60.0) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout, poll_frequency=0.05).until(
        lambda d: d.execute_script("return !!(window.cltrace && window.cltrace.ready)"))
    errors = driver.execute_script("return window.cltrace.errors")
    if errors:
        raise AssertionError(f"the page reported: {errors}")


def random_cards(n_layers: int, n_features: int, vocab: int = 500, k: int = 8, q: int = 4,
                 window: int = 16, context_length: int = 64, n_contexts: int = 256, seed: int = 0):
    """A FeatureCards of the right shapes with random content (size and page tests)."""
    from viewer.features import CARDS_SCHEMA_VERSION, FeatureCards

    rng = np.random.default_rng(seed)
    L, F = n_layers, n_features
    acts = np.sort(rng.uniform(0.1, 10, (L, F, k)), axis=-1)[..., ::-1].astype(np.float32)
    arrays = {
        "density": rng.uniform(0, 0.05, (L, F)).astype(np.float32), "top_act": acts,
        "smp_act": np.sort(rng.uniform(0.1, 5, (L, F, q)), axis=-1)[..., ::-1].astype(np.float32),
        "top_win": rng.integers(0, 256, (L, F, k, window)).astype(np.uint8),
        "smp_win": rng.integers(0, 256, (L, F, q, window)).astype(np.uint8),
        "top_pos": rng.integers(0, context_length, (L, F, k)).astype(np.int16),
        "smp_pos": rng.integers(0, context_length, (L, F, q)).astype(np.int16),
        "top_ctx": rng.integers(0, n_contexts, (L, F, k)).astype(np.int32),
        "smp_ctx": rng.integers(0, n_contexts, (L, F, q)).astype(np.int32),
        "contexts": rng.integers(0, vocab, (n_contexts, context_length)).astype(np.int32),
        "vocab_ids": np.arange(vocab, dtype=np.int32)}
    for sign in ("pos", "neg"):
        arrays[f"out_{sign}_tok"] = rng.integers(0, vocab, (L, F, 8)).astype(np.int32)
        arrays[f"out_{sign}_val"] = rng.normal(size=(L, F, 8)).astype(np.float32)
    meta = {"kind": "feature_cards", "schema_version": CARDS_SCHEMA_VERSION, "n_layers": L,
            "n_features": F, "window_before": (window * 3) // 4, "n_tokens": 1, "n_contexts":
            n_contexts, "vocab_strings": [f" tok{i}" for i in range(vocab)]}
    return FeatureCards(meta, arrays)


def js(driver, code, *args):
    """Run `code` in the page with C = window.cltrace and S = its state."""
    return driver.execute_script("const C = window.cltrace, S = C.state;" + code, *args)


def next_frame(driver):
    js(driver, "return new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")


def view_edges(driver, on: bool) -> None:
    """Set the page's "edges" box (the first view's edges among shown nodes) with a real click."""
    box = driver.find_element("id", "edges-on")
    if box.is_selected() != on:
        box.click()
    next_frame(driver)


def click_node(driver, i: int, shift: bool = False) -> None:
    """A real mouse click (press and release through DevTools' input pipeline, as a user's) at
    node i's place on the canvas, at sub-pixel precision: small nodes of a zoomed-out graph are
    less than a pixel wide."""
    p = driver.execute_script(
        "const p = window.cltrace.domPosition(arguments[0]),"
        " r = document.querySelector('#graph canvas').getBoundingClientRect();"
        "return {x: r.left + p.x, y: r.top + p.y};", i)
    mods = 8 if shift else 0  # DevTools' modifier bit for Shift
    driver.execute_cdp_cmd("Input.dispatchMouseEvent", {"type": "mouseMoved", **p,
                                                        "modifiers": mods})
    for kind in ("mousePressed", "mouseReleased"):
        driver.execute_cdp_cmd("Input.dispatchMouseEvent", {
            "type": kind, **p, "button": "left", "clickCount": 1, "modifiers": mods})


def plant_twins(graph: Graph, budget: int = 20) -> list[tuple[int, int]]:
    """Give pairs of influential features (same position, 1-3 layers apart) the same outgoing
    edges up to a factor, so that `viewer.supernodes` must suggest grouping each pair: feature
    b's column becomes 0.8 x feature a's over the targets above b's layer, and a keeps no edge
    to layers b's cannot reach. A pair is kept only if both stay among the `budget` most
    influential feature and error nodes. Returns the graph node indices of the pairs (one per
    position, at most two). Changes `graph.adjacency` in place."""
    from attribution.prune import node_influence

    A, L, P = graph.adjacency, graph.feature_layer, graph.feature_pos
    F, n_src = len(L), graph.ranges.token.start
    order = np.argsort(-node_influence(graph)[:F], kind="stable")[:budget]
    tgt_layer = np.full(graph.n_nodes, -1)
    tgt_layer[:F] = L
    tgt_layer[graph.ranges.logit] = graph.n_layers
    pairs, used_pos = [], set()
    for a, b in ((a, b) for a in order for b in order):
        if P[a] != P[b] or not 1 <= L[b] - L[a] <= 3 or P[a] in used_pos:
            continue
        above = tgt_layer > L[b]
        if not np.any(A[above, a] != 0):
            continue
        old_a, old_b = A[:, a].copy(), A[:, b].copy()
        A[tgt_layer <= L[b], a] = 0.0
        A[:, b] = np.where(above, 0.8 * A[:, a], 0.0)
        top = set(np.argsort(-node_influence(graph)[:n_src], kind="stable")[:budget].tolist())
        if {int(a), int(b)} <= top:
            pairs.append((int(a), int(b)))
            used_pos.add(P[a])
        else:
            A[:, a], A[:, b] = old_a, old_b
        if len(pairs) == 2:
            break
    return pairs

"""Page load time and time per click of the HTML viewer in headless Chromium, on random graphs of
1,000 and 5,000 nodes with 20,000+ edges (targets: load < 3 s, click < 150 ms).

Usage:
    python scripts/bench_viewer.py                       # both sizes, 20 clicks each
    python scripts/bench_viewer.py --clicks 50 --out out/bench_viewer.json
    python scripts/bench_viewer.py --sizes 5000 --edges-per-target 20 --cards --strongest 300

Needs Debian's `chromium` and `chromium-driver` (`make setup` installs them when it can) and
selenium (test extra). Each graph is random (tests/viewer/helpers.random_graph, every node with
influence on the logits) and written with every node and edge held and the pruning slider at
1.0, so all nodes are drawn: the worst case. Chromium runs headless with software rendering
and the network cut, as in the browser test.

Measured in the page (performance.now(), same clock as the events):
* load: from navigation start to the end of the first complete draw (data decoded, vis-network
  built, nodes drawn), i.e. when the graph is on screen;
* click: from the mouse event to the end of the redraw that shows the node's edges, with the
  side panel laid out. Clicks are real mouse clicks (Selenium actions) on random visible
  features. Also shown: the Selenium round trip of a click (driver overhead included).
Output: a table on stdout and the JSON written to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.viewer.helpers: the random graphs and the browser setup,
# imported in the functions below (after this line)

# (n_layers, n_pos) per node count: the rest of the nodes are features.
SHAPES = {1000: (6, 20), 2000: (8, 30), 5000: (12, 40), 10000: (16, 60)}


def make_graph(n_nodes: int, edges_per_target: int, seed: int):
    from tests.viewer.helpers import random_graph

    n_layers, n_pos = SHAPES.get(n_nodes, (12, 40))
    n_logits = 10
    n_feat = n_nodes - n_layers * (n_pos - 1) - n_pos - n_logits
    return random_graph(n_layers=n_layers, n_pos=n_pos, n_features=n_feat, n_logits=n_logits,
                        edges_per_target=edges_per_target, seed=seed, connected=True)


def click(driver, i) -> float:
    """A real click on node i; returns the Selenium round trip until the page has redrawn."""
    from tests.viewer.helpers import click_node

    before = driver.execute_script("return window.cltrace.clicks.length")
    t0 = time.perf_counter()
    click_node(driver, i)
    while driver.execute_script("return window.cltrace.clicks.length") == before:
        if time.perf_counter() - t0 > 10:
            raise RuntimeError(f"no redraw after clicking node {i}")
    if driver.execute_script("return window.cltrace.state.clicked") != i:
        raise RuntimeError(f"the click on node {i} selected another node")
    return time.perf_counter() - t0


def bench(n_nodes: int, edges_per_target: int, clicks: int, seed: int, tmp: Path,
          cards: bool = False, strongest: int = 0) -> dict:
    from tests.viewer.helpers import network_events, random_cards, start_chromium, wait_ready
    from viewer.embed import ViewConfig
    from viewer.html import write_html

    graph = make_graph(n_nodes, edges_per_target, seed)
    # Every node shown (the node budget at its maximum), edges drawn only on click: the worst
    # case for nodes, as before the page had a first view.
    config = ViewConfig(max_influence=1.0, max_nodes=10**7, max_edges_per_node=10**6,
                        max_edges=10**7, node_threshold=1.0, strongest_edges=strongest,
                        node_budget=100_000, view_edges=False)
    t0 = time.perf_counter()
    report = write_html(graph, tmp / f"bench_{n_nodes}.html", config=config,
                        cards=random_cards(graph.n_layers, 10_000) if cards else False)
    write_s = time.perf_counter() - t0
    driver = start_chromium()
    try:
        t0 = time.perf_counter()
        driver.get(report.path.as_uri())
        wait_ready(driver, timeout=120)
        wall_load = time.perf_counter() - t0
        load_ms = driver.execute_script("return window.cltrace.loadMs")
        # The whole graph in view (a wide graph opens on its right end): every node drawn.
        driver.execute_script("window.cltrace.fit(true)")
        drawn = driver.execute_script("return window.cltrace.state.net.body.nodeIndices.length")
        feats = driver.execute_script(
            "const S = window.cltrace.state, out = [];"
            "for (let i = 0; i < S.n; i++) if (S.D.kind[i] === 0 && S.visible[i]) out.push(i);"
            "return out;")
        rng = np.random.default_rng(seed)
        round_trips = [click(driver, int(i)) for i in rng.choice(feats, clicks, replace=False)]
        in_page = driver.execute_script("return window.cltrace.clicks")
        edges_drawn = len(driver.execute_script("return window.cltrace.drawnEdges()"))
        _, failed = network_events(driver)
    finally:
        driver.quit()
    return {
        "cards": report.cards, "strongest": strongest, "nodes": report.nodes_held,
        "edges": report.edges_held, "nodes_drawn": drawn,
        "page_mb": round(report.bytes / 2**20, 2), "write_s": round(write_s, 2),
        "load_ms": round(load_ms, 1), "load_wall_s": round(wall_load, 2),
        "click_ms_median": round(statistics.median(in_page), 1),
        "click_ms_p90": round(float(np.percentile(in_page, 90)), 1),
        "click_ms_max": round(max(in_page), 1), "clicks": len(in_page),
        "click_round_trip_ms_median": round(1000 * statistics.median(round_trips), 1),
        "edges_drawn_last_click": edges_drawn, "failed_requests": len(failed),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000])
    ap.add_argument("--edges-per-target", type=int, default=0,
                    help="Incoming edges per target (default: enough for 20,000+ edges).")
    ap.add_argument("--clicks", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cards", action="store_true",
                    help="Also embed a (random) feature card for every feature.")
    ap.add_argument("--strongest", type=int, default=0,
                    help="Also draw this many strongest edges at all times.")
    ap.add_argument("--out", default="out/bench_viewer.json")
    args = ap.parse_args()
    from tests.viewer.helpers import chromium_paths

    if chromium_paths() is None:
        print("bench_viewer: chromium and chromedriver are needed (Debian: apt-get install "
              "chromium chromium-driver)", file=sys.stderr)
        return 2
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            ept = args.edges_per_target or max(5, int(np.ceil(21_000 / (0.9 * n))))
            rows.append({"size": n, **bench(n, ept, args.clicks, args.seed, Path(tmp),
                                            args.cards, args.strongest)})
    from rich.console import Console
    from rich.table import Table

    table = Table(title="cltrace viewer in headless Chromium (software rendering)")
    cols = ("size", "nodes", "edges", "cards", "strongest", "page_mb", "load_ms", "load_wall_s",
            "click_ms_median", "click_ms_p90", "click_ms_max", "click_round_trip_ms_median",
            "failed_requests")
    for c in cols:
        table.add_column(c, justify="right")
    for r in rows:
        table.add_row(*(str(r[c]) for c in cols))
    Console(width=200).print(table)
    browser = subprocess.run([chromium_paths()[0], "--version"], capture_output=True, check=False,
                             text=True).stdout.strip()
    result = {"rows": rows, "targets": {"load_ms": 3000, "click_ms": 150},
              "machine": {"platform": platform.platform(), "processor": platform.processor(),
                          "cpus": os.cpu_count(), "browser": browser}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Benchmark: how long `cltrace trace` takes before its first row, from process start.

Runs the demo command (`cltrace trace "The capital of France is"`, the bundled SmolLM2
transcoder) as whole processes, side by side in one run: with both caches off
(`--no-compile-cache`, `CLTRACE_MODEL_CACHE=0`: every run converts the GGUF model and compiles
every program), then with the caches on in a fresh folder: the first run (cold: it fills them)
and the next ones (warm: what a user's second command finds). Each process reports the seconds
from its start to its first rows (`seconds_to_first_rows`, measured by the tracer from
`CLTRACE_T0`, set by the `cltrace` entry point) and its whole wall time.

Usage:
    .venv/bin/python scripts/bench_startup.py            # 1 off, 1 cold, 3 warm
    .venv/bin/python scripts/bench_startup.py --warm 5
Writes a table and the figures as JSON (`--out`, default out/bench_startup.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "The capital of France is"


def _run(env: dict, out: Path, extra: list[str]) -> dict:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "cltrace", *extra, "trace", PROMPT, "--out",
                        str(out), "--no-progress"], env=env, cwd=ROOT, capture_output=True,
                       text=True, check=False)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"failed:\n{r.stderr[-2000:]}")
    from attribution.graph import Graph

    g = Graph.load(out / "graph.npz")
    return {"first_rows_s": g.info.get("seconds_to_first_rows"),
            "rows_s": g.info.get("seconds_rows"), "wall_s": round(wall, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--warm", type=int, default=3, help="Warm runs.")
    ap.add_argument("--out", default="out/bench_startup.json")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = {**os.environ, "CLTRACE_CACHE": str(tmp / "cache")}
        base.pop("CLTRACE_T0", None)
        off = {**base, "CLTRACE_MODEL_CACHE": "0"}
        print("caches off", flush=True)
        rows.append({"run": "caches off", **_run(off, tmp / "off", ["--no-compile-cache"])})
        print("cold", flush=True)
        rows.append({"run": "cold (fills the caches)", **_run(base, tmp / "cold", [])})
        for i in range(args.warm):
            print(f"warm {i + 1}", flush=True)
            rows.append({"run": f"warm {i + 1}", **_run(base, tmp / f"warm{i}", [])})
    warm = sorted(r["first_rows_s"] for r in rows[2:])
    result = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
              "load_average": os.getloadavg(), "runs": rows,
              "warm_first_rows_median_s": warm[len(warm) // 2] if warm else None}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"cltrace trace {PROMPT!r}: seconds before the first row")
    for c in ("run", "first rows", "rows", "whole command"):
        t.add_column(c, justify="left" if c == "run" else "right")
    for r in rows:
        t.add_row(r["run"], f"{r['first_rows_s']:.1f} s", f"{r['rows_s']:.1f} s",
                  f"{r['wall_s']:.1f} s")
    Console().print(t)
    print(f"warm median {result['warm_first_rows_median_s']} s (load average "
          f"{result['load_average'][0]:.1f}); written {args.out}")


if __name__ == "__main__":
    main()

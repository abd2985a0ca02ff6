"""Benchmark: the trace planner's predictions (`cltrace trace --plan`, attribution/plan.py)
against measured traces, side by side in one run.

Each case runs twice, each time in a fresh process: once to plan (forward pass + one measured
batch), once to trace the mode the case names, measuring the process's peak resident memory
(ru_maxrss) and the trace's seconds (rows, compilation included, + pruning and scores: what
the plan's "time" predicts). The model is the embedded SmolLM2-135M with its bundled
transcoder; the compilation cache is off in both, so both compile.

Usage:
    .venv/bin/python scripts/bench_plan.py
    .venv/bin/python scripts/bench_plan.py --cases dense capped
Writes a table and the rows as JSON (`--out`, default out/bench_plan.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHORT = "The capital of France is"
LONGER = ("In the morning the market opens early, and by noon the square is full of people "
          "buying bread, fish and")
CASES = {  # name: (prompt, TraceConfig fields, the plan row that predicts it)
    "dense": (SHORT, {"adjacency": "dense"}, "dense"),
    "stream": (SHORT, {"adjacency": "stream", "stream_features": 1024}, "stream"),
    "capped": (SHORT, {"max_feature_nodes": 1000}, "capped"),
    # The decoder rows laid out in blocks of 3 positions: two prefixes (6 positions with BOS).
    "dense-blocks": (SHORT, {"adjacency": "dense", "position_bucket": 3}, "dense"),
    "dense-24": (LONGER, {"adjacency": "dense"}, "dense"),
    "capped-24": (LONGER, {"max_feature_nodes": 2048}, "capped"),
}

CHILD = r"""
import dataclasses, json, resource, sys, time
from attribution.trace import TraceConfig, Tracer
prompt, fields, mode, what = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], sys.argv[4]
config = TraceConfig(prompt=prompt, **fields)
tracer = Tracer(config)
if what == "plan":
    st, plans = tracer.plan(config)
    row = next(p for p in plans if p.mode == mode)
    print(json.dumps(dataclasses.asdict(row)))
else:
    t0 = time.perf_counter()
    g = tracer.trace(config, last=True)  # as `cltrace trace` does: frees what no row reads
    t = time.perf_counter() - t0
    print(json.dumps({"seconds": g.info["seconds_rows"] + g.info["seconds_scores"],
                      "seconds_rows": g.info["seconds_rows"], "seconds_call": t,
                      "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                      "features": int(g.ranges.feature.stop)}))
"""


def _child(prompt: str, fields: dict, mode: str, what: str) -> dict:
    env = {**os.environ, "CLTRACE_COMPILE_CACHE": "0", "PYTHONPATH": str(ROOT),
           "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    r = subprocess.run([sys.executable, "-c", CHILD, prompt, json.dumps(fields), mode, what],
                       env=env, cwd=ROOT, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        sys.exit(f"{what} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    ap.add_argument("--out", default="out/bench_plan.json")
    args = ap.parse_args()
    rows = []
    for name in args.cases:
        prompt, fields, mode = CASES[name]
        print(f"{name}: plan", flush=True)
        plan = _child(prompt, fields, mode, "plan")
        print(f"{name}: trace", flush=True)
        got = _child(prompt, fields, mode, "trace")
        rows.append({"case": name, "prompt": prompt, "fields": fields, "plan": plan,
                     "measured": got,
                     "memory_error": plan["peak_gb"] / got["peak_gb"] - 1,
                     "time_error": plan["seconds"] / got["seconds"] - 1})
        print(f"  predicted {plan['peak_gb']:.2f} GB {plan['seconds']:.1f} s; measured "
              f"{got['peak_gb']:.2f} GB {got['seconds']:.1f} s", flush=True)
    result = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
              "cases": rows,
              "worst_memory_error": max(abs(r["memory_error"]) for r in rows),
              "worst_time_error": max(abs(r["time_error"]) for r in rows)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    from rich.console import Console
    from rich.table import Table

    t = Table(title="trace planner: predicted vs measured")
    for c in ("case", "features", "peak predicted", "peak measured", "error", "time predicted",
              "time measured", "error"):
        t.add_column(c, justify="left" if c == "case" else "right")
    for r in rows:
        p, m = r["plan"], r["measured"]
        t.add_row(r["case"], str(m["features"]), f"{p['peak_gb']:.2f} GB",
                  f"{m['peak_gb']:.2f} GB", f"{r['memory_error']:+.0%}", f"{p['seconds']:.1f} s",
                  f"{m['seconds']:.1f} s", f"{r['time_error']:+.0%}")
    Console().print(t)
    print(f"worst: memory {result['worst_memory_error']:.0%}, time "
          f"{result['worst_time_error']:.0%}; written {args.out}")


if __name__ == "__main__":
    main()

"""Benchmark: many prompts in one process (`cltrace trace --prompts FILE`) against one
`cltrace trace` command per prompt, side by side in one run, on the embedded SmolLM2-135M and
its bundled transcoder.

Both arms run the same flags on the same prompts, each as whole processes (imports, loading,
compiling included), after one warm-up command that fills the compilation and model caches
(what a user's second command finds); the caches live in a fresh folder (`$CLTRACE_CACHE`).
The graphs of both arms are checked to hold the same scores.

Usage:
    .venv/bin/python scripts/bench_prompts.py                    # 20 prompts
    .venv/bin/python scripts/bench_prompts.py --n 5 --max-feature-nodes 256
Writes a table to the terminal and the figures as JSON (`--out`, default out/bench_prompts.json).
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
PROMPTS = [
    "The capital of France is", "The opposite of hot is", "The capital of Italy is",
    "One, two, three,", "The sun rises in the", "Water freezes at zero degrees",
    "The capital of Germany is", "Monday, Tuesday,", "The cat sat on the",
    "A dog is an", "The color of the sky is", "The capital of Spain is",
    "Roses are red, violets are", "The first letter of the alphabet is",
    "The opposite of up is", "Paris is a city in", "Two plus two equals",
    "The capital of Japan is", "The moon orbits the", "The largest ocean is the",
]


def _run(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{r.stderr[-2000:]}")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20, help="Prompts (at most 20).")
    ap.add_argument("--max-feature-nodes", type=int, default=None,
                    help="Cap each graph's feature nodes (both arms); default: full graphs.")
    ap.add_argument("--out", default="out/bench_prompts.json")
    args = ap.parse_args()
    prompts = PROMPTS[:args.n]
    cltrace = [sys.executable, "-m", "cltrace"]
    flags = ["--model", "smollm2-135m", "--no-progress"]
    if args.max_feature_nodes is not None:
        flags += ["--max-feature-nodes", str(args.max_feature_nodes)]
    from attribution.graph import Graph

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        env = {**os.environ, "CLTRACE_CACHE": str(tmp / "cache"),
               "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
        print("warm-up (fills the compilation and model caches)", flush=True)
        warm = _run([*cltrace, "trace", "Hello there", *flags, "--out", str(tmp / "warm")], env)
        (tmp / "p.txt").write_text("\n".join(prompts) + "\n")
        print(f"one process, {len(prompts)} prompts", flush=True)
        batch = _run([*cltrace, "trace", "--prompts", str(tmp / "p.txt"), *flags, "--out",
                      str(tmp / "batch")], env)
        print(f"{len(prompts)} commands", flush=True)
        single = [_run([*cltrace, "trace", p, *flags, "--out", str(tmp / f"one{i}")], env)
                  for i, p in enumerate(prompts)]
        rows = json.loads((tmp / "batch" / "summary.json").read_text())["prompts"]
        worst = 0.0
        for i, row in enumerate(rows):
            g = Graph.load(tmp / f"one{i}" / "graph.npz")
            worst = max(worst, abs(g.scores.replacement - row["replacement"]),
                        abs(g.scores.completeness - row["completeness"]))
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "prompts": len(prompts), "max_feature_nodes": args.max_feature_nodes,
        "warmup_s": round(warm, 2), "one_process_s": round(batch, 2),
        "separate_commands_s": round(sum(single), 2),
        "separate_per_prompt_s": [round(s, 2) for s in single],
        "speedup": round(sum(single) / batch, 3),
        "max_score_difference": worst,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{len(prompts)} prompts: one process vs one command each")
    for c in ("arm", "seconds", "per prompt"):
        t.add_column(c)
    t.add_row("--prompts (one process)", f"{batch:.1f}", f"{batch / len(prompts):.2f}")
    t.add_row("separate commands", f"{sum(single):.1f}", f"{sum(single) / len(prompts):.2f}")
    Console().print(t)
    print(f"speedup {result['speedup']:.2f}x; largest score difference {worst:.2e}; "
          f"written {args.out}")


if __name__ == "__main__":
    main()

"""Does reusing generated activations for more than one optimiser step pay? (issue 14)

    python scripts/compare_reuse.py --recipe configs/bundle/smollm2_plt1024_skip.toml \
        --generated-batches 40 --reuse 1,2,4 --json docs/results/compare_reuse_smollm2.json

Each run trains the recipe's transcoder from scratch on the same `--generated-batches` batches of
generated activations (the same text, the same seed), using each round `--data-reuse` times
(reshuffled each pass): R x generated-batches optimiser steps, warm-up 10% of them. Every run is
its own `cltrace train` process (one heavy job at a time), then `cltrace eval` measures the held-out
NMSE, L0, spliced KL and top-1 agreement. Reuse pays if a run reaches better held-out figures per
second of wall time than spending that time generating new activations would (compare the
columns at equal wall time across runs, and with the reuse-1 run's curve in its metrics.jsonl).

Prints a Markdown table and writes every figure to --json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="configs/bundle/smollm2_plt1024_skip.toml")
    ap.add_argument("--generated-batches", type=int, default=40)
    ap.add_argument("--reuse", default="1,2,4")
    ap.add_argument("--contexts", type=int, default=64, help="held-out contexts for eval")
    ap.add_argument("--work-dir", default="out/compare_reuse")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    cltrace = [sys.executable, "-m", "cltrace"]
    rows = []
    for r in (int(v) for v in args.reuse.split(",")):
        out = Path(args.work_dir) / f"reuse{r}"
        steps = r * args.generated_batches
        wall_file, ev = ROOT / out / "train_wall_s.txt", out / "eval.json"
        if not wall_file.exists():  # a finished run is kept: rerunning the script skips it
            t = time.perf_counter()
            subprocess.run([*cltrace, "train", "--config", args.recipe, "--data-reuse", str(r),
                            "--steps", str(steps), "--warmup-steps", str(max(1, steps // 10)),
                            "--checkpoint-every", str(10**6),
                            "--log-every", str(max(1, steps // 10)),
                            "--out", str(out), "--no-resume", "--no-progress"],
                           check=True, cwd=ROOT)
            wall_file.write_text(f"{time.perf_counter() - t:.1f}")
            ev.unlink(missing_ok=True)
        wall = float(wall_file.read_text())
        if not (ROOT / ev).exists():
            subprocess.run([*cltrace, "eval", "--transcoder", str(out / "transcoder"),
                            "--contexts", str(args.contexts), "--out", str(ev)], check=True,
                           cwd=ROOT)
        m = json.loads((ROOT / ev).read_text())
        train_rows = [json.loads(x) for x in
                      (ROOT / out / "metrics.jsonl").read_text().splitlines()]
        rows.append({"reuse": r, "steps": steps, "generated_batches": args.generated_batches,
                     "train_wall_s": wall, "eval": m, "train_curve": train_rows})
        print(json.dumps({"reuse": r, "wall_s": round(wall), "nmse": m.get("nmse_mean"),
                          "kl": m.get("kl"), "top1": m.get("top1_agreement")}), flush=True)
    keys = ("nmse_mean", "l0_total", "dead_fraction", "dense_fraction", "kl", "top1_agreement",
            "delta_ce")
    print("\n| reuse | steps | train wall s | " + " | ".join(keys) + " |")
    print("|---" * (3 + len(keys)) + "|")
    for row in rows:
        vals = [row["eval"].get(k) for k in keys]
        print(f"| {row['reuse']} | {row['steps']} | {row['train_wall_s']:.0f} | "
              + " | ".join(f"{v:.4g}" if isinstance(v, (int, float)) else str(v) for v in vals)
              + " |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"args": vars(args), "runs": rows}, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

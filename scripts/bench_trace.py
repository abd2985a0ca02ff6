"""Benchmark: seconds and peak memory to trace a prompt's attribution graph on SmolLM2-135M.

Setup (issue 4, "Speed and memory"): the embedded SmolLM2-135M (30 layers, d_model 576), a random
CLT and a random PLT of 2,048 features per layer whose JumpReLU thresholds are calibrated on the
prompt to ~64 active features per layer and position (the L0 of real transcoders), prompts of 12,
128 and 1,024 tokens (BOS not counted). Each case runs in its own process, so its peak RSS is its
own; seconds are wall-clock for `trace_tokens` (replacement model, all rows, the dense graph),
compilation included, excluding model loading and threshold calibration.

The full unpruned graph grows as (30 layers x 64 x tokens)^2: 23k feature nodes and a 2.2 GB
adjacency at 12 tokens, 246k nodes and 240 GB at 128 tokens. Cases whose dense adjacency exceeds
`--max-adjacency-gb` are traced with a feature cap instead (`--cap`, greedy by influence, as
circuit-tracer's max_feature_nodes), and the table says so.

Usage:
    .venv/bin/python scripts/bench_trace.py                      # 12 and 128 tokens, CLT and PLT
    .venv/bin/python scripts/bench_trace.py --tokens 12 128 1024 --cap 1024 --out out/bench.json
Writes a rich table to the terminal and the rows as JSON (`--out`, default
out/bench_trace.json).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

TEXT = ("The history of the city begins with a small settlement on the river, where traders "
        "from the north met farmers from the valley. Over the centuries the town grew into a "
        "market, then a port, and finally the capital of a large province. ")


def _prompt_ids(tok, n: int) -> list[int]:
    ids = tok.encode(TEXT * (1 + n // 30), add_bos=False)
    return ids[:n]


def run_case(kind: str, n_tokens: int, args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from attribution.trace import TraceConfig, trace_tokens
    from clt import transcoder as tcm
    from clt.lm import forward, load_model

    m = load_model("smollm2-135m")
    ids = _prompt_ids(m.tokenizer, n_tokens)
    full = [m.cfg.bos_token_id] + ids
    tc_cfg = tcm.TranscoderConfig(d_model=m.cfg.d_model, n_layers=m.cfg.n_layers,
                                  n_features=args.features, max_reach=1 if kind == "plt" else None)
    p = tcm.init_params(tc_cfg, jax.random.key(0))
    # Calibrate: per layer, the (1 - 64/F) quantile of the pre-activations on this prompt.
    _, cap = forward(m.params, m.cfg, jnp.asarray(full)[None], capture=("resid_mid",))
    pre = np.asarray(tcm.encode_pre(p, jnp.swapaxes(cap.resid_mid[:, 0], 0, 1))[1:])
    q = 1 - args.active / args.features
    th = np.quantile(pre.transpose(1, 0, 2).reshape(tc_cfg.n_layers, -1), q, axis=1)
    p = dataclasses.replace(p, log_threshold=jnp.log(jnp.broadcast_to(
        jnp.asarray(np.maximum(th, 1e-6), jnp.float32)[:, None], p.log_threshold.shape)))
    n_active = int((pre > th[None, :, None]).sum())
    dense_gb = (n_active + 31 * (n_tokens + 1) + 10) ** 2 * 4 / 2**30
    capped = dense_gb > args.max_adjacency_gb
    config = TraceConfig(prompt=f"{n_tokens} tokens",
                         max_feature_nodes=args.cap if capped else None,
                         batch_size=args.batch_size, dtype=args.dtype,
                         max_adjacency_gb=args.max_adjacency_gb)
    t0 = time.perf_counter()
    graph = trace_tokens(m.params, m.cfg, tc_cfg, p, ids, config, progress=False)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)
    return {"transcoder": kind, "tokens": n_tokens, "active_features": n_active,
            "active_per_layer_pos": round(n_active / (30 * n_tokens), 1),
            "feature_nodes": graph.ranges.feature.stop, "nodes": graph.n_nodes,
            "edges": graph.n_edges, "capped": capped,
            "full_dense_gb": round(dense_gb, 2), "seconds": round(seconds, 1),
            "seconds_rows": graph.info["seconds_rows"], "batch": graph.info["batch_size"],
            "peak_rss_gb": round(peak, 2), "dtype": args.dtype,
            "device": jax.devices()[0].device_kind}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, nargs="*", default=[12, 128])
    ap.add_argument("--kinds", nargs="*", default=["clt", "plt"])
    ap.add_argument("--features", type=int, default=2048)
    ap.add_argument("--active", type=float, default=64.0)
    ap.add_argument("--cap", type=int, default=1024,
                    help="max_feature_nodes for cases whose full graph does not fit")
    ap.add_argument("--max-adjacency-gb", type=float, default=8.0)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per case")
    ap.add_argument("--out", default="out/bench_trace.json")
    ap.add_argument("--case", default=None, help=argparse.SUPPRESS)  # child process
    args = ap.parse_args()
    if args.case:
        kind, n = args.case.split(":")
        print("RESULT " + json.dumps(run_case(kind, int(n), args)), flush=True)
        return 0

    from rich.console import Console
    from rich.table import Table

    rows = []
    passthrough = [f"--features={args.features}", f"--active={args.active}", f"--cap={args.cap}",
                   f"--max-adjacency-gb={args.max_adjacency_gb}",
                   f"--batch-size={args.batch_size}", f"--dtype={args.dtype}"]
    for n in args.tokens:
        for kind in args.kinds:
            cmd = [sys.executable, __file__, "--case", f"{kind}:{n}", *passthrough]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
                line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")),
                            None)
                why = (proc.stderr.strip().splitlines() or ["?"])[-1]
                if proc.returncode == -9:
                    why = "killed (SIGKILL: out of memory?)"
                row = json.loads(line[7:]) if line else {"transcoder": kind, "tokens": n,
                                                         "error": why}
            except subprocess.TimeoutExpired:
                row = {"transcoder": kind, "tokens": n, "error": f"over {args.timeout:.0f} s"}
            rows.append(row)
            print(json.dumps(row), flush=True)

    table = Table(title="trace: SmolLM2-135M, random transcoders, 2048 features/layer")
    cols = ["transcoder", "tokens", "active_per_layer_pos", "feature_nodes", "nodes", "edges",
            "capped", "seconds", "peak_rss_gb"]
    for c in cols:
        table.add_column(c)
    for r in rows:
        table.add_row(*[str(r.get(c, r.get("error", ""))) for c in cols])
    Console().print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": platform.platform(), "rows": rows}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Benchmark: seconds and peak memory to trace a prompt's attribution graph on SmolLM2-135M.

Setup (issue 4, "Speed and memory"): the embedded SmolLM2-135M (30 layers, d_model 576), a random
CLT and a random PLT of 2,048 features per layer whose JumpReLU thresholds are calibrated on the
prompt to ~64 active features per layer and position (the L0 of real transcoders), prompts of 12,
128 and 1,024 tokens (BOS not counted). Each case runs in its own process, so its peak RSS is its
own; seconds are wall-clock for `trace_tokens` (replacement model, every row of the full graph,
the stored graph), compilation included, excluding model loading and threshold calibration.

The full unpruned graph (no feature cap) grows as (30 layers x 64 x tokens)^2: 23k feature nodes
and a 2.2 GB dense adjacency at 12 tokens, 246k nodes and 240 GB at 128 tokens. `--adjacency
auto` (the tracer's default) keeps it dense where it fits under `--max-adjacency-gb` and streams
it otherwise: every row is made and folded into exact influences and scores, and the stored graph
holds the `--stream-features` most influential features (their rows made again). `--adjacency
dense` / `stream` force one mode (run both at 12 tokens to compare them side by side).

Cases with more feature rows than `--estimate-over` are *estimated*, not run to the end (on a CPU
they take hours): the script builds the replacement model, compiles every position prefix the
streamed trace uses, times a random sample of `--sample` of its row batches (exactly those of
`attribution.stream.stream_batches`, each folded as the trace does), and extrapolates: seconds =
setup + compilation + mean batch time x batches (+ the stored graph's rows); the table marks such
rows "estimate" with a 95% interval from the sample's spread. Their peak RSS is that of the
sampled run, which holds everything a full streamed run holds but the stored graph (its size is
in `stored_gb`).

Usage:
    .venv/bin/python scripts/bench_trace.py                      # 12 and 128 tokens, CLT and PLT
    .venv/bin/python scripts/bench_trace.py --tokens 12 --adjacency dense stream
    .venv/bin/python scripts/bench_trace.py --tokens 128 1024 --out out/bench_long.json
    .venv/bin/python scripts/bench_trace.py --tokens 128 --estimate-over 1e9   # run it through
Arithmetic: each run case reports its rows' floating-point operations (`row_gflop`, counted from
the shapes actually run: `attribution.trace._RowMaker.flops`), this device's float32 matmul
rate (`peak_gflops`, best of a few 2048^3 products) and the share of it reached by the rows
alone (`rows_of_peak`) and by the whole trace call (`trace_of_peak`; `arithmetic_seconds` is
the time the arithmetic alone would take at the peak).

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


def run_case(kind: str, n_tokens: int, mode: str, args) -> dict:
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
    n_nodes = n_active + 31 * (n_tokens + 1) + 10
    dense_gb = n_nodes ** 2 * 4 / 2**30
    config = TraceConfig(prompt=f"{n_tokens} tokens", max_feature_nodes=args.cap,
                         adjacency=mode, stream_features=args.stream_features,
                         batch_size=args.batch_size, dtype=args.dtype,
                         max_adjacency_gb=args.max_adjacency_gb)
    row = {"transcoder": kind, "tokens": n_tokens, "active_features": n_active,
           "active_per_layer_pos": round(n_active / (30 * n_tokens), 1),
           "full_nodes": n_nodes, "full_dense_gb": round(dense_gb, 2), "cap": args.cap,
           "dtype": args.dtype, "device": jax.devices()[0].device_kind}
    if args.cap is None and n_active > args.estimate_over:
        return row | _estimate(m, ids, tc_cfg, p, config, args)
    t0 = time.perf_counter()
    graph = trace_tokens(m.params, m.cfg, tc_cfg, p, ids, config, progress=False)
    seconds = time.perf_counter() - t0
    full = graph.full_graph
    return row | {
        "adjacency": graph.info["adjacency"], "measured": "run",
        "feature_rows": graph.n_active_total if args.cap is None else graph.ranges.feature.stop,
        "full_edges": full.edges if full is not None else graph.n_edges,
        "stored_features": graph.ranges.feature.stop, "stored_nodes": graph.n_nodes,
        "stored_gb": round(graph.adjacency.nbytes / 2**30, 2),
        "seconds": round(seconds, 1), "seconds_rows": graph.info["seconds_rows"],
        "seconds_scores": graph.info["seconds_scores"],  # included in seconds
        "batch": graph.info["batch_size"], "peak_rss_gb": round(_peak_gb(), 2),
        **_arithmetic(graph.info["row_flops"], graph.info["seconds_rows"], seconds)}


def matmul_peak() -> float:
    """This device's float32 matmul rate (FLOP/s): the best of a few 2048^3 products, compiled
    before timing (the "peak" the rows' rate is compared with)."""
    import jax
    import jax.numpy as jnp

    n = 2048
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def _arithmetic(flops: float, seconds_rows: float, seconds: float) -> dict:
    """The rows' arithmetic (`_RowMaker.flops`, counted from the shapes run), its rate, and the
    share of this device's matmul peak reached by the rows alone and by the whole trace call."""
    peak = matmul_peak()
    return {"row_gflop": round(flops / 1e9, 1), "peak_gflops": round(peak / 1e9, 1),
            "rows_gflops": round(flops / seconds_rows / 1e9, 1),
            "rows_of_peak": round(flops / seconds_rows / peak, 3),
            "trace_of_peak": round(flops / seconds / peak, 3),
            "arithmetic_seconds": round(flops / peak, 1)}


def _peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)


def _estimate(m, ids, tc_cfg, p, config, args) -> dict:
    """Time a random sample of a streamed trace's row batches and extrapolate (module doc)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from attribution import replacement as rep
    from attribution.graph import error_nodes
    from attribution.stream import absorb, stream_batches
    from attribution.trace import _RowMaker, batch_size

    t0 = time.perf_counter()
    full_ids, bos = rep.prepend_bos(m.cfg, ids)
    rm, acts = rep.build(m.params, m.cfg, tc_cfg, p, np.asarray(full_ids))
    active = rep.active_features(acts, skip_bos=bos)
    del acts
    T, L = len(full_ids), m.cfg.n_layers
    n_err = len(error_nodes(L, T, bos)[0])
    batch = batch_size(config, m.cfg, T)
    make = _RowMaker(m.params, m.cfg, tc_cfg, p, rm, active, bos, batch, jnp.float32)
    n_src = len(active) + n_err + T
    errors = (len(active), len(active) + n_err)
    influence = jnp.zeros(n_src, jnp.float32)
    batches = stream_batches(active, L, batch)
    setup = time.perf_counter() - t0

    def run(c):
        rows = make.features(active, c, host=False, padded=True)
        node = np.full(batch, -1, np.int32)
        node[:len(c)] = c
        out = absorb(influence, rows, jnp.asarray(node), jnp.zeros(batch, jnp.float32),
                      errors=errors)
        jax.block_until_ready(out)

    # Compile every prefix length once, on the cheapest batch of each (layer 0: one block).
    t1 = time.perf_counter()
    first = {}
    for c in reversed(batches):
        first.setdefault(make.prefix_length(active.pos[c]), c)
    for c in first.values():
        run(c)
    compile_s = time.perf_counter() - t1
    rng = np.random.default_rng(0)
    pick = rng.choice(len(batches), min(args.sample, len(batches)), replace=False)
    times = []
    for i in pick:
        t = time.perf_counter()
        run(batches[i])
        times.append(time.perf_counter() - t)
    times = np.asarray(times)
    n_b = len(batches)
    rows_s = times.mean() * n_b
    half = 1.96 * times.std(ddof=1) / np.sqrt(len(times)) * n_b if len(times) > 1 else 0.0
    n_keep = min(config.stream_features, len(active))
    stored_s = times.mean() * -(-n_keep // batch)  # the stored graph's rows, made again
    total = setup + compile_s + rows_s + stored_s
    stored_n = n_keep + n_err + T + 10
    return {"adjacency": "stream", "measured": f"estimate ({len(times)} of {n_b} batches)",
            "feature_rows": len(active), "stored_features": n_keep, "stored_nodes": stored_n,
            "stored_gb": round(stored_n**2 * 4 / 2**30, 2),
            "seconds": round(total, 0), "seconds_low": round(total - half, 0),
            "seconds_high": round(total + half, 0), "seconds_setup": round(setup, 1),
            "seconds_compile": round(compile_s, 1), "prefixes": len(first),
            "batch": batch, "batches": n_b, "batch_seconds_mean": round(float(times.mean()), 3),
            "batch_seconds_min": round(float(times.min()), 3),
            "batch_seconds_max": round(float(times.max()), 3),
            "peak_rss_gb": round(_peak_gb(), 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, nargs="*", default=[12, 128])
    ap.add_argument("--kinds", nargs="*", default=["clt", "plt"])
    ap.add_argument("--features", type=int, default=2048)
    ap.add_argument("--active", type=float, default=64.0)
    ap.add_argument("--adjacency", nargs="*", default=["auto"],
                    choices=["auto", "dense", "stream"],
                    help="TraceConfig.adjacency: each one given is a case")
    ap.add_argument("--cap", type=int, default=None,
                    help="max_feature_nodes (greedy cap); default: none, the full graph")
    ap.add_argument("--stream-features", type=int, default=8192)
    ap.add_argument("--estimate-over", type=float, default=30000,
                    help="estimate (sampled batches) cases with more feature rows than this")
    ap.add_argument("--sample", type=int, default=24, help="batches timed per estimate")
    ap.add_argument("--max-adjacency-gb", type=float, default=8.0)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per case")
    ap.add_argument("--out", default="out/bench_trace.json")
    ap.add_argument("--case", default=None, help=argparse.SUPPRESS)  # child process
    args = ap.parse_args()
    if args.case:
        kind, n, mode = args.case.split(":")
        print("RESULT " + json.dumps(run_case(kind, int(n), mode, args)), flush=True)
        return 0

    from rich.console import Console
    from rich.table import Table

    rows = []
    passthrough = [f"--features={args.features}", f"--active={args.active}",
                   f"--stream-features={args.stream_features}",
                   f"--estimate-over={args.estimate_over}", f"--sample={args.sample}",
                   f"--max-adjacency-gb={args.max_adjacency_gb}",
                   f"--batch-size={args.batch_size}", f"--dtype={args.dtype}"]
    if args.cap is not None:
        passthrough.append(f"--cap={args.cap}")
    cases = [(n, kind, mode) for n in args.tokens for kind in args.kinds
             for mode in args.adjacency]
    for n, kind, mode in cases:
        cmd = [sys.executable, __file__, "--case", f"{kind}:{n}:{mode}", *passthrough]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True,
                                  timeout=args.timeout, check=False)
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

    table = Table(title="trace: SmolLM2-135M, random transcoders, 2048 features/layer, "
                  "full graph" + ("" if args.cap is None else f", capped at {args.cap}"))
    cols = ["transcoder", "tokens", "active_per_layer_pos", "feature_rows", "full_nodes",
            "full_edges", "adjacency", "stored_nodes", "measured", "seconds", "seconds_rows",
            "row_gflop", "rows_of_peak", "trace_of_peak", "peak_rss_gb"]
    for c in cols:
        table.add_column(c)
    for r in rows:
        table.add_row(*[str(r.get(c, r.get("error", ""))) for c in cols])
    Console(width=220).print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": platform.platform(), "rows": rows}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Benchmark transcoder training: the sparse step against the dense one, side by side in one run.

For a SmolLM2-135M transcoder with 2,048 features per layer (a CLT and a PLT; BatchTopK with
k = 64 by default, so every case has the same L0), each (kind, step) case runs in its own
process (a dense CLT step holds ~20 GB; two cases in one process ran out of memory) and reports:
  - train_step_tok_s: tokens/s of the train step alone (a batch of real activations, compiled,
    averaged over --steps),
  - loop_tok_s: tokens/s of the whole training loop (`clt.train.train`: generation of
    activations by the JAX model, shuffling, steps), over its second half (after compiles),
  - activation generation tokens/s: `clt.lm.model.activations` (what training runs: no final
    norm, no unembedding) and the full forward with logits, for comparison,
  - achieved FLOP/s of the step against the dense FLOP count, and the device's matmul peak.
Ratios (sparse / dense) are printed per kind. Both steps run as `train` runs them (the state
donated to the step) and, by default, with glibc's malloc as `cltrace train` sets it: transparent
huge pages and a heap that keeps its pages (cltrace/hostmem.py; --huge-pages off: neither).

Usage: python scripts/bench_train.py [--kinds clt,plt] [--steps 3] [--loop-steps 6]
       [--activation batchtopk] [--k 64] [--data data/corpus] [--out bench/bench_train.json]
Without data/corpus (scripts/build_corpus.py), uses synthetic text.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cltrace.hostmem import KEEP_HEAP, TUNABLE, huge_pages_env  # light: imports no jax

VENDOR_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 FLOP/s (SXM)


def matmul_peak(n: int = 2048, reps: int = 5) -> float:
    import jax
    import jax.numpy as jnp

    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    t = time.perf_counter()
    for _ in range(reps):
        out = f(a)
    out.block_until_ready()
    return 2 * n**3 * reps / (time.perf_counter() - t)


def transcoder_flops_per_token(cfg) -> float:
    """Dense forward + backward: 3 x 2 x (encoder + decoder multiply-adds)."""
    enc = cfg.n_layers * cfg.d_model * cfg.n_features
    dec = sum(cfg.n_targets(s) for s in range(cfg.n_layers)) * cfg.n_features * cfg.d_model
    return 3 * 2 * (enc + dec)


def _corpus(data: str) -> str:
    import numpy as np

    if Path(data).exists():
        return data
    rng = np.random.default_rng(0)
    words = "the of and to in a is that for it as was with be by on not he this are or his".split()
    path = Path(tempfile.mkdtemp()) / "synthetic.txt"
    path.write_text("\n\n".join(" ".join(rng.choice(words, 200)) for _ in range(400)))
    return str(path)


def _train_config(args, kind: str, step: str, out: str, steps: int):
    from clt.train import TrainConfig

    return TrainConfig.make(
        model=args.model, data=_corpus(args.data), n_features=args.features,
        max_reach=1 if kind == "plt" else None, activation=args.activation, k=args.k,
        batch_tokens=args.batch_tokens, context_length=args.context_length,
        round_contexts=args.round_contexts, model_batch=args.model_batch, steps=steps,
        warmup_steps=1, holdout=0.0, out=out, checkpoint_every=10**6, log_every=steps // 2,
        sparse="on" if step.startswith("sparse") else "off", sparse_kernels=args.kernels,
        sparsity_coef=args.sparsity_coef, async_checkpoints=False)


def _cpu_calls(mode) -> str | None:
    """How the sparse step's numba kernels were called: "ffi" (inside XLA, `clt._sparse_ffi`)
    or "callback" (jax.pure_callback; `--modes sparse-callback` forces it); None otherwise."""
    if not (isinstance(mode, tuple) and mode[1] == "cpu"):
        return None
    from clt import _sparse_ffi

    return "ffi" if _sparse_ffi.available() else "callback"


def run_case(kind: str, step: str, args) -> dict:
    """One (kind, step) case, in this process."""
    import jax
    import jax.numpy as jnp

    from clt import sharding as shd
    from clt.data import ActivationStream, estimate_norms, open_contexts
    from clt.lm.loading import load_model
    from clt.lm.model import forward
    from clt.train import Steps, init_state, place_state, train

    model = load_model(args.model)
    tc = _train_config(args, kind, step, tempfile.mkdtemp(), 2 * args.loop_steps)
    cfg = tc.transcoder_config(model.cfg)
    mesh = shd.make_mesh(1, 1)
    contexts = open_contexts(tc.data, model.tokenizer, tc.context_length, holdout=0.0)
    stream = ActivationStream(model, contexts, input_point=tc.transcoder.input_point,
                              batch_tokens=tc.batch_tokens, round_contexts=tc.round_contexts,
                              model_batch=tc.model_batch)
    row = {"kind": kind, "step": step, "activation": tc.transcoder.activation, "k": tc.transcoder.k,
           "huge_pages": TUNABLE in os.environ.get("GLIBC_TUNABLES", ""),
           "keep_heap": all(t in os.environ.get("GLIBC_TUNABLES", "") for t in KEEP_HEAP),
           "n_features": cfg.n_features, "params_M": cfg.n_params / 1e6,
           "batch_tokens": tc.batch_tokens}
    # Generation: what training runs, then the full forward with logits (same contexts).
    stream.round(0)  # compiles
    t = time.perf_counter()
    x, y, order, n_valid = stream.round(1)
    x.block_until_ready()
    gen_s = time.perf_counter() - t
    row["activation_gen_tok_s"] = tc.round_contexts * tc.context_length / gen_s
    # Training tokens per generated token (BOS, outliers and each round's remainder dropped),
    # and the loop's rate if steps were free: what generation bounds it to.
    row["kept_fraction"] = (n_valid // tc.batch_tokens) * tc.batch_tokens / (
        tc.round_contexts * tc.context_length)
    row["generation_bound_tok_s"] = row["activation_gen_tok_s"] * row["kept_fraction"]
    ctx = jnp.asarray(contexts.take(0, tc.model_batch))
    full = jax.jit(lambda p, t: forward(p, model.cfg, t, capture=("resid_mid", "mlp_out")))
    jax.block_until_ready(full(model.params, ctx))
    t = time.perf_counter()
    for i in range(0, tc.round_contexts, tc.model_batch):
        out = full(model.params, jnp.asarray(contexts.take(i, tc.model_batch)))
    jax.block_until_ready(out)
    row["full_forward_tok_s"] = tc.round_contexts * tc.context_length / (time.perf_counter() - t)
    # The step alone, on one batch of real activations.
    state = place_state(init_state(cfg, tc, estimate_norms(stream)), cfg, tc, mesh)
    steps = Steps(cfg, tc, mesh, donate=True)  # as `train` runs it
    bx, by = x[order[:tc.batch_tokens]], y[order[:tc.batch_tokens]]
    t = time.perf_counter()
    state, m = steps(state, bx, by)
    jax.block_until_ready(state)
    row["first_step_s"] = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(args.steps):
        state, m = steps(state, bx, by)
    jax.block_until_ready(state)
    step_s = (time.perf_counter() - t) / args.steps
    row.update(step_s=step_s, train_step_tok_s=tc.batch_tokens / step_s,
               sparse_capacity=m["sparse"], dense_reruns=steps.dense_reruns,
               l0_per_layer=float(jnp.mean(m["l0"])), cpu_kernel_calls=_cpu_calls(steps.mode()))
    flops = transcoder_flops_per_token(cfg)
    row["dense_gflop_per_token"] = flops / 1e9
    row["step_tflop_s_dense_equivalent"] = flops * row["train_step_tok_s"] / 1e12
    del state, steps
    # The whole loop: second half of a short run (the first half holds the compiles).
    path = train(tc, model=model, progress=False)
    rows = [json.loads(line) for line in (path.parent / "metrics.jsonl").read_text().splitlines()]
    row["loop_tok_s"] = rows[-1]["tokens_per_s"]
    row["loop_steps"] = args.loop_steps
    shutil.rmtree(tc.out, ignore_errors=True)  # checkpoints of a dense CLT are ~7 GB
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--kinds", default="clt,plt")
    ap.add_argument("--modes", default="sparse,sparse-callback,dense",
                    help="steps to time: sparse, sparse-callback (its CPU kernels through "
                    "jax.pure_callback), dense")
    ap.add_argument("--features", type=int, default=2048)
    ap.add_argument("--activation", default="batchtopk")
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--sparsity-coef", type=float, default=0.0,
                    help="tanh penalty (0, as the bundle recipes train topk / batchtopk)")
    ap.add_argument("--huge-pages", choices=("on", "off"), default="on",
                    help="run every case with glibc's malloc on transparent huge pages and a kept "
                         "heap, as `cltrace train` does (cltrace/hostmem.py), or without")
    ap.add_argument("--kernels", default="auto", help="sparse kernels: auto, xla, cpu")
    ap.add_argument("--steps", type=int, default=3, help="timed steps of the step alone")
    ap.add_argument("--loop-steps", type=int, default=4, help="timed steps of the whole loop")
    ap.add_argument("--batch-tokens", type=int, default=1024)
    ap.add_argument("--context-length", type=int, default=128)
    # One batch per round, so the loop generates before every step: 9 x 127 valid tokens = one
    # batch of 1,024 and 11% left over (each round's remainder is dropped; 16 would waste half).
    ap.add_argument("--round-contexts", type=int, default=9)
    ap.add_argument("--model-batch", type=int, default=9)
    ap.add_argument("--data", default="data/corpus")
    ap.add_argument("--out", default="bench/bench_train.json")
    ap.add_argument("--case", default=None, help=argparse.SUPPRESS)  # kind:step, internal
    args = ap.parse_args()
    if args.case:  # a child process: one case, one JSON line on stdout
        kind, step = args.case.split(":")
        print("CASE " + json.dumps(run_case(kind, step, args)), flush=True)
        return
    import jax

    dev = jax.devices()[0]
    peak = matmul_peak()
    vendor = next((v for k, v in VENDOR_PEAK.items() if k in dev.device_kind), None)
    rows = []
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    if args.huge_pages == "on":
        env = huge_pages_env(env, keep_heap=True) or env  # as `cltrace train` runs
    for kind in args.kinds.split(","):
        for step in args.modes.split(","):
            print(f"case {kind} {step} ...", flush=True)
            cmd = [sys.executable, __file__, *sys.argv[1:], "--case", f"{kind}:{step}"]
            # sparse-callback: the sparse step with its CPU kernels through jax.pure_callback.
            case_env = {**env, "CLTRACE_SPARSE_FFI": "0"} if step == "sparse-callback" else env
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=case_env)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("CASE ")), None)
            if proc.returncode != 0 or line is None:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
                print(f"case {kind} {step} failed (exit {proc.returncode}): {' | '.join(tail)}")
                rows.append({"kind": kind, "step": step, "failed": proc.returncode})
                continue
            r = json.loads(line[5:])
            r["fraction_of_matmul_peak"] = r["step_tflop_s_dense_equivalent"] * 1e12 / peak
            rows.append(r)
    ratios = {}
    for kind in args.kinds.split(","):
        got = {r["step"]: r for r in rows if r["kind"] == kind and "failed" not in r}
        if "sparse" in got and "dense" in got:
            ratios[kind] = {k: got["sparse"][k] / got["dense"][k]
                            for k in ("train_step_tok_s", "loop_tok_s")}
            if "sparse-callback" in got:
                ratios[kind]["callback_train_step_tok_s"] = (
                    got["sparse-callback"]["train_step_tok_s"] / got["dense"]["train_step_tok_s"])
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Transcoder training, {args.model}, {dev.platform} ({dev.device_kind}), "
                        f"{args.activation} k={args.k}; f32 matmul peak {peak / 1e12:.2f} TFLOP/s")
    cols = ["kind", "step", "batch_tokens", "step_s", "train_step_tok_s", "loop_tok_s",
            "generation_bound_tok_s", "activation_gen_tok_s", "full_forward_tok_s", "sparse_capacity", "l0_per_layer",
            "step_tflop_s_dense_equivalent", "cpu_kernel_calls"]
    for c in cols:
        table.add_column(c)
    for r in rows:
        table.add_row(*[f"{r[c]:.4g}" if isinstance(r.get(c), float) else str(r.get(c, "-"))
                        for c in cols])
    Console().print(table)
    for kind, rt in ratios.items():
        print(f"{kind}: sparse/dense step {rt['train_step_tok_s']:.2f}x, "
              f"whole loop {rt['loop_tok_s']:.2f}x")
    out = {"device": dev.device_kind, "platform": dev.platform, "host": platform.node(),
           "cpu_count": os.cpu_count(), "matmul_peak_flop_s": peak, "vendor_peak_flop_s": vendor,
           "args": {k: v for k, v in vars(args).items() if k != "case"}, "results": rows,
           "ratios_sparse_over_dense": ratios}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

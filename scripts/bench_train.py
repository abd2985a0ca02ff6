"""Benchmark transcoder training throughput, with activations generated online by the JAX model.

For a SmolLM2-135M transcoder with 2,048 features per layer (a CLT and a PLT), measure:
  - tokens/s of the whole training loop (model forward for activations + train step),
  - the split: activation generation tokens/s and train-step tokens/s,
  - achieved FLOP/s of the train step as a fraction of peak: the measured throughput of a large
    float32 matmul on the same device ("matmul peak"), and for known GPUs the vendor's dense peak.
FLOPs per token counted analytically: transcoder forward+backward = 3 x 2 x (encoder + decoder
multiply-adds); the model forward = 2 x its parameters (attention scores excluded).

Usage: python scripts/bench_train.py [--kinds clt,plt] [--steps 5] [--batch-tokens 1024]
       [--data data/corpus] [--out bench/bench_train.json]
Prints a table and writes JSON. Without data/corpus (scripts/build_corpus.py), uses synthetic text.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clt import sharding as shd  # noqa: E402
from clt.data import ActivationStream, estimate_norms, open_contexts  # noqa: E402
from clt.lm.loading import load_model  # noqa: E402
from clt.train import TrainConfig, compile_step, init_state, place_state  # noqa: E402

VENDOR_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 FLOP/s (SXM)


def matmul_peak(n: int = 2048, reps: int = 5) -> float:
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    t = time.perf_counter()
    for _ in range(reps):
        out = f(a)
    out.block_until_ready()
    return 2 * n**3 * reps / (time.perf_counter() - t)


def transcoder_flops_per_token(cfg) -> float:
    enc = cfg.n_layers * cfg.d_model * cfg.n_features
    dec = sum(cfg.n_targets(s) for s in range(cfg.n_layers)) * cfg.n_features * cfg.d_model
    return 3 * 2 * (enc + dec)


def _corpus(data: str) -> str:
    if Path(data).exists():
        return data
    rng = np.random.default_rng(0)
    words = "the of and to in a is that for it as was with be by on not he this are or his".split()
    path = Path(tempfile.mkdtemp()) / "synthetic.txt"
    path.write_text("\n\n".join(" ".join(rng.choice(words, 200)) for _ in range(400)))
    return str(path)


def bench(kind: str, args, model) -> dict:
    tc = TrainConfig(model=args.model, data=_corpus(args.data), n_features=args.features,
                     max_reach=1 if kind == "plt" else None, batch_tokens=args.batch_tokens,
                     context_length=args.context_length, round_contexts=args.round_contexts,
                     model_batch=args.model_batch, steps=args.steps, warmup_steps=1, holdout=0.0)
    cfg = tc.transcoder_config(model.cfg)
    mesh = shd.make_mesh(1, 1)
    contexts = open_contexts(tc.data, model.tokenizer, tc.context_length, holdout=0.0)
    stream = ActivationStream(model, contexts, input_point=tc.input_point,
                              batch_tokens=tc.batch_tokens, round_contexts=tc.round_contexts,
                              model_batch=tc.model_batch)
    stream.round(0)  # compile the model forward
    t = time.perf_counter()
    x, y, order, n_valid = stream.round(1)
    x.block_until_ready()
    gen_s = time.perf_counter() - t
    gen_tps = tc.round_contexts * tc.context_length / gen_s
    state = place_state(init_state(cfg, tc, estimate_norms(stream)), cfg, tc, mesh)
    step = compile_step(cfg, tc, mesh)
    bx, by = x[order[:tc.batch_tokens]], y[order[:tc.batch_tokens]]
    state, m = step(state, bx, by)
    jax.block_until_ready(state)
    t = time.perf_counter()
    for _ in range(args.steps):
        state, m = step(state, bx, by)
    jax.block_until_ready(state)
    step_s = (time.perf_counter() - t) / args.steps
    step_tps = tc.batch_tokens / step_s
    # The loop alternates the two (tokens kept per generated token: n_valid / round tokens).
    keep = n_valid / (tc.round_contexts * tc.context_length)
    total_tps = 1 / (1 / step_tps + 1 / (gen_tps * keep))
    flops = transcoder_flops_per_token(cfg)
    return {"kind": kind, "n_features": cfg.n_features, "params_M": cfg.n_params / 1e6,
            "batch_tokens": tc.batch_tokens, "step_s": step_s, "train_step_tok_s": step_tps,
            "activation_gen_tok_s": gen_tps, "loop_tok_s": total_tps,
            "step_tflop_s": flops * step_tps / 1e12, "gflop_per_token": flops / 1e9}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--kinds", default="clt,plt")
    ap.add_argument("--features", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch-tokens", type=int, default=1024)
    ap.add_argument("--context-length", type=int, default=128)
    ap.add_argument("--round-contexts", type=int, default=16)
    ap.add_argument("--model-batch", type=int, default=8)
    ap.add_argument("--data", default="data/corpus")
    ap.add_argument("--out", default="bench/bench_train.json")
    args = ap.parse_args()
    dev = jax.devices()[0]
    peak = matmul_peak()
    vendor = next((v for k, v in VENDOR_PEAK.items() if k in dev.device_kind), None)
    model = load_model(args.model)
    rows = [bench(k, args, model) for k in args.kinds.split(",")]
    for r in rows:
        r["fraction_of_matmul_peak"] = r["step_tflop_s"] * 1e12 / peak
        if vendor:
            r["fraction_of_vendor_peak"] = r["step_tflop_s"] * 1e12 / vendor
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Transcoder training, {args.model}, {dev.platform} ({dev.device_kind}); "
                        f"f32 matmul peak {peak / 1e12:.2f} TFLOP/s")
    cols = ["kind", "batch_tokens", "step_s", "train_step_tok_s", "activation_gen_tok_s",
            "loop_tok_s", "gflop_per_token", "step_tflop_s", "fraction_of_matmul_peak"]
    for c in cols:
        table.add_column(c)
    for r in rows:
        table.add_row(*[f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in cols])
    Console().print(table)
    out = {"device": dev.device_kind, "platform": dev.platform, "host": platform.node(),
           "cpu_count": __import__("os").cpu_count(), "matmul_peak_flop_s": peak,
           "vendor_peak_flop_s": vendor, "args": vars(args), "results": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

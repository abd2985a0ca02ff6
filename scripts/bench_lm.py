"""Forward-pass throughput of our JAX language model (default: SmolLM2-135M, batch 8 x 256 tokens).

Usage:
    python scripts/bench_lm.py                      # real embedded weights if installed
    python scripts/bench_lm.py --random-weights     # same shapes from the stored config, no GGUF
    python scripts/bench_lm.py --batch 8 --seq 256 --repeats 10 --out bench/bench_lm.json

Rows, measured side by side in one run: float32 logits only; float32 with the captures transcoder
training reads (resid_mid, mlp_out); float32 with every capture; bfloat16 logits only. Each row:
compile seconds, median seconds per forward, tokens/s, and the ratio to the first row. Weights do
not change the arithmetic, so --random-weights gives the same throughput as the real model.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np


def _time(fn, repeats: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return compile_s, statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--random-weights", action="store_true",
                    help="use the stored config of an embedded model with random weights")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="bench/bench_lm.json")
    args = ap.parse_args()

    from clt.lm import ALL, cast_params, forward, random_params
    from clt.lm.config import known_config

    if args.random_weights:
        cfg = known_config(args.model)
        params = random_params(cfg, jax.random.key(0))
        source = f"{args.model} (random weights, stored config)"
    else:
        from clt.lm import load_model

        m = load_model(args.model, with_tokenizer=False)
        cfg, params, source = m.cfg, m.params, m.source
    tokens = jnp.asarray(np.random.default_rng(0).integers(
        0, cfg.vocab_size, size=(args.batch, args.seq)), jnp.int32)
    n_tok = args.batch * args.seq
    bf16 = cast_params(params, jnp.bfloat16)
    cases = [
        ("float32, logits only", params, ()),
        ("float32, capture resid_mid+mlp_out", params, ("resid_mid", "mlp_out")),
        ("float32, capture everything", params, ALL),
        ("bfloat16, logits only", bf16, ()),
    ]
    rows = []
    for label, p, cap in cases:
        compile_s, sec = _time(lambda p=p, cap=cap: forward(p, cfg, tokens, capture=cap),
                               args.repeats)
        rows.append({"case": label, "compile_s": compile_s, "seconds": sec,
                     "tokens_per_s": n_tok / sec})
    base = rows[0]["tokens_per_s"]
    for r in rows:
        r["ratio_to_first"] = r["tokens_per_s"] / base

    dev = jax.devices()[0]
    meta = {"model": source, "batch": args.batch, "seq": args.seq, "repeats": args.repeats,
            "backend": jax.default_backend(), "device": getattr(dev, "device_kind", str(dev)),
            "n_devices": jax.device_count(), "jax": jax.__version__,
            "host": platform.node(), "cpu_count": __import__("os").cpu_count(),
            "params": int(sum(np.prod(a.shape) for a in jax.tree.leaves(params)))}
    try:
        from rich.console import Console
        from rich.table import Table

        t = Table(title=f"LM forward, {source}, {args.batch}x{args.seq} tokens, "
                        f"{meta['backend']} ({meta['device']})")
        for c in ("case", "compile s", "s / forward", "tokens/s", "ratio"):
            t.add_column(c)
        for r in rows:
            t.add_row(r["case"], f"{r['compile_s']:.2f}", f"{r['seconds']:.4f}",
                      f"{r['tokens_per_s']:,.0f}", f"{r['ratio_to_first']:.2f}")
        Console().print(t)
    except ImportError:
        for r in rows:
            print(r)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

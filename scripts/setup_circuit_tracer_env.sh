#!/usr/bin/env bash
# Build a separate Python environment holding circuit-tracer (PyPI `circuit-tracer`), for
# `scripts/bench_trace.py --compare-circuit-tracer ENV/bin/python` (issue 18). circuit-tracer is
# never a dependency of cltrace: it lives in its own venv, outside the repository by default,
# and only scripts/ct_driver.py runs inside it.
#
# Usage: scripts/setup_circuit_tracer_env.sh [ENV_DIR]   (default /work/ct-venv)
#        PYTHON=python3.11 scripts/setup_circuit_tracer_env.sh /tmp/ct
#
# Pins: torch 2.13.0 first and pinned, as the Makefile does: it is a local CPU wheel, and any
# other torch spec pulls several GB of CUDA packages. Then circuit-tracer 0.5.0 (it requires
# transformers >=4.56,<=4.57.3, transformer-lens >=2.16, nnsight >=0.6) with the versions pip
# resolved for it when the comparison was measured, pinned so that the environment rebuilds
# the same. Nothing here needs the Hugging Face hub: scripts/ct_driver.py reads local files.
set -euo pipefail
ENV_DIR=${1:-/work/ct-venv}
PYTHON=${PYTHON:-python3}

test -x "$ENV_DIR/bin/python" || "$PYTHON" -m venv "$ENV_DIR"
PIP=("$ENV_DIR/bin/pip" install --quiet)
"${PIP[@]}" --upgrade pip
"${PIP[@]}" torch==2.13.0
"${PIP[@]}" circuit-tracer==0.5.0 transformers==4.57.3 transformer-lens==3.2.1 nnsight==0.8.1 \
  tokenizers==0.22.2 huggingface-hub==0.36.2 safetensors==0.8.0 einops==0.8.2 numpy==2.4.6 \
  pyyaml==6.0.4
"$ENV_DIR/bin/python" - <<'EOF'
import circuit_tracer, torch, transformers, transformer_lens  # noqa: F401
from importlib.metadata import version
print("circuit-tracer", version("circuit-tracer"), "| torch", torch.__version__,
      "| transformers", transformers.__version__, "| transformer-lens", version("transformer-lens"))
EOF
echo "ready: $ENV_DIR/bin/python"

#!/usr/bin/env bash
# One short GPU check (at most 8 minutes): bf16 extraction throughput (resnet50_trunc, UNI ViT-L/16),
# an AMP training epoch, one paper-size MagNet step and HAG-MIL at 40,000 parents.
# Writes bench/results/gpu-<time>.json; see bench/gpu_check.py. Usage: bash bench/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
test -x "$PY" || { make install >/dev/null && PY=.venv/bin/python; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
exec timeout --signal=INT 470 "$PY" -m bench.gpu_check "$@"

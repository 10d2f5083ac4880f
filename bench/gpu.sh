#!/usr/bin/env bash
# The GPU check of issue 13, prepared to run in a few minutes on one CUDA machine (it cannot
# run on the 2-core development machine, which has no GPU):
#   1. bench/gpu.py: inverse build, end-to-end prune and ResNet-50 one-shot on CUDA, each with
#      its ratio to the CPU doing the same work and to the device's fp32 matmul rate;
#   2. the CUDA tests that the CPU-only suite skips (tests/test_device.py).
# Needs a Python with torch (a CUDA build) and this package's dependencies installed; nothing
# is downloaded. Results: bench/results/gpu.json (or $OUT/gpu.json).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-bench/results}
export PYTHONPATH=src
# Bigger gradient chunks than the 256 MiB CPU default: the device has room (4 GiB each).
export WOODFISHER_CHUNK_BYTES=${WOODFISHER_CHUNK_BYTES:-4294967296}
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device here')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
"$PY" bench/gpu.py --out "$OUT/gpu.json" "$@"
"$PY" -m pytest -q -p no:cacheprovider tests/test_device.py

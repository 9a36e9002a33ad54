#!/usr/bin/env bash
# CPU vs GPU in one call of under 7 minutes on a lent H100/H200 (the device tool):
#   run: bash benchmarks/gpu.sh   (writes $OUT/gpu.json, gpu.png, gpu-gauss.json; prints tables)
# The CUDA tests run first, so a broken GPU path shows before any timing does.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-.}"
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-/tmp/batchfit-inductor}"
python -m pip install --quiet -e '.[test]' 2>/dev/null || true
nvidia-smi --query-gpu=name,memory.total --format=csv || true
timeout 120 python -m pytest -q -x -k "device or cuda" tests/ | tail -3 || true
timeout 150 python -m batchfit bench --devices cpu cuda --dtypes float32 \
    --sizes 1e3 1e4 1e5 1e6 1e7 --cpu-max 1e6 --epochs 15000 --repeats 3 --gauss-sizes \
    --json "$out/gpu.json" --plot "$out/gpu.png"
timeout 120 python benchmarks/bench_gauss.py --sizes 1e5 1e6 --devices cuda --repeats 2 \
    --json "$out/gpu-gauss.json" || true

#!/usr/bin/env bash
# CUDA tests, then GPU tables, on a lent H100/H200 (the device tool), in under 10 minutes;
# each stage has its own time limit and writes its own files, so a slow stage costs only
# itself:  bash benchmarks/gpu.sh   (writes $OUT/*.json, *.png, *.log)
# 1. tests on the device (the cuda-parametrised ones);
# 2. the exact solver at 1e6 and 1e7 series x 100 points on CUDA (~75 s on an H100 with a
#    cold cache; CPU rows and peers there took over 150 s, so the CPU side of the comparison
#    is the recorded CPU table);
# 3. the Gaussian family (Levenberg-Marquardt) at 1e5 and 1e6 series on CUDA (its CUDA
#    compile took over 110 s there: give it time);
# 4. the iterative solvers (newton, GD and Adam for the seed's 15,000 epochs) at 1e4, 1e5.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-.}"
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-/tmp/batchfit-inductor}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # no network there: run from the tree
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
timeout 120 python3 -m pytest -q -x -p no:cacheprovider -k "device or cuda" tests/ 2>&1 \
    | tee "$out/tests.log" | tail -5
timeout 120 python3 -m batchfit bench --devices cuda --dtypes float32 --sizes 1e6 1e7 \
    --cpu-max 0 --repeats 3 --gauss-sizes --long-series 0 --json "$out/gpu-exact.json" 2>&1 \
    | tee "$out/exact.log" | grep -v "^bench:"
timeout 240 python3 benchmarks/bench_gauss.py --sizes 1e5 1e6 --devices cuda --repeats 2 \
    --json "$out/gpu-gauss.json" 2>&1 | tee "$out/gauss.log" | grep -v "^bench:"
timeout 110 python3 -m batchfit bench --devices cuda --dtypes float32 --sizes 1e4 1e5 \
    --cpu-max 0 --repeats 2 --epochs 15000 --gauss-sizes --long-series 0 \
    --json "$out/gpu-iterative.json" \
    --plot "$out/gpu.png" 2>&1 | tee "$out/iterative.log" | grep -v "^bench:"

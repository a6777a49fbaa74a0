#!/usr/bin/env bash
# The GPU check, one command on a machine with an NVIDIA GPU (sm_80 or newer):
#   1. build cuda_ext._C in place against this machine's torch (CUDA kernels required),
#   2. check every CUDA op bit for bit against the pure-torch reference (tests/test_cuda.py: random
#      odd shapes, every pad value, both CUDA paths, the packed model, CUDA graphs) plus the CPU ops,
#   3. print the benchmark tables: `bireal bench kernels|model --device cuda`.
# Needs only python3 with torch and nvcc (no .venv, no ray / mlflow / prefect / dvc, no data).
# Results: tables on stdout, logs and JSON rows in $OUT (or bench_results/). About 3 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
out=${OUT:-bench_results}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$out/gpu.txt"
# This GPU's target only (sm_90a on Hopper: the 'a' features need the exact chip); CI builds 8.0;9.0a.
arch=$($PY -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}.{n}' + ('a' if m == 9 else ''))") || exit 1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$arch} BIREAL_CUDA=1 MAX_JOBS=${MAX_JOBS:-16}
$PY -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'building for', '$TORCH_CUDA_ARCH_LIST')"

start=$SECONDS
if ! $PY setup.py -q build_ext --inplace >"$out/build.log" 2>&1; then
  tail -40 "$out/build.log"
  echo "gpu_check: BUILD FAILED (full log: $out/build.log)"
  exit 1
fi
echo "build: $((SECONDS - start)) s"

$PY -m pytest -q -p no:cacheprovider -o addopts="" tests/test_cuda.py tests/test_cuda_build.py \
  tests/test_kernels.py 2>&1 | tee "$out/tests.log" | tail -25
tests_rc=${PIPESTATUS[0]}

$PY -m pipeline.cli bench kernels --device cuda --json "$out/kernels_cuda.json" 2>&1 | tee "$out/bench_kernels.txt"
bench_rc=${PIPESTATUS[0]}
$PY -m pipeline.cli bench model --device cuda --json "$out/model_cuda.json" 2>&1 | tee "$out/bench_model.txt"
model_rc=${PIPESTATUS[0]}

echo "gpu_check: tests rc=$tests_rc, bench kernels rc=$bench_rc, bench model rc=$model_rc, $((SECONDS - start)) s"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ] && [ "$model_rc" -eq 0 ]

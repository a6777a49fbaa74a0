# Sourced by bench/gpu_check.sh and bench/gpu_sweep.sh: building cuda_ext._C in place on a GPU machine,
# each step's time limit, and the run's verdict. Needs $PY (python3 with torch) and nvcc, and the
# sourcing script's $deadline (seconds since it started, as $SECONDS counts).

# Seconds for the next step: its own limit, or what is left of the budget if that is less.
limit() { local left=$((deadline - SECONDS)); ((left < $1)) && echo $((left > 5 ? left : 5)) || echo "$1"; }

# verdict NAME: each step's rc from the caller's `status` array, then PASSED or FAILED; rc 0 if all passed.
verdict() {
  local name=$1 failed=0 k
  echo
  for k in "${!status[@]}"; do
    echo "$name: $k rc=${status[$k]}"
    ((status[$k] != 0)) && failed=1
  done
  echo "$name: $( ((failed == 0)) && echo PASSED || echo FAILED ) in $SECONDS s"
  return $failed
}

# This GPU's target only (sm_90a on Hopper: the 'a' features need the exact chip); CI builds 8.0;9.0a.
gpu_target() {
  if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
    TORCH_CUDA_ARCH_LIST=$($PY -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}.{n}' + ('a' if m == 9 else ''))") || return 1
  fi
  export TORCH_CUDA_ARCH_LIST BIREAL_CUDA=1 MAX_JOBS=${MAX_JOBS:-16}
}

# gpu_build LOG TIMEOUT_S: the in-place build (its output in LOG), then a check that the CUDA kernels are in it.
gpu_build() {
  local log=$1 limit=$2
  if ! timeout "$limit" $PY setup.py -q build_ext --inplace >"$log" 2>&1; then
    tail -40 "$log"
    echo "BUILD FAILED or timed out after at most $limit s (full log: $log)"
    return 1
  fi
  $PY -c "from cuda_ext import ops; assert ops.cuda_built(), 'no CUDA kernels in cuda_ext._C'; print('cuda_built: True, paths', ops.cuda_paths())"
}

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

# gpu_tests LOG SECONDS KEXPR PYTEST_ARGS...: GPU tests in as many pytest runs as it takes (3 at
# most), everything appended to LOG. A kernel fault leaves the process's CUDA context unusable and
# every later test would fail on it, so tests/test_cuda.py ends the process naming the test and its
# kernel path ("CUDA context lost in NAME path=PATH"); a crash (segfault, abort) is named from
# faulthandler's trace instead. The rerun skips that path's tests (BIREAL_SKIP_CUDA_PATHS, which
# test_cuda.py reads), or deselects a test without one, and runs the rest. KEXPR: pytest's -k
# expression ('' for none). Returns pytest's rc, or 1 when a run died.
gpu_tests() {
  local log=$1 seconds=$2 kexpr=$3 rc attempt start this lost name path died=""
  shift 3
  local skip=${BIREAL_SKIP_CUDA_PATHS:-} deselect=$kexpr
  touch "$log"
  for attempt in 1 2 3; do
    start=$(stat -c %s "$log")
    BIREAL_SKIP_CUDA_PATHS=$skip timeout "$(limit "$seconds")" $PY -m pytest -q -p no:cacheprovider -o addopts="" \
      "$@" ${deselect:+-k "$deselect"} >>"$log" 2>&1
    rc=$?
    ((rc < 128)) && break
    this=$(tail -c +$((start + 1)) "$log")  # this run's output only
    lost=$(grep -oE 'CUDA context lost in test_[A-Za-z0-9_]+ path=[A-Za-z0-9_]*' <<<"$this" | tail -1)
    if [ -n "$lost" ]; then
      name=$(awk '{print $5}' <<<"$lost") path=${lost##*path=}
    else
      name=$(grep -oE 'line [0-9]+ in test_[A-Za-z0-9_]+' <<<"$this" | tail -1 | awk '{print $4}') path=""
    fi
    echo "GPU tests: pytest died with rc=$rc in ${name:-an unknown test}${path:+ on $path}"
    [ -z "$name" ] && break
    died+="${died:+, }$name${path:+ ($path)}"
    if [ -n "$path" ]; then
      skip+="${skip:+,}$path"
    else
      deselect="${deselect:+($deselect) and }not $name"
    fi
  done
  [ -n "$died" ] && { echo "GPU tests: died in $died (skipped or deselected in the rerun)"; return 1; }
  return "$rc"
}

# gpu_smoke PREFIX SECONDS: `cuda_ext.smoke` (every CUDA path on every shape, against the reference)
# in as many runs as it takes (3 at most), run N printing to PREFIX_N.log and writing PREFIX_N.json.
# A kernel fault ends a run naming its path ("CUDA context lost on path=PATH"); the next run leaves
# that path out (BIREAL_SKIP_CUDA_PATHS, with any the caller set) and checks the rest. Sets
# smoke_lost to every path left out (a comma list, '' for none) for the steps after it; returns the
# last run's rc, or 1 when a path was lost here.
gpu_smoke() {
  local prefix=$1 seconds=$2 rc attempt marker lost_here=""
  smoke_lost=${BIREAL_SKIP_CUDA_PATHS:-}
  for attempt in 1 2 3; do
    BIREAL_SKIP_CUDA_PATHS=$smoke_lost CUDA_LAUNCH_BLOCKING=1 timeout "$(limit "$seconds")" \
      $PY -m cuda_ext.smoke --json "${prefix}_$attempt.json" >"${prefix}_$attempt.log" 2>&1
    rc=$?
    cat "${prefix}_$attempt.log"
    marker=$(grep -oE 'CUDA context lost on path=[A-Za-z0-9_]+' "${prefix}_$attempt.log" | tail -1)
    [ -z "$marker" ] && break
    lost_here+="${lost_here:+,}${marker##*path=}"
    smoke_lost+="${smoke_lost:+,}${marker##*path=}"
  done
  [ -z "$lost_here" ] && return "$rc"
  echo "smoke: lost the CUDA context on $lost_here (each left out of the run after it)"
  return 1
}

#!/usr/bin/env bash
# The GPU check: one command on a machine with an NVIDIA GPU (sm_80 or newer), within 8 minutes
# including the build, needing only python3 with torch and nvcc (no .venv, no ray / mlflow /
# prefect / dvc, no data, no package registry).
#
#   bench/gpu_check.sh [RESULTS_DIR]      (default: $OUT, else bench_results/)
#
#   1. build cuda_ext._C in place for this GPU, and assert the CUDA kernels are in it;
#   2. smoke (own process, CUDA_LAUNCH_BLOCKING=1): every CUDA path on a list of shapes against the
#      reference, printing per path and shape the number of wrong elements and the first wrong
#      (n, o, h, w); a kernel fault is pinned to its path and shape here, not in some later test,
#      and the smoke runs again without that path (the steps after it leave it out too);
#   3. the GPU tests only (tests/test_cuda.py and the build checks): bit-exact against the reference
#      with every output pre-filled with 0xFF bytes; a skipped test counts as a failure;
#   4. the benchmark tables: `bireal bench kernels|model --device cuda`;
#   5. the smoke again under compute-sanitizer (memcheck), with the time that is left.
# Each step has its own timeout. RESULTS_DIR receives at most 7 files: summary.txt (everything
# printed), build.log, tests.log, smoke.json, kernels_cuda.json, model_cuda.json, sanitizer.log.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
out=${1:-${OUT:-bench_results}}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
budget=${GPU_CHECK_BUDGET_S:-480}
source bench/gpu_lib.sh
deadline=$((SECONDS + budget))

step() { echo; echo "== $1 ($(date -u +%H:%M:%S), $((deadline - SECONDS)) s of the budget left)"; }

main() {
declare -A status
step "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
gpu_target || return 1
$PY -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'building for', '$TORCH_CUDA_ARCH_LIST')"

step "1. build"
echo "compiler: $(command -v ${CXX:-g++}) ($(${CXX:-g++} --version | head -1))"
start=$SECONDS
if ! gpu_build "$out/build.log" "$(limit 240)"; then
  echo "gpu_check: the build failed, or has no CUDA kernels"
  return 1
fi
echo "build: $((SECONDS - start)) s"
# The extension must use the process's libstdc++, not carry its own copy of the stream code (the
# g++ wrapper of the first GPU machine this ran on links -static-libstdc++; setup.py links the
# shared one first; docs/cuda.md).
so=$(ls cuda_ext/_C*.so | head -1)
if command -v nm >/dev/null && nm -C --defined-only "$so" | grep -q "std::ostream::_M_insert<long>"; then
  echo "gpu_check: $so carries its own copy of libstdc++'s stream code: error messages that format"
  echo "           numbers will crash or be cut short"
  status[build_abi]=1
fi

step "2. smoke"
smoke_runs=$(mktemp -d)  # one log and JSON file a run; RESULTS_DIR gets their rows in one file
gpu_smoke "$smoke_runs/smoke" 90
status[smoke]=$?
$PY -c 'import glob, json, sys; json.dump([r for f in sorted(glob.glob(sys.argv[2])) for r in json.load(open(f))],
                                        open(sys.argv[1], "w"), indent=1)' "$out/smoke.json" "$smoke_runs/smoke_*.json"
export BIREAL_SKIP_CUDA_PATHS=$smoke_lost  # the steps below run every other path

step "3. GPU tests"
timeout_opt=()
$PY -c "import pytest_timeout" 2>/dev/null && timeout_opt=(--timeout=120)
junit=$(mktemp --suffix=.xml)
test_files=(tests/test_cuda.py tests/test_cuda_build.py::test_cuda_kernels_built_and_registered
            tests/test_cuda_build.py::test_machine_code_for_sm80_and_sm90a_with_native_bmma)
: >"$out/tests.log"
gpu_tests "$out/tests.log" 240 "" -rs "${timeout_opt[@]}" --junitxml="$junit" "${test_files[@]}"
status[tests]=$?
tail -25 "$out/tests.log"
# A skip on the GPU machine means something was not checked: it fails the step.
$PY - "$junit" <<'EOF' || status[tests]=1
import sys, xml.etree.ElementTree as ET
suites = ET.parse(sys.argv[1]).getroot()
suites = [suites] if suites.tag == "testsuite" else list(suites)
n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
print("GPU tests:", n)
sys.exit(0 if n["tests"] > 0 and n["skipped"] == 0 and n["failures"] == 0 and n["errors"] == 0 else 1)
EOF

step "4. benchmarks"
timeout "$(limit 120)" $PY -m pipeline.cli bench kernels --device cuda --json "$out/kernels_cuda.json"
status[bench_kernels]=$?
timeout "$(limit 90)" $PY -m pipeline.cli bench model --device cuda --json "$out/model_cuda.json"
status[bench_model]=$?

step "5. compute-sanitizer (memcheck) on the quick smoke"
left=$((deadline - SECONDS))
if ! command -v compute-sanitizer >/dev/null; then
  echo "compute-sanitizer not found: skipped"
elif ((left < 30)); then
  echo "only $left s left: skipped"
else
  timeout "$left" compute-sanitizer --tool memcheck --error-exitcode 3 $PY -m cuda_ext.smoke --quick \
    >"$out/sanitizer.log" 2>&1
  rc=$?
  tail -6 "$out/sanitizer.log"
  if ((rc == 124)); then echo "compute-sanitizer: out of time after $left s (not a failure)"; else status[sanitizer]=$rc; fi
fi

verdict gpu_check
}

main 2>&1 | tee "$out/summary.txt"
exit "${PIPESTATUS[0]}"

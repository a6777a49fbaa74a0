#!/usr/bin/env bash
# Issue 25's GPU run, in two parts that each run alone on a bare GPU machine (python3 with torch and
# nvcc; no registry): they build the extension there first.
#
#   bench/gpu_sweep.sh --quick [RESULTS_DIR]   (<= 4 min) the build, correctness (cuda_ext.smoke on
#       every CUDA path and shape), the SASS report (registers, spills, epilogue instructions per
#       output), the profile: a forward of the packed bf16 Bi-Real-18 and of ResNet-18 bf16, kernel
#       by kernel, at batch 256 and 1, cudnn.benchmark off and on (bench/gpu_profile.py); then, with
#       the time left, tests/test_cuda.py's tests of the halo kernels, bmma_split, max_pool_signs and
#       the packed signs of signed zeros, NaN and subnormals,
#       then of the other variants (bmma_lean, bmma_lean1, bmma_async);
#   bench/gpu_sweep.sh --full [RESULTS_DIR]    (<= 5 min) the kernel sweep (bench/kernel_sweep.py:
#       each variant's bf16 conv and block on every Bi-Real-18 shape, stride 2 too, batch 256 and 1
#       as a graph: ms, GB/s, the floor and % of it, x cuDNN with cudnn.benchmark on, x float block,
#       exact or not), the model table, Nsight Compute on the bf16 conv of 64x56 where ncu runs, and
#       compute-sanitizer memcheck, racecheck and synccheck on the quick smoke where it runs.
# RESULTS_DIR (default $OUT, else bench_results) gets two files per part, so that both parts of one
# device call come back (it returns at most 8 files): gpu_sweep_<part>.txt, everything printed, and
# gpu_sweep_<part>.tar.gz, every step's own file (JSON lines, JSON, logs), bundled again as each step
# ends, so a run cut short keeps what it measured. A path whose kernel loses the CUDA context costs
# its own rows only: the smoke and the sweep run again without it, the steps after them leave it out
# (BIREAL_SKIP_CUDA_PATHS), and --quick names it in gpu_sweep_lost_paths.txt for a --full after it.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
part=${1:-}
case "$part" in --quick | --full) ;; *) echo "usage: bench/gpu_sweep.sh --quick|--full [RESULTS_DIR]" >&2; exit 2 ;; esac
results=${2:-${OUT:-bench_results}}
name=gpu_sweep_${part#--}
lost_file=$results/gpu_sweep_lost_paths.txt  # paths whose kernel lost the CUDA context (only if any)
out=$(mktemp -d "${TMPDIR:-/tmp}/$name.XXXX")  # each step's files, bundled into $results as they come
mkdir -p "$results"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
source bench/gpu_lib.sh
budget=$([ "$part" = --quick ] && echo 240 || echo 300)
deadline=$((SECONDS + budget))
# Every step's file so far, into one archive in $results (written aside, then moved into place).
bundle() { tar -czf "$out.tar.gz" -C "$out" . && mv -f "$out.tar.gz" "$results/$name.tar.gz"; }
step() { bundle; echo; echo "== $1 ($(date -u +%H:%M:%S), $((deadline - SECONDS)) s left)"; }

# A tool's run where the tool exists and time is left, else one line saying why not.
optional() {
  local tool=$1 seconds=$2 log=$3; shift 3
  if ! command -v "$tool" >/dev/null; then echo "$tool not found: skipped"; return 0; fi
  if (($(limit "$seconds") < 20)); then echo "$tool: too little time left, skipped"; return 0; fi
  timeout "$(limit "$seconds")" "$@" >"$log" 2>&1
  local rc=$?
  tail -5 "$log"
  ((rc == 124)) && { echo "$tool: out of time (not a failure)"; return 0; }
  return $rc
}

# One bf16 conv of 64x56 at batch 256 on each tensor-core kernel: what ncu looks at.
conv_64x56='
import torch
from cuda_ext import ops
x = torch.randn(256, 64, 56, 56, device="cuda").contiguous(memory_format=torch.channels_last)
px, pw = ops.pack_signs(x), ops.pack_signs(torch.randn(64, 64, 3, 3, device="cuda"))
tensor_core = ("bmma", "bmma_async", "bmma_lean", "bmma_lean1", "bmma_halo", "bmma_halo_w", "bmma_halo_p")
for path in (p for p in tensor_core if p in ops.kernel_paths("cuda")):
    with ops.forced_cuda_path(path):
        ops.binary_conv2d(px, pw, 64, 1, 1, 0.0, out_dtype=torch.bfloat16)
torch.cuda.synchronize()
'

main() {
declare -A status
step "machine and build"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
gpu_target || return 1
start=$SECONDS
gpu_build "$out/build.log" "$(limit 150)" || return 1
echo "build: $((SECONDS - start)) s for $TORCH_CUDA_ARCH_LIST with $MAX_JOBS jobs"

if [ "$part" = --quick ]; then
  step "correctness: every CUDA path on every shape"
  # a path whose kernel loses the CUDA context ends the smoke; it runs again without that path
  rm -f "$lost_file"
  gpu_smoke "$out/smoke" 60
  status[smoke]=$?
  [ -n "$smoke_lost" ] && echo "$smoke_lost" >"$lost_file"  # for --full after this part, in the same results folder
  export BIREAL_SKIP_CUDA_PATHS=$smoke_lost  # the steps below run every other path (cuda_ext.ops.skipped_cuda_paths)
  step "SASS"
  timeout "$(limit 30)" $PY -m bench.sass_report --json "$out/sass.json"
  status[sass]=$?
  step "profile: packed Bi-Real-18 bf16 and ResNet-18 bf16, batch 256 and 1, cudnn.benchmark off and on"
  timeout "$(limit 120)" $PY -m bench.gpu_profile --out "$out" --batches 256,1
  status[profile]=$?
  # last, with the time left (the smoke above has checked every path): the newest kernels' tests
  # first (about 700), then the rest of the variants' (about 2,800, most of them the lean epilogue's
  # option sets)
  step "GPU tests of the halo kernels, bmma_split, max_pool_signs and the signs of edge outputs (tests/test_cuda.py)"
  newest="(halo or split or max_pool or signs_of_zeros) and not every_option_set"
  gpu_tests "$out/tests_newest.log" 80 "$newest" tests/test_cuda.py
  status[newest_tests]=$?
  tail -3 "$out/tests_newest.log"
  step "GPU tests of the other variants under test (tests/test_cuda.py: the lean epilogue's option sets, bmma_async)"
  gpu_tests "$out/tests_variants.log" 150 "(lean or halo or async or split) and not ($newest)" tests/test_cuda.py
  status[variant_tests]=$?
  tail -3 "$out/tests_variants.log"
else
  step "kernel sweep: each variant's bf16 conv and block, every shape and stride, batch 256 and 1 (graph)"
  # variant by variant; a variant that faults leaves the process's CUDA context unusable, so the
  # sweep runs again without it and the variants done, appending to the same file (3 tries at most)
  # what --quick's smoke lost in this results folder is left out from the start
  lost=$(cat "$lost_file" 2>/dev/null)
  export BIREAL_SKIP_CUDA_PATHS=$lost
  skip="" append=()
  for attempt in 1 2 3; do
    timeout "$(limit 120)" $PY -m bench.kernel_sweep --out "$out" --batches 256,1 ${skip:+--skip "$skip"} "${append[@]}"
    status[sweep]=$?
    ((status[sweep] == 0 || status[sweep] == 3 || status[sweep] == 124)) && break  # 3: a row not exact
    { read -r done; read -r crashed; } < <($PY -m bench.kernel_sweep --unfinished "$out/kernel_sweep.jsonl")
    [ -z "$crashed" ] && break
    echo "kernel sweep: died (rc=${status[sweep]}) in $crashed; again without it and the variants done (${done:-none})"
    skip="$done${done:+,}$crashed" append=(--append) swept_lost=$crashed
  done
  [ -n "${swept_lost:-}" ] && status[sweep]=1
  lost+="${lost:+${swept_lost:+,}}${swept_lost:-}"
  export BIREAL_SKIP_CUDA_PATHS=$lost  # the steps below run every other path (cuda_ext.ops.skipped_cuda_paths)
  step "model table"
  timeout "$(limit 90)" $PY -m pipeline.cli bench model --device cuda --json "$out/model_cuda.json" --jsonl "$out/model_cuda.jsonl"
  status[model]=$?
  step "Nsight Compute: the bf16 conv of 64x56 at batch 256, each tensor-core kernel"
  optional ncu 60 "$out/ncu.log" ncu --kernel-name regex:binary_conv2d_bmma --launch-count 7 --section SpeedOfLight \
    --section Occupancy --section WarpStateStats $PY -c "$conv_64x56"
  status[ncu]=$?
  for tool in memcheck racecheck synccheck; do
    step "compute-sanitizer $tool on the quick smoke"
    optional compute-sanitizer 40 "$out/sanitizer_$tool.log" compute-sanitizer --tool "$tool" --error-exitcode 3 \
      $PY -m cuda_ext.smoke --quick
    status[$tool]=$?
  done
fi

verdict "gpu_sweep $part"
}

# main, then the last bundle, whichever way main ended (a failed build's log included)
main_then_bundle() { main; local rc=$?; bundle; return $rc; }
main_then_bundle 2>&1 | tee "$results/$name.txt"
exit "${PIPESTATUS[0]}"

#!/usr/bin/env bash
# The GPU machine's Python, rehearsed on a CPU machine before a GPU window is spent on it.
#
#   bench/gpu_env_rehearsal.sh [VENV_DIR]     (default /tmp/bireal-gpu-env; about 3.5 GB of wheels)
#
# The lent GPU machines run Python 3.12 with torch 2.11.0+cu130 and torchvision 0.26.0, and have
# none of the pipeline extra (no ray, mlflow, prefect, dvc, webdataset, s3fs); this project is
# developed on Python 3.11 with a newer torch. This script builds that environment in VENV_DIR
# (python3.12 from PATH, or $PYTHON312), builds the extension against torch 2.11's headers for
# sm_80 and sm_90a with the same nvcc, and runs, without a GPU:
#   1. the imports of every module a GPU script starts from, and `bash -n` of the shell scripts;
#   2. the tests of everything the GPU scripts call (kernels and their CUDA build and SASS, the
#      packed model, the models and training loop, the augmentation and loaders, the GPU scripts
#      themselves with --device cpu, the window plans, the profiles and planner), which need none
#      of the pipeline extra.
# A failure here is one the GPU machine would have shown at the cost of a window.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-/tmp/bireal-gpu-env}
python312=${PYTHON312:-$(command -v python3.12 || true)}
[ -n "$python312" ] || { echo "python3.12 not found: set PYTHON312 to a Python 3.12 interpreter" >&2; exit 2; }
# a pyenv shim is on PATH whether or not 3.12 is the selected version, and fails only when run
"$python312" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null || {
  echo "$python312 does not run as Python 3.12 (a pyenv shim? e.g. PYTHON312=\$(pyenv root)/versions/3.12.1/bin/python3.12)" >&2
  exit 2
}
command -v nvcc >/dev/null || { echo "nvcc not found: the rehearsal builds the CUDA kernels" >&2; exit 2; }

# what the GPU machine's image holds of this project's needs (device tool: KINDS.md's package list)
packages=(torch==2.11.0 torchvision==0.26.0 numpy pillow pyyaml safetensors tqdm scikit-learn nvidia-ml-py
  fsspec requests aiohttp ninja pytest pytest-timeout)
# the test files whose code runs on the GPU machine; the others start or import the pipeline extra
tests=(test_kernels test_cuda_build test_cuda test_packed test_models test_layers test_binarizers
  test_training_kernels test_train test_checkpoint test_augment test_data test_gpu_scripts test_cifar10_gpu
  test_ablation_gpu test_trip test_params test_profiles test_plan test_import_layers)

echo "== environment: $python312 -> $venv"
[ -x "$venv/bin/python" ] || "$python312" -m venv "$venv"
"$venv/bin/python" -m pip install -q "${packages[@]}"
"$venv/bin/python" -c "import sys, torch, torchvision; print('python', sys.version.split()[0], 'torch', torch.__version__, 'torchvision', torchvision.__version__)"
for absent in ray mlflow prefect dvc webdataset s3fs; do
  if "$venv/bin/python" -c "import $absent" 2>/dev/null; then echo "$absent is importable in $venv: the rehearsal wants it absent" >&2; exit 1; fi
done

echo "== build against torch 2.11 for sm_80 and sm_90a"
start=$SECONDS
PATH="$venv/bin:$PATH" BIREAL_CUDA=1 TORCH_CUDA_ARCH_LIST="8.0;9.0a" MAX_JOBS=${MAX_JOBS:-2} \
  "$venv/bin/python" setup.py -q build_ext --inplace >"$venv/build.log" 2>&1 || { tail -30 "$venv/build.log"; exit 1; }
echo "built in $((SECONDS - start)) s (log: $venv/build.log)"

echo "== the GPU scripts' entry points import, the shell scripts parse"
"$venv/bin/python" -c "
import importlib
for name in ('cuda_ext.smoke', 'bench.sass_report', 'bench.gpu_profile', 'bench.kernel_sweep', 'bench.gpu_train',
             'bench.cifar10_gpu', 'bench.ablation_gpu', 'bench.window', 'bench.trip', 'pipeline.cli'):
    importlib.import_module(name)
print('imports: ok')"
for script in bench/gpu_sweep.sh bench/gpu_check.sh bench/gpu_lib.sh; do bash -n "$script"; done
echo "bash -n: ok"

echo "== tests (the CPU side of the GPU scripts)"
paths=()
for name in "${tests[@]}"; do paths+=("tests/$name.py"); done
"$venv/bin/python" -m pytest -q -p no:cacheprovider -o addopts="-ra" -m "not e2e and not cluster and not services" "${paths[@]}"

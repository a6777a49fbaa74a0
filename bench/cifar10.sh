#!/usr/bin/env bash
# The CIFAR-10 accuracy run: shard ../shared/data/cifar10, pretrain the real-valued twin, binarize,
# finetune, export the packed 1-bit artifact and evaluate it through the binary kernels on the
# 10,000 test images. Writes OUT_DIR/{*_history.json, model.safetensors, evaluate.json} and the
# summary bench/results/cifar10.json (+ the artifact next to it), prints the accuracy-vs-time table.
# Recipe, width and epochs: pipeline/configs/cifar10_bireal18.yaml. About 80 minutes on 2 idle cores.
# Usage: bench/cifar10.sh [CIFAR_DIR] [OUT_DIR]      (extra stage settings: SET="--set width=0.25")
set -euo pipefail
cd "$(dirname "$0")/.."
params=${PARAMS:-pipeline/configs/cifar10_bireal18.yaml}
cifar=${1:-../shared/data/cifar10}
out=${2:-bench_results/cifar10}
results=${RESULTS:-bench/results}
bin=.venv/bin
read -r -a extra <<< "${SET:-}"
mkdir -p "$out" "$results"
shards=$($bin/python -c "import yaml,sys; print(yaml.safe_load(open(sys.argv[1]))['train']['shards'])" "$params")
ckpts=$($bin/python -c "import yaml,sys; print(yaml.safe_load(open(sys.argv[1]))['train']['out'])" "$params")
[ -f "$shards/manifest.json" ] || $bin/bireal shard --params "$params" --source "$cifar" --out "$shards"

start=$(date +%s)
for stage in pretrain binarize finetune; do
  echo "== $stage ($(( $(date +%s) - start )) s so far)"
  $bin/bireal train --stage "$stage" --params "$params" --no-ray "${extra[@]}" \
    --metrics "$out/$stage.json" --history "$out/${stage}_history.json"
done
$bin/bireal export --checkpoint "$ckpts/finetune.safetensors" --out "$out/model.safetensors"
$bin/bireal evaluate --artifact "$out/model.safetensors" --shards "$shards" \
  --checkpoint "$ckpts/finetune.safetensors" --metrics "$out/evaluate.json"
wall=$(( $(date +%s) - start ))

$bin/python -m bench.cifar10_results --params "$params" --out "$out" --wall "$wall" --results "$results/cifar10.json"

#!/usr/bin/env bash
# The paper's ablation on CIFAR-10, made fair, run by the pipeline itself: shard, pretrain the
# Bi-Real twin (relu -> leaky_clip -> clip, plus the equal-compute ReLU control), then
# `bireal tune --no-ray` (which pretrains the no-shortcut ResNet's own twin first) over the cells of
# pipeline/configs/cifar10_ablation.yaml x 3 seeds, two trial processes at a time; then
# bench/results/ablation.json. About 2.1 hours on the 2-core machine with nothing else running;
# run no benchmark beside it. Interrupted? Run it again: finished stages and trials are kept.
# Usage: bench/ablation.sh [CIFAR_DIR]   (default ../shared/data/cifar10)
set -euo pipefail
cd "$(dirname "$0")/.."
params=pipeline/configs/cifar10_ablation.yaml
cifar=${1:-../shared/data/cifar10}
bin=.venv/bin
start=${ABLATION_STARTED:-$(date +%s)}  # a resumed run can count from the first start
[ -f data/cifar10-shards/manifest.json ] || $bin/bireal shard --params "$params" --source "$cifar" --out data/cifar10-shards
[ -f checkpoints/cifar10-ablation/pretrain-relu_control.safetensors ] ||
  $bin/bireal train --stage pretrain --params "$params" --no-ray
$bin/bireal tune --params "$params" --no-ray
$bin/python -m bench.ablation_results --params "$params" --started "$start" --out bench/results/ablation.json

#!/usr/bin/env bash
# The paper's ablation on CIFAR-10, run by the pipeline itself: shard, pretrain the twin
# (relu -> leaky_clip -> clip), then `bireal tune` over estimator x init x 3 seeds.
# Usage: bench/ablation.sh [CIFAR_DIR]   (default ../shared/data/cifar10)
set -euo pipefail
cd "$(dirname "$0")/.."
params=pipeline/configs/cifar10_ablation.yaml
cifar=${1:-../shared/data/cifar10}
bin=.venv/bin
[ -f data/cifar10-shards/manifest.json ] || $bin/bireal shard --params "$params" --source "$cifar" --out data/cifar10-shards
$bin/bireal train --stage pretrain --params "$params" --no-ray
time $bin/bireal tune --params "$params"

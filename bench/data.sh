#!/usr/bin/env bash
# Sharding and loader throughput on CIFAR-10 (../shared/data/cifar10 when present) and on a
# generated ImageNet-size JPEG tree. Usage: bench/data.sh [CIFAR_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
cifar=${1:-../shared/data/cifar10}
args=(--imagenet-like 2000)
[ -d "$cifar" ] && args+=(--cifar "$cifar")
.venv/bin/bireal bench data "${args[@]}"

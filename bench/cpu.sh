#!/usr/bin/env bash
# CPU benchmark tables of the binary-conv kernels, the packed Bi-Real-18 against ResNet-18 (with
# glibc's default allocator and with freed memory kept) and the memory-bound paths (2 threads).
# Usage: bench/cpu.sh [OUT_DIR]   (JSON rows land in OUT_DIR, default bench_results/)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench_results}
mkdir -p "$out"
.venv/bin/bireal bench kernels --device cpu --json "$out/kernels_cpu.json"
.venv/bin/bireal bench model --device cpu --json "$out/model_cpu.json"
.venv/bin/bireal bench memory --device cpu --json "$out/memory_cpu.json"

#!/usr/bin/env bash
# One-epoch pilot that sizes the CIFAR-10 accuracy run (issue: a pilot decides width 0.25 or 0.5 so
# that twin + binarize + finetune fit about 3 hours on the 2-core machine). For each width: one
# full epoch of the ReLU twin (50,000 images) and one of the binary net initialized from it, on
# the full 10,000-image test set; prints img/s, seconds per epoch and top-1 per step.
# Usage: bench/cifar10_pilot.sh [CIFAR_DIR] [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
params=pipeline/configs/cifar10_ablation.yaml
cifar=${1:-../shared/data/cifar10}
out=${2:-bench_results/cifar10_pilot}
bin=.venv/bin
mkdir -p "$out"
[ -f data/cifar10-shards/manifest.json ] || $bin/bireal shard --params "$params" --source "$cifar" --out data/cifar10-shards
for width in 0.25 0.5; do
  common=(--params "$params" --no-ray --set width=$width --set max_steps_per_epoch=0 --set batch_size=128
          --set out="$out/w$width")
  $bin/bireal train --stage pretrain "${common[@]}" --set phase_epochs=[1,0,0] --metrics "$out/pretrain_w$width.json"
  $bin/bireal train --stage binarize "${common[@]}" --set init=relu --set epochs=1 --metrics "$out/binarize_w$width.json"
done
python3 - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print(f"{'width':>6} {'stage':<9} {'img/s':>7} {'s/epoch':>8} {'val top-1':>10}")
for width in ("0.25", "0.5"):
    for stage in ("pretrain", "binarize"):
        m = json.loads((out / f"{stage}_w{width}.json").read_text())
        print(f"{width:>6} {stage:<9} {m['img_s']:>7.0f} {m['train_images'] / m['img_s']:>8.0f} {m['val_top1']:>10.4f}")
PY

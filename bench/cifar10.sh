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

$bin/python - "$params" "$out" "$results" "$wall" <<'PY'
import datetime, json, os, platform, shutil, sys
from pathlib import Path

import yaml

params, out, results, wall = yaml.safe_load(open(sys.argv[1])), Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
history = {s: json.loads((out / f"{s}_history.json").read_text()) for s in ("pretrain", "binarize", "finetune")}
packed = json.loads((out / "evaluate.json").read_text())
twin = [h for h in history["pretrain"] if h["segment"] == "pretrain-relu"][-1]
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
curve, elapsed = [], 0.0
for stage, rows in history.items():
    for h in rows:
        elapsed += h["epoch_s"]
        curve.append({"stage": stage, "segment": h["segment"], "epoch": h["epoch"], "elapsed_s": round(elapsed),
                      "val_top1": round(h["val_top1"], 4)})
width = params["train"]["width"]
artifact = results / f"cifar10_bireal18_w{width}.safetensors"
shutil.copyfile(out / "model.safetensors", artifact)
summary = {"arch": params["train"]["arch"], "stem": params["train"]["stem"], "width": width,
           "epochs": {"pretrain": params["pretrain"]["phase_epochs"], "binarize": params["binarize"]["epochs"],
                      "finetune": params["finetune"]["epochs"]},
           "packed_top1": round(packed["top1"], 4), "test_images": packed["images"],
           "float_agreement": packed.get("float_agreement"),
           "float_twin_top1": round(twin["val_top1"], 4), "gap_to_float": round(twin["val_top1"] - packed["top1"], 4),
           "wall_s": wall, "machine": f"{cpu}, {os.cpu_count()} cores", "date": datetime.date.today().isoformat(),
           "artifact": str(artifact), "artifact_bytes": artifact.stat().st_size,
           "params": "pipeline/configs/cifar10_bireal18.yaml", "curve": curve}
(results / "cifar10.json").write_text(json.dumps(summary, indent=2) + "\n")
print(f"{'stage':<9} {'segment':<22} {'epoch':>5} {'elapsed s':>10} {'val top-1':>10}")
for c in curve:
    print(f"{c['stage']:<9} {c['segment']:<22} {c['epoch']:>5} {c['elapsed_s']:>10} {c['val_top1']:>10.4f}")
print(f"packed 1-bit top-1 {summary['packed_top1']:.4f} on {summary['test_images']} test images "
      f"(float twin {summary['float_twin_top1']:.4f}, gap {summary['gap_to_float']:.4f}); wall {wall} s; "
      f"artifact {artifact} ({summary['artifact_bytes']:,} bytes)")
PY

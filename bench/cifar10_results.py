"""The CIFAR-10 accuracy run's results file, shared by ``bench/cifar10.sh`` (CPU, through the CLI) and
``bench/cifar10_gpu.py`` (GPU, through the plain loop).

Reads the three stages' epoch histories and the packed artifact's evaluation from OUT_DIR, copies the
artifact next to the results file and writes the summary JSON (arch, width, epochs, packed and float
top-1, wall time, machine, date, the accuracy-vs-time curve); prints the curve as a table.
Usage: python -m bench.cifar10_results --params P --out OUT_DIR --wall SECONDS
           [--results bench/results/cifar10.json] [--machine NAME]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
from pathlib import Path

from pipeline import storage
from pipeline.params import load_params

STAGES = ("pretrain", "binarize", "finetune")


def cpu_machine() -> str:
    name = platform.processor()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            name = line.split(":", 1)[1].strip()
            break
    return f"{name}, {os.cpu_count()} cores"


def accuracy_curve(history: dict[str, list[dict]]) -> list[dict]:
    """Every epoch of every stage in order, with the training time spent up to its end."""
    curve, elapsed = [], 0.0
    for stage in STAGES:
        for h in history[stage]:
            elapsed += h["epoch_s"]
            curve.append(
                {
                    "stage": stage,
                    "segment": h["segment"],
                    "epoch": h["epoch"],
                    "elapsed_s": round(elapsed),
                    "val_top1": round(h["val_top1"], 4),
                }
            )
    return curve


def summarize(train: dict, params_file: str, out: Path, results: Path, wall: int, machine: str, **extra) -> dict:
    """``train``: the settings that ran (``run_settings``); writes ``results`` (with ``extra``'s
    fields added) and the artifact beside it, returns the summary."""
    history = {s: json.loads((out / f"{s}_history.json").read_text()) for s in STAGES}
    packed = json.loads((out / "evaluate.json").read_text())
    twin = [h for h in history["pretrain"] if h["segment"] == "pretrain-relu"][-1]
    results.parent.mkdir(parents=True, exist_ok=True)
    artifact = results.parent / f"{results.stem}_{train['arch']}_w{train['width']}.safetensors"
    shutil.copyfile(out / "model.safetensors", artifact)
    summary = {
        "arch": train["arch"],
        "stem": train["stem"],
        "width": train["width"],
        "epochs": train["epochs"],
        "packed_top1": round(packed["top1"], 4),
        "test_images": packed["images"],
        "float_agreement": packed.get("float_agreement"),
        "float_twin_top1": round(twin["val_top1"], 4),
        "gap_to_own_twin": round(twin["val_top1"] - packed["top1"], 4),  # to this run's twin, converged or not
        "wall_s": wall,
        "machine": machine,
        "date": datetime.date.today().isoformat(),
        "artifact": str(artifact),
        "artifact_bytes": artifact.stat().st_size,
        "params": params_file,
        "curve": accuracy_curve(history),
        **extra,
    }
    storage.write_text(str(results), json.dumps(summary, indent=2) + "\n")
    return summary


def print_summary(summary: dict) -> None:
    print(f"{'stage':<9} {'segment':<22} {'epoch':>5} {'elapsed s':>10} {'val top-1':>10}")
    for c in summary["curve"]:
        print(f"{c['stage']:<9} {c['segment']:<22} {c['epoch']:>5} {c['elapsed_s']:>10} {c['val_top1']:>10.4f}")
    print(
        f"packed 1-bit top-1 {summary['packed_top1']:.4f} on {summary['test_images']} test images "
        f"(its float twin {summary['float_twin_top1']:.4f}, gap to it {summary['gap_to_own_twin']:.4f}); "
        f"wall {summary['wall_s']} s on {summary['machine']}; "
        f"artifact {summary['artifact']} ({summary['artifact_bytes']:,} bytes)"
    )


def run_settings(params) -> dict:
    """What the summary records of a run's settings, from its stages' merged configs."""
    pretrain, binarize, finetune = (params.train(stage) for stage in STAGES)
    return {
        "arch": finetune.arch,
        "stem": finetune.stem,
        "width": finetune.width,
        "epochs": {"pretrain": list(pretrain.phase_epochs), "binarize": binarize.epochs, "finetune": finetune.epochs},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", required=True)
    parser.add_argument("--out", required=True, type=Path, help="the run's folder (histories, evaluate.json)")
    parser.add_argument("--wall", required=True, type=int, help="the run's wall time, seconds")
    parser.add_argument("--results", default="bench/results/cifar10.json", type=Path)
    parser.add_argument("--machine", default="", help="default: this machine's CPU")
    args = parser.parse_args()
    settings = run_settings(load_params(args.params))
    summary = summarize(settings, args.params, args.out, args.results, args.wall, args.machine or cpu_machine())
    print_summary(summary)


if __name__ == "__main__":
    main()

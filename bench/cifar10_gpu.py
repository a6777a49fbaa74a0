"""The CIFAR-10 accuracy run on a GPU machine, through the plain training loop.

The same recipe as ``bench/cifar10.sh`` (pretrain the twin, binarize, finetune, export the packed
1-bit artifact, evaluate it through the CUDA kernels on the 10,000 test images), without the CLI's
MLflow tracking or Ray: the GPU machine has only python3 + torch (+ pyyaml, safetensors, pillow), and
the gzipped CIFAR-10 shards (about 21 MB) travel with the call. Build the extension first
(``bench/gpu_check.sh`` does) so that evaluation runs the packed model on the CUDA kernels.

Every epoch is appended to ``--progress`` (JSON lines) as it ends, so a run cut off by its time limit
still returns its curve. With ``--window-s`` the run starts with a timing probe (one binarize epoch
from scratch in a folder of its own) and trains the stages not yet done in ``--out`` (its
``<stage>_history.json``) that fit the window, in order, each whole (the clip gate's cap counted);
it stops before the first that does not fit, and the next window goes on from there.
Usage: python3 -m bench.cifar10_gpu [--params P] [--set width=1.0 ...] --out DIR --results FILE.json
           [--window-s SECONDS]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bench.cifar10_results import STAGES, print_summary, run_settings, summarize
from bench.window import announce, planned_epochs, probe, refuse_if_nothing_fits, take_whole
from pipeline.params import load_params, parse_overrides

PROFILE = "pipeline/configs/cifar10_bireal18.yaml"


def machine_name() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    return "CPU only"


def epoch_writer(progress: Path | None, stage: str, started: float):
    """on_epoch callback: one JSON line per epoch, with the wall time since the run started."""

    def write(metrics: dict) -> None:
        row = {"stage": stage, "wall_s": round(time.time() - started, 1), **metrics}
        print(
            f"{stage:<9} {metrics['segment']:<22} epoch {metrics['epoch']:>3}  "
            f"val top-1 {metrics['val_top1']:.4f}  {metrics['epoch_s']:.1f} s  (wall {row['wall_s']:.0f} s)",
            flush=True,
        )
        if progress is not None:
            with progress.open("a") as f:
                f.write(json.dumps(row) + "\n")

    return write


def plan_stages(configs: dict, out: Path, s_per_epoch: float, budget_s: float | None) -> dict:
    """The stages not yet done in ``out`` that fit ``budget_s`` whole, in order (all without one)."""
    todo = [stage for stage in STAGES if not (out / f"{stage}_history.json").is_file()]
    estimate = {stage: round(planned_epochs(configs[stage]) * s_per_epoch) for stage in todo}
    return {
        "pending": todo,
        "stages": take_whole(todo, estimate, budget_s),
        "estimate_s": estimate,
        "budget_s": budget_s,
    }


def run(
    params_file: str,
    overrides: dict,
    out: Path,
    results: Path,
    progress: Path | None,
    device: str,
    window_s: float = 0.0,
) -> dict | None:
    """The run, or with ``window_s`` the part of it that fits; -> the summary once every stage is
    done (None while stages are left for the next window)."""
    from cuda_ext.packed import export_checkpoint
    from pipeline.evaluate import evaluate_artifact
    from pipeline.segments import stage_checkpoint
    from pipeline.train import train_loop

    params = load_params(params_file, overrides)  # errors name the file and key before any work
    configs = {stage: params.train(stage) for stage in STAGES}
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    timing = probe(configs["binarize"], 1) if window_s else {"s_per_epoch": 0.0}
    plan = plan_stages(configs, out, timing["s_per_epoch"], window_s - (time.time() - started) if window_s else None)
    announce(timing, plan, progress)
    if plan["pending"]:
        first = plan["pending"][0]
        needs = f"{first} needs {planned_epochs(configs[first])} epochs x {timing['s_per_epoch']} s"
        refuse_if_nothing_fits(plan, plan["stages"], f"{needs} = {plan['estimate_s'][first]} s")
    for stage in plan["stages"]:
        result = train_loop(configs[stage], on_epoch=epoch_writer(progress, stage, started))
        (out / f"{stage}_history.json").write_text(json.dumps(result["history"], indent=1))
    if plan["stages"] != plan["pending"]:
        left = plan["pending"][len(plan["stages"]) :]
        print(f"this window trained {plan['stages']}; left for the next: {left}", flush=True)
        return None
    checkpoint, artifact = str(stage_checkpoint(configs["finetune"], "finetune")), str(out / "model.safetensors")
    export_checkpoint(checkpoint, artifact)
    evaluation = evaluate_artifact(artifact, configs["finetune"].shards, checkpoint, device=device)
    (out / "evaluate.json").write_text(json.dumps(evaluation, indent=1))
    wall = round(time.time() - started)
    settings = run_settings(params)
    return summarize(settings, params_file, out, results, wall, machine_name(), overrides=overrides)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default=PROFILE)
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a train setting")
    parser.add_argument("--out", required=True, type=Path, help="the run's folder (histories, artifact)")
    parser.add_argument("--results", required=True, type=Path, help="the summary JSON (artifact beside it)")
    parser.add_argument("--progress", type=Path, help="append each epoch here as a JSON line")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--window-s", type=float, default=0.0, help="seconds this window has: the whole stages that fit (0: all)"
    )
    args = parser.parse_args()
    overrides = parse_overrides(args.set)
    summary = run(args.params, overrides, args.out, args.results, args.progress, args.device, args.window_s)
    if summary is not None:
        print_summary(summary)


if __name__ == "__main__":
    main()

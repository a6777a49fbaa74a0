"""The CIFAR-10 accuracy run on a GPU machine, through the plain training loop.

The same recipe as ``bench/cifar10.sh`` (pretrain the twin, binarize, finetune, export the packed
1-bit artifact, evaluate it through the CUDA kernels on the 10,000 test images), without the CLI's
MLflow tracking or Ray: the GPU machine has only python3 + torch (+ pyyaml, safetensors, pillow), and
the gzipped CIFAR-10 shards (about 21 MB) travel with the call. Build the extension first
(``bench/gpu_check.sh`` does) so that evaluation runs the packed model on the CUDA kernels.

Every epoch is appended to ``--progress`` (JSON lines) as it ends, so a run cut off by its time limit
still returns its curve.
Usage: python3 -m bench.cifar10_gpu [--params P] [--set width=1.0 ...] --out DIR --results FILE.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bench.cifar10_results import STAGES, print_summary, run_settings, summarize
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


def run(params_file: str, overrides: dict, out: Path, results: Path, progress: Path | None, device: str) -> dict:
    from cuda_ext.packed import export_checkpoint
    from pipeline.evaluate import evaluate_artifact
    from pipeline.train import stage_checkpoint, train_loop

    params = load_params(params_file, overrides)  # errors name the file and key before any work
    configs = {stage: params.train(stage) for stage in STAGES}
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    for stage, config in configs.items():
        result = train_loop(config, on_epoch=epoch_writer(progress, stage, started))
        (out / f"{stage}_history.json").write_text(json.dumps(result["history"], indent=1))
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
    args = parser.parse_args()
    summary = run(args.params, parse_overrides(args.set), args.out, args.results, args.progress, args.device)
    print_summary(summary)


if __name__ == "__main__":
    main()

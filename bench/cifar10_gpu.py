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
it stops before the first that does not fit, and the next window goes on from there. A GPU machine
keeps nothing between windows, so a window that leaves stages packs the checkpoints they read
(``bench/trip.py``: lossless, parts under the 16 MiB a returned file may have) into ``<out>/trip``;
the next window gets that folder back with ``--resume-from`` (its histories and its checkpoints,
each verified against its sha256) and writes into an ``--out`` of its own.
Usage: python3 -m bench.cifar10_gpu [--params P] [--set width=1.0 ...] --out DIR --results FILE.json
           [--window-s SECONDS] [--resume-from PREVIOUS_OUT]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from bench.cifar10_results import STAGES, print_summary, run_settings, summarize
from bench.trip import CARRY_IN_BYTES, MANIFEST, PART_BYTES, pack_trip, trip_bytes, unpack_trip
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


def done_stages(out: Path) -> list[str]:
    return [stage for stage in STAGES if (out / f"{stage}_history.json").is_file()]


def plan_stages(configs: dict, out: Path, s_per_epoch: float, budget_s: float | None) -> dict:
    """The stages not yet done in ``out`` that fit ``budget_s`` whole, in order (all without one)."""
    done = done_stages(out)
    todo = [stage for stage in STAGES if stage not in done]
    estimate = {stage: round(planned_epochs(configs[stage]) * s_per_epoch) for stage in todo}
    return {
        "pending": todo,
        "stages": take_whole(todo, estimate, budget_s),
        "estimate_s": estimate,
        "budget_s": budget_s,
    }


def inputs_left(configs: dict, done: list[str], pending: list[str]) -> list[str]:
    """The stage checkpoints that the pending stages read and a done stage wrote: binarize's init
    and distillation teacher (from pretrain), finetune's binarized net."""
    names = []
    if "binarize" in pending and "pretrain" in done:
        binarize = configs["binarize"]
        names += [] if binarize.init == "scratch" else [f"pretrain-{binarize.init}"]
        if binarize.distill_from and not binarize.distill_from.endswith(".safetensors"):
            names.append(binarize.distill_from)
    if "finetune" in pending and "binarize" in done:
        names.append("binarize")
    return list(dict.fromkeys(names))


def checkpoint_folder(configs: dict) -> Path:
    """Where every stage reads and writes its checkpoints (one folder: a trip unpacks there)."""
    folders = {stage: config.out for stage, config in configs.items()}
    if len(set(folders.values())) != 1 or any(config.init_from for config in configs.values()):
        raise ValueError(
            f"a run across windows keeps every stage's checkpoints in one folder (out), without init_from: {folders}"
        )
    return Path(folders["pretrain"])


def resume(previous: Path, out: Path, configs: dict) -> None:
    """A previous window's run folder, carried in: its stage histories copied into ``out``, its
    trip's checkpoints unpacked (verified) where the stages read them."""
    if not previous.is_dir():
        raise FileNotFoundError(f"{previous}: --resume-from names no folder (the last window's --out, carried in)")
    for stage in done_stages(previous):
        if not (out / f"{stage}_history.json").is_file():
            shutil.copyfile(previous / f"{stage}_history.json", out / f"{stage}_history.json")
    if (previous / "trip" / MANIFEST).is_file():
        restored = unpack_trip(previous / "trip", checkpoint_folder(configs))
        print(f"resumed from {previous}: {[path.name for path in restored]} unpacked and verified", flush=True)


# Of what one device call carries in (CARRY_IN_BYTES), the repository's files take about 5 MiB
# (python3 -m bench.trip): the shards and a trip share the rest.
REPOSITORY_BYTES = 6 * 2**20


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def pack_for_next_window(configs: dict, out: Path, left: list[str], part_bytes: int) -> None:
    """The checkpoints the stages left read, packed into ``out/trip``, with a warning when they and
    the shards cannot travel in one call."""
    names = inputs_left(configs, done_stages(out), left)
    if not names:
        return
    folder = checkpoint_folder(configs)
    files = [folder / f"{name}.safetensors" for name in names]
    manifest = pack_trip(files, out / "trip", part_bytes)
    parts = sum(len(entry["parts"]) for entry in manifest["files"])
    size, shards = trip_bytes(out / "trip"), folder_bytes(Path(configs["binarize"].shards))
    print(
        f"for the next window: {names} packed into {out / 'trip'} ({size / 2**20:.1f} MiB in {parts} parts); "
        "carry this folder in and pass it as --resume-from",
        flush=True,
    )
    if size + shards + REPOSITORY_BYTES > CARRY_IN_BYTES:
        print(
            f"warning: the trip ({size / 2**20:.1f} MiB) and the shards ({shards / 2**20:.1f} MiB) leave less than "
            f"{REPOSITORY_BYTES / 2**20:.0f} MiB of the {CARRY_IN_BYTES / 2**20:.0f} MiB a call carries in for the "
            "repository: the next window cannot start from it (a distillation teacher other than the init twin "
            "doubles the trip: distill from the init twin, or train pretrain and binarize in one window)",
            flush=True,
        )


def run(
    params_file: str,
    overrides: dict,
    out: Path,
    results: Path,
    progress: Path | None,
    device: str,
    window_s: float = 0.0,
    resume_from: Path | None = None,
    part_bytes: int = PART_BYTES,
) -> dict | None:
    """The run, or with ``window_s`` the part of it that fits; -> the summary once every stage is
    done (None while stages are left for the next window, whose inputs are then in ``out/trip``)."""
    from cuda_ext.packed import export_checkpoint
    from pipeline.evaluate import evaluate_artifact
    from pipeline.segments import stage_checkpoint
    from pipeline.train import train_loop

    params = load_params(params_file, overrides)  # errors name the file and key before any work
    configs = {stage: params.train(stage) for stage in STAGES}
    out.mkdir(parents=True, exist_ok=True)
    if resume_from is not None:
        resume(resume_from, out, configs)
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
        pack_for_next_window(configs, out, left, part_bytes)
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
    parser.add_argument("--resume-from", type=Path, help="the last window's --out (carried in): its stages and trip")
    args = parser.parse_args()
    overrides = parse_overrides(args.set)
    summary = run(
        args.params, overrides, args.out, args.results, args.progress, args.device, args.window_s, args.resume_from
    )
    if summary is not None:
        print_summary(summary)


if __name__ == "__main__":
    main()

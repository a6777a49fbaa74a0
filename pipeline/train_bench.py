"""``bireal bench train``: images/s of a training step and of the data loader, the numbers the
planner (``bireal plan``) prices a cluster run with.

- train step: a profile's model for each stage it trains (the real-valued twin for pretrain, the
  binary net for binarize), at the profile's per-worker batch and input size, one device, synthetic
  batches already on the device (the loader is measured apart); forward, loss, backward and the
  optimizer step, exactly ``train_one_epoch``'s; median over 3 timed runs after a warm-up;
- kernels: binary stages get one row per ``kernels`` setting asked for (``auto``: the binary convs
  forward on the packed ops, ``float``: the float simulation; docs/training.md), each with the bytes
  autograd saves for backward per image (what grows from batch 2 to batch 4; parameters left out);
- loader: images/s of one loader process (one CPU core) reading ImageNet-size JPEG shards through
  the training transforms (``make_loader``, the stage's augmentation), on generated photo crops.

Rows append to ``bench/results/train_throughput.json`` (``--record``) with the device, the date and
the settings; the planner reads that table and says which row it used. torch is imported inside
the functions: the CLI builds its parser from ``add_train_options`` without it.
"""

from __future__ import annotations

import datetime
import json
import statistics
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from . import storage
from .params import Params, TrainConfig, bounded
from .profile_rules import trained_stages

if TYPE_CHECKING:
    import torch

TABLE = Path(__file__).resolve().parents[1] / "bench" / "results" / "train_throughput.json"


def device_name(device: torch.device) -> str:
    import torch

    from cuda_ext.benchmarks import cpu_model

    return (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{cpu_model()}, {torch.get_num_threads()} threads"
    )


def bench_model(config: TrainConfig, num_classes: int = 1000) -> torch.nn.Module:
    """The model the stage trains first, built as the loop builds it but from scratch (no twin or
    binarize checkpoint needed: the step costs the same); finetune: the binary net constrained."""
    from .segments import constrain_for_finetune, segments

    if config.stage == "finetune":
        return constrain_for_finetune(bench_model(replace(config, stage="binarize", init="scratch")))
    scratch = replace(config, init="scratch", relu_control=False)
    return segments(scratch, num_classes)[0].prepare(None)


def synthetic_batches(batch: int, size: int, num_classes: int, device: torch.device, steps: int):
    import torch

    images = torch.randn(batch, 3, size, size, device=device)
    labels = torch.randint(0, num_classes, (batch,), device=device)
    return [(images, labels)] * steps


def routed_model(config: TrainConfig, device: torch.device) -> tuple[torch.nn.Module, int]:
    """``bench_model`` on ``device`` with its binary convs routed by ``config.kernels``, as the loop
    routes them; -> (model, how many binary convs run on the packed ops)."""
    from .train import memory_format, route_binary_convs

    model = bench_model(config).to(device, memory_format=memory_format(config, device))
    return model, route_binary_convs(model, config, device)


def step_rate(
    config: TrainConfig, model: torch.nn.Module, device: torch.device, steps: int = 20, warmup: int = 5, runs: int = 3
) -> float:
    """Median img/s of ``train_one_epoch`` over ``runs`` runs of ``steps`` steps, after ``warmup``."""

    from .train import make_optimizer, memory_format, train_one_epoch

    optimizer = make_optimizer(model, config)
    size = stage_size(config)
    amp = config.precision == "bf16" and device.type == "cuda"
    layout = memory_format(config, device)

    def run(n: int) -> float:
        batches = synthetic_batches(config.batch_size, size, 1000, device, n)
        metrics = train_one_epoch(model, batches, optimizer, lambda step: config.lr, 0, device, amp=amp, layout=layout)
        return metrics["img_s"]

    run(warmup)
    return statistics.median(run(steps) for _ in range(runs))


def saved_bytes_per_image(model: torch.nn.Module, size: int, device: torch.device) -> float:
    """Bytes autograd saves for backward per image in a training forward of ``model``: the growth
    from batch 2 to batch 4, halved, so per-batch tensors (the binarized weights) drop out;
    parameters and buffers are not counted (cuda_ext.training)."""
    import torch

    from cuda_ext.training import saved_activation_bytes

    model.train()
    saved = {
        n: saved_activation_bytes(model, lambda n=n: model(torch.randn(n, 3, size, size, device=device)))
        for n in (2, 4)
    }
    return (saved[4] - saved[2]) / 2


def stage_size(config: TrainConfig) -> int:
    """The stage's training crop (px)."""
    from .segments import stage_input_config

    return stage_input_config(config)["size"]


def augmentation(config: TrainConfig) -> str:
    """The training augmentation the stage uses (``auto``: its stem's)."""
    from .segments import stage_input_config

    return stage_input_config(config)["augment"]


def loader_rate(config: TrainConfig, images: int = 600) -> float:
    """img/s of one loader process (this process, workers=0) over generated ImageNet-size shards."""
    from .data import make_loader
    from .data_bench import _time_loader, make_imagenet_like
    from .segments import stage_input_config
    from .shard import ShardParams, shard_dataset

    input_config = stage_input_config(config)
    with tempfile.TemporaryDirectory() as tmp:
        source = make_imagenet_like(Path(tmp) / "src", images)
        shard_dataset(str(source), f"{tmp}/shards", ShardParams(resize=256, samples_per_shard=100), progress_bar=False)
        batch = min(config.batch_size, 32)
        batches, _ = make_loader(
            f"{tmp}/shards", "train", input_config, batch, train=True, workers=0, pca_lighting=config.pca_lighting
        )
        seconds, seen = _time_loader(batches)
        return seen / seconds


def print_row(row: dict) -> None:
    print(format_row(row), flush=True)


def run(
    params: Params,
    device: str,
    arch: str | None = None,
    steps: int = 20,
    loader: bool = True,
    on_row=print_row,
    kernels: list[str] | None = None,
    stages: list[str] | None = None,
    overrides: dict | None = None,
) -> list[dict]:
    """One row per trained stage of the profile (``stages`` picks some; ``arch`` and ``overrides``,
    e.g. a smaller batch, replace its settings), binary stages once per ``kernels`` setting (default:
    the profile's), plus the loader row of its last stage's augmentation. ``on_row`` sees each row
    as it is measured."""
    import torch

    dev = torch.device(device)
    rows = []
    common = {"device": device, "device_name": device_name(dev), "torch": torch.__version__}
    common["date"] = datetime.date.today().isoformat()
    changes = {**(overrides or {}), **({"arch": arch} if arch else {})}
    for stage in stages or trained_stages(params):
        base = params.train(stage, changes or None, tuned=False)
        for setting in (kernels or [base.kernels]) if stage != "pretrain" else ["float"]:
            config = replace(base, kernels=setting)
            model, packed = routed_model(config, dev)
            saved = saved_bytes_per_image(model, stage_size(config), dev)  # before training changes it
            rows.append(
                {
                    "what": "train_step",
                    "arch": config.arch,
                    "stage": stage,
                    "model": "twin" if stage == "pretrain" else "binary",
                    "batch": config.batch_size,
                    "stem": config.stem,
                    "width": config.width,
                    "size": stage_size(config),
                    "precision": config.precision,
                    "kernels": setting,
                    "packed_convs": packed,
                    "img_s": round(step_rate(config, model, dev, steps), 1),
                    "saved_mb_per_image": round(saved / 2**20, 3),
                    "params": params.path.name,
                    **common,
                }
            )
            on_row(rows[-1])
    if loader:
        config = params.train(trained_stages(params)[-1], tuned=False)
        rows.append(
            {
                "what": "loader_per_core",
                "augment": augmentation(config),
                "pca_lighting": config.pca_lighting,
                "img_s": round(loader_rate(config), 1),
                **common,
                "device": "cpu",
                "device_name": device_name(torch.device("cpu")),
            }
        )
        on_row(rows[-1])
    return rows


def format_row(row: dict) -> str:
    if row["what"] == "loader_per_core":
        return (
            f"loader, 1 core ({row['augment']}, lighting {row['pca_lighting']}): {row['img_s']:,.0f} img/s  "
            f"[{row['device_name']}]"
        )
    kernels = (
        f"kernels {row.get('kernels', 'float')} ({row.get('packed_convs', 0)} packed convs), "
        if row["model"] == "binary"
        else ""
    )
    saved = f", saved for backward {row['saved_mb_per_image']:.2f} MiB/img" if "saved_mb_per_image" in row else ""
    return (
        f"{row['arch']:<10} {row['stage']:<9} ({row['model']}, {kernels}batch {row['batch']}, "
        f"{row.get('size', '?')} px, {row['precision']}): {row['img_s']:,.1f} img/s{saved}  [{row['device_name']}]"
    )


def record(rows: list[dict], table: Path = TABLE) -> Path:
    """Append to the throughput table, replacing rows of the same measurement (device, arch, stage,
    batch, precision, width, input size, kernels; loader rows by device and augmentation)."""

    def key(r: dict) -> tuple:
        fields = (
            *("what", "device_name", "arch", "stage", "batch", "precision", "augment", "pca_lighting"),
            *("width", "size", "kernels"),
        )
        return tuple(r.get(f) for f in fields)

    old = json.loads(table.read_text()) if table.is_file() else []
    new_keys = {key(r) for r in rows}
    # whole or not at all: the table holds every GPU row measured so far
    storage.write_text(str(table), json.dumps([r for r in old if key(r) not in new_keys] + rows, indent=1) + "\n")
    return table


def add_train_options(parser) -> None:
    """The options ``bireal bench train`` and ``python -m pipeline.train_bench`` share."""
    parser.add_argument(
        "--kernels", action="append", choices=("auto", "float"), help="binary stages: a row per setting (repeatable)"
    )
    parser.add_argument("--stage", action="append", choices=("pretrain", "binarize", "finetune"), help="repeatable")
    parser.add_argument("--batch", type=bounded(int, ">= 1"), help="another per-worker batch than the profile's")
    parser.add_argument("--width", type=bounded(float, "> 0"), help="another width than the profile's")
    parser.add_argument("--precision", choices=("fp32", "bf16"), help="another precision than the profile's")
    parser.add_argument("--no-loader", action="store_true", help="no loader row")


def train_options(args) -> dict:
    chosen = (("batch_size", args.batch), ("width", args.width), ("precision", args.precision))
    overrides = {k: v for k, v in chosen if v is not None}
    return {"kernels": args.kernels, "stages": args.stage, "overrides": overrides}


def main() -> None:  # python3 -m pipeline.train_bench: the GPU machine has no `bireal` entry point
    import argparse

    import torch

    from .params import load_params

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", action="append", required=True, help="a profile (repeatable)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--json", type=Path, help="write the rows here")
    add_train_options(parser)
    args = parser.parse_args()
    rows, loaders = [], set()

    def keep(row: dict) -> None:  # written as measured: a run cut off by a time limit keeps its rows
        print_row(row)
        rows.append(row)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1) + "\n")

    for name in args.params:
        params = load_params(name)
        config = params.train(trained_stages(params)[-1], tuned=False)
        loader = (augmentation(config), config.pca_lighting)  # one loader row per augmentation
        run(
            params,
            args.device,
            steps=args.steps,
            loader=not args.no_loader and loader not in loaders,
            on_row=keep,
            **train_options(args),
        )
        loaders.add(loader)


if __name__ == "__main__":
    main()

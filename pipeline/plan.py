"""``bireal plan``: what a profile costs on N GPUs, before anyone pays for them.

Per trained stage: the global batch and the lr on N GPUs (scaled as the recipe allows), steps and
epochs, shards per data reader, the size of a checkpoint and its upload time each epoch, and the
wall time and GPU-hours, with the throughput it assumed and where that came from:
- "measured": a row of ``bench/results/train_throughput.json`` (``bireal bench train``) for this
  GPU, arch, stage, per-GPU batch and precision;
- "estimated, not measured": the nearest row on this GPU, scaled by the ratio of the two models'
  training MACs per image (``bireal_core.cost``) and by nothing else.
The per-GPU rate is the lower of the GPU's and its loader workers' (one core each, at the measured
loader rate; the processes per GPU and the cores they take on a node are printed, and a node
without enough cores is a warning); across GPUs it is multiplied by ``efficiency`` (an assumption,
printed). A card without rows of its own is priced from another card's with a stated factor
(``CARD_FACTORS``: H100 from H200 rows), and the plan says so.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

from .params import Params, TrainConfig
from .profile_rules import (
    data_readers,
    expected_lr,
    global_batch,
    reproduction_problems,
    shard_count,
    stage_epochs,
    trained_stages,
)
from .train_bench import TABLE

VAL_IMAGES = 50_000  # ILSVRC2012 validation, evaluated after every epoch
EVAL_SPEEDUP = 3.0  # a forward pass costs about a third of a training step (assumption, printed)
GPU_NAMES = {"h100": "H100", "h200": "H200", "a100": "A100", "l40s": "L40S"}
GPUS_PER_NODE = 8
# a card priced from another's rows when it has none of its own, with the stated factor: an H100
# SXM has the H200's tensor-core peak and 3.35 of its 4.8 TB/s of memory bandwidth, so a step
# runs at 0.70-1.0 of its H200 rate; the planner takes the lower end
CARD_FACTORS = {"h100": ("h200", 3.35 / 4.8, "H100 SXM's memory bandwidth over H200's, 3.35/4.8 TB/s; same peak")}


@dataclass
class Throughput:
    img_s: float | None
    source: str  # "measured: <row>" | "estimated, not measured: <how>" | "no measurement"


def read_table(table: Path = TABLE) -> list[dict]:
    return json.loads(table.read_text()) if table.is_file() else []


def training_macs(config: TrainConfig) -> float:
    """MACs of one image's forward pass (binary + real): what a training step scales with."""
    import bireal_core as bc

    cost = bc.summary(bc.create_model(config.arch, num_classes=1000, **config.model_kwargs()))
    return cost.binary_macs + cost.real_macs


def step_throughput(config: TrainConfig, gpu: str, rows: list[dict]) -> Throughput:
    """The step's img/s on ``gpu`` from the table's rows for that card; a card without rows is
    priced from another's with the stated factor (``CARD_FACTORS``), and says so."""
    own = _step_throughput(config, gpu, rows)
    if own.img_s is not None or gpu not in CARD_FACTORS:
        return own
    other, factor, why = CARD_FACTORS[gpu]
    theirs = _step_throughput(config, other, rows)
    if theirs.img_s is None:
        return own
    how = f"{GPU_NAMES[other]} rows x {factor:.2f} (stated: {why}); {theirs.source}"
    return Throughput(theirs.img_s * factor, f"from another card, not measured on {gpu}: {how}")


def _step_throughput(config: TrainConfig, gpu: str, rows: list[dict]) -> Throughput:
    name = GPU_NAMES.get(gpu, gpu).lower()
    on_gpu = [r for r in rows if r["what"] == "train_step" and name in r["device_name"].lower()]
    model = "twin" if config.stage == "pretrain" else "binary"
    exact = [
        r
        for r in on_gpu
        if (r["arch"], r.get("stage", config.stage), r["model"], r["batch"], r["precision"])
        == (config.arch, config.stage, model, config.batch_size, config.precision)
    ]
    if exact:
        # a binary stage's rows by kernels setting (rows from before the setting existed: float)
        same_kernels = [r for r in exact if model == "twin" or r.get("kernels", "float") == config.kernels]
        r = (same_kernels or exact)[-1]
        kernels = "" if model == "twin" else f", kernels {r.get('kernels', 'float')}"
        return Throughput(r["img_s"], f"measured: {r['device_name']}, {r['date']}, batch {r['batch']}{kernels}")
    same_model = [r for r in on_gpu if r["model"] == model and r["precision"] == config.precision]
    if not same_model:
        measured = [
            card
            for card, card_name in GPU_NAMES.items()
            if any(card_name.lower() in r["device_name"].lower() for r in rows if r["what"] == "train_step")
        ]
        return Throughput(
            None,
            f"no measurement on {gpu} (rows for: {', '.join(measured) or 'no card'}; "
            "bireal bench train --device cuda --record adds them)",
        )
    # the nearest measured arch, scaled by training MACs per image
    r = min(same_model, key=lambda r: (r["arch"] != config.arch, abs(r["batch"] - config.batch_size)))
    ratio = training_macs(replace(config, arch=r["arch"])) / training_macs(config)
    how = f"{r['arch']} {r['model']} at batch {r['batch']} measured {r['img_s']:,.0f} img/s x MAC ratio {ratio:.2f}"
    return Throughput(r["img_s"] * ratio, f"estimated, not measured: {how}")


def loader_per_core(config: TrainConfig, rows: list[dict]) -> Throughput:
    from .train_bench import augmentation

    matching = [
        r
        for r in rows
        if r["what"] == "loader_per_core"
        and (r["augment"], r["pca_lighting"]) == (augmentation(config), config.pca_lighting)
    ]
    if not matching:
        return Throughput(None, "no loader measurement (bireal bench train)")
    r = matching[-1]
    return Throughput(r["img_s"], f"measured: {r['device_name']}, {r['date']}")


def checkpoint_bytes(config: TrainConfig) -> int:
    """A per-epoch train state: fp32 weights and buffers + the optimizer's state for trainable
    weights (Adam: 2 moments; SGD with momentum: 1)."""
    from .train_bench import bench_model

    model = bench_model(config)
    weights = sum(t.numel() for t in model.state_dict().values() if t.is_floating_point())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    moments = 2 if config.optimizer == "adam" else (1 if config.momentum else 0)
    return 4 * (weights + moments * trainable)


def plan_stage(
    params: Params, stage: str, gpus: int, gpu: str, rows: list[dict], upload_gb_s: float, eff: float, cores: int
):
    config = params.train(stage, tuned=False)
    images = params.data.train_images
    batch = global_batch(params, stage, gpus)
    lr = expected_lr(params, stage, gpus) if stage in params.recipe.batch else config.lr
    step = step_throughput(config, gpu, rows)
    loader = loader_per_core(config, rows)
    per_gpu = step.img_s
    loader_bound = False
    if per_gpu is not None and loader.img_s is not None:
        loader_cap = loader.img_s * max(1, config.loader_workers)
        loader_bound = loader_cap < per_gpu
        per_gpu = min(per_gpu, loader_cap)
    per_node = min(gpus, GPUS_PER_NODE)
    loader_cores = per_node * (max(1, config.loader_workers) + 1)  # each GPU's workers and its trainer
    ckpt = checkpoint_bytes(config)
    upload_s = ckpt / (upload_gb_s * 1e9)
    epochs = stage_epochs(params, stage)
    row = {
        "stage": stage,
        "arch": config.arch,
        "epochs": epochs,
        "per_gpu_batch": config.batch_size,
        "global_batch": batch,
        "lr": lr,
        "steps_per_epoch": math.ceil(images / batch) if images else None,
        "shards": shard_count(params),
        "data_readers": data_readers(params, stage, gpus),
        "checkpoint_mb": ckpt / 1e6,
        "upload_s_per_epoch": upload_s,
        "gpu_img_s": step.img_s,
        "effective_img_s": per_gpu,  # per GPU, after the loader cap
        "gpu_source": step.source,
        "loader_img_s_per_core": loader.img_s,
        "loader_source": loader.source,
        "loader_bound": loader_bound,
        "loader_processes_per_gpu": max(1, config.loader_workers),
        "node_cores_needed": loader_cores,
        "node_cores": cores,
        "wall_h": None,
        "gpu_hours": None,
    }
    if per_gpu and images:
        rate = per_gpu * gpus * (eff if gpus > 1 else 1.0)
        epoch_s = images / rate + VAL_IMAGES / (rate * EVAL_SPEEDUP) + upload_s
        row["wall_h"] = epochs * epoch_s / 3600
        row["gpu_hours"] = row["wall_h"] * gpus
    return row


def plan(
    params: Params,
    gpus: int,
    gpu: str = "h100",
    upload_gb_s: float = 1.0,
    efficiency: float = 0.9,
    table=TABLE,
    cores_per_node: int = 96,
) -> dict:
    rows = read_table(table)
    stages = [
        plan_stage(params, s, gpus, gpu, rows, upload_gb_s, efficiency, cores_per_node) for s in trained_stages(params)
    ]
    warnings = [p for p in reproduction_problems(params, gpus) if ".lr is" not in p]  # the plan scales the lr
    for s in stages:
        if s["node_cores_needed"] > cores_per_node:
            warnings.append(
                f"{s['stage']}: {min(gpus, GPUS_PER_NODE)} GPUs x ({s['loader_processes_per_gpu']} loader processes + "
                f"1 trainer) need {s['node_cores_needed']} cores, the node has {cores_per_node}: lower "
                "train.loader_workers, or the loader rate assumed is not reached"
            )
    total = [s["wall_h"] for s in stages]
    path = Path(params.path).resolve()
    return {
        "params": str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path),
        "gpus": gpus,
        "gpu": gpu,
        "nodes": math.ceil(gpus / GPUS_PER_NODE),
        "assumptions": {
            "cores_per_node": cores_per_node,
            "data_parallel_efficiency": efficiency,
            "upload_gb_s": upload_gb_s,
            "eval_speedup": EVAL_SPEEDUP,
            "val_images": VAL_IMAGES,
        },
        "stages": stages,
        "wall_h": sum(total) if None not in total else None,
        "gpu_hours": sum(s["gpu_hours"] for s in stages) if None not in total else None,
        "warnings": warnings,
    }


def _num(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def format_plan(p: dict) -> str:
    a = p["assumptions"]
    lines = [
        f"bireal plan: {p['params']} on {p['gpus']} x {p['gpu']} ({p['nodes']} node(s) of 8)",
        f"{'stage':<9}{'arch':<11}{'epochs':>7}{'batch/GPU':>10}{'global':>8}{'lr':>10}{'steps/ep':>9}"
        f"{'shards/rdr':>11}{'ckpt MB':>9}{'upload s':>9}{'img/s/GPU':>10}{'w/ loader':>10}{'wall h':>8}{'GPU-h':>8}",
    ]
    for s in p["stages"]:
        per_reader = s["shards"] / s["data_readers"] if s["shards"] else None
        lines.append(
            f"{s['stage']:<9}{s['arch']:<11}{s['epochs']:>7}{s['per_gpu_batch']:>10}{s['global_batch']:>8}"
            f"{s['lr']:>10.3g}{_num(s['steps_per_epoch'], ','):>9}{_num(per_reader, '.1f'):>11}"
            f"{s['checkpoint_mb']:>9.0f}{s['upload_s_per_epoch']:>9.1f}{_num(s['gpu_img_s'], ',.0f'):>10}"
            f"{_num(s['effective_img_s'], ',.0f'):>10}"
            f"{_num(s['wall_h'], ',.1f'):>8}{_num(s['gpu_hours'], ',.0f'):>8}"
        )
    lines.append(f"total: {_num(p['wall_h'], ',.1f')} h wall, {_num(p['gpu_hours'], ',.0f')} GPU-hours")
    lines.append("throughput assumed:")
    for s in p["stages"]:
        bound = ""
        if s["loader_bound"]:
            bound = f"; loader-bound: {s['effective_img_s']:,.0f} img/s from the loader workers (more, or more cores)"
        lines.append(f"  {s['stage']}: GPU step {s['gpu_source']}{bound}")
        loader = _num(s["loader_img_s_per_core"], ",.0f")
        lines.append(
            f"  {s['stage']}: loader {loader} img/s per process x {s['loader_processes_per_gpu']} processes per GPU "
            f"(train.loader_workers; {s['node_cores_needed']} of a node's {s['node_cores']} cores with the trainers), "
            f"{s['loader_source']}"
        )
    lines.append(
        f"assumptions: data-parallel efficiency {a['data_parallel_efficiency']:g} across GPUs, checkpoint upload at "
        f"{a['upload_gb_s']:g} GB/s, evaluation of {a['val_images']:,} images per epoch at {a['eval_speedup']:g}x the "
        f"training rate, {a['cores_per_node']} CPU cores per node of {GPUS_PER_NODE} GPUs"
    )
    lines += [f"WARNING {w}" for w in p["warnings"]]
    return "\n".join(lines)

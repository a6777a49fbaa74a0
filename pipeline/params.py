"""Parameters: read once, validated once, into typed sections.

Configuration flows one way: typed defaults (the dataclasses below) <- the params file <- the
command line. ``load_params`` reads the file once and checks every section, key, type and
enumerated choice (``Literal``) before any work starts; an error names the file, the dotted key,
the bad value and the allowed values. This module is the bottom of the pipeline's layers: it
imports neither torch nor ray/mlflow/prefect/dvc (``bireal check-params`` runs in well under a
second), and every layer above takes its typed sections from it.

Profiles (``pipeline/configs/*.yaml``, package data) load by name: ``--params cifar10_bireal18``.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import hashlib
import json
import math
import os
import re
import types
import typing
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal, TypeVar

import yaml

from . import storage

T = TypeVar("T")

CONFIGS_DIR = Path(__file__).with_name("configs")

# The enumerated choices; bireal_core and the stages accept exactly these (tests/test_params.py
# pins them against the model registry and the binarizers).
Stage = Literal["pretrain", "binarize", "finetune"]
Arch = Literal["bireal18", "bireal34", "bireal50", "bireal101", "bireal152", "binary_resnet18", "resnet18", "resnet34"]
Stem = Literal["small", "imagenet"]
Activation = Literal["approx_sign", "ste_sign", "identity_sign"]
WeightGradient = Literal["paper", "official", "plain", "caffe"]
Init = Literal["scratch", "relu", "relu_control", "clip"]
Phase = Literal["relu", "leaky_clip", "clip"]
Optimizer = Literal["adam", "sgd"]
Schedule = Literal["auto", "linear", "step", "cosine"]
Precision = Literal["fp32", "bf16"]
Kernels = Literal["auto", "float"]
MemoryFormat = Literal["auto", "channels_last", "contiguous"]
Loader = Literal["stream", "resident"]
Decode = Literal["worker", "device"]
Augment = Literal["auto", "imagenet", "caffe", "small"]
LatentInit = Literal["default", "official"]
Search = Literal["grid", "random"]
Resume = Literal["auto", "never"]
Backend = Literal["auto", "nccl", "gloo"]
# the training process group's timeout (Ray Train's TorchConfig.timeout_s): how long a collective
# waits for a rank that is late; storage.stage_wait_s must stay below it
PROCESS_GROUP_TIMEOUT_S = 1800.0
Placement = Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]

STAGES: tuple[str, ...] = typing.get_args(Stage)

# The pipeline's fixed output paths (relative to where it runs; checkpoints and shards come from params)
ARTIFACT = "artifacts/model.safetensors"  # the packed 1-bit model
METRICS = "metrics"  # <stage>.json per stage (dvc metrics show)
CONFUSION = "plots/confusion.csv"
EPOCH_CURVES = "plots/epochs"  # <stage>.csv per training stage, a row per epoch (dvc plots show)


class ConfigError(ValueError):
    """A bad params entry or override; the message names the file and the dotted key."""


# ---------------------------------------------------------------------------- sections


@dataclass
class DataConfig:
    source: str = "demo"  # image-folder tree, folder with the ILSVRC2012 tars, or "demo"
    # training images the source holds (ImageNet: 1281167): lets check-params and `bireal plan`
    # count shards and steps before the data is sharded; 0 = unknown (the manifest tells, later)
    train_images: int = 0

    RANGES: ClassVar[dict[str, str]] = {"train_images": ">= 0"}

    def __post_init__(self):
        check_ranges(self)


@dataclass(frozen=True)
class ShardParams:
    """Sharding options (the ``shard`` section)."""

    resize: int = 256  # shorter side; larger images are downscaled (Lanczos), 0 keeps all
    jpeg_quality: int = 90  # for images that must be re-encoded
    samples_per_shard: int = 5000
    max_shard_bytes: int = 1 << 30  # a shard closes before it would exceed this
    gzip: bool = False  # tar headers dominate small images: gzip saves ~7x on CIFAR-10
    seed: int = 0  # shuffle order of the samples
    processes: int = 2  # decode/encode workers

    RANGES: ClassVar[dict[str, str]] = {
        "resize": ">= 0",
        "jpeg_quality": "in [1, 100]",
        "samples_per_shard": ">= 1",
        "max_shard_bytes": ">= 1",
        "seed": ">= 0",
        "processes": ">= 1",
    }

    def __post_init__(self):
        check_ranges(self)


PAD_VALUES = (0.0, 1.0, -1.0)  # bireal_core.layers.PAD_VALUES (tests/test_params.py), without torch


@dataclass
class TrainConfig:
    """One stage's settings: the ``train`` section <- the stage's section <- CLI ``--set``."""

    stage: Stage = "binarize"
    # model
    arch: Arch = "bireal18"
    stem: Stem = "small"
    width: float = 0.25
    pad_value: float = 0.0
    # data
    shards: str = "data/shards"  # shard folder or URL (manifest.json inside)
    out: str = "checkpoints"  # stage checkpoints are written here
    batch_size: int = 64
    loader_workers: int = 1  # DataLoader workers per training worker
    # stream: the JPEG shards decoded every epoch by DataLoader workers (any data set); resident:
    # decoded once into one uint8 tensor on the training device and augmented there (small images
    # at the input size, e.g. CIFAR-10: pipeline/resident.py)
    loader: Loader = "stream"
    # stream's JPEG decode: worker (PIL in the DataLoader workers, uint8 crops handed over) or
    # device (the workers hand over the JPEG bytes; decode, crop and flip run batched on the
    # training device: nvJPEG on a GPU, pipeline/decode.py)
    decode: Decode = "worker"
    shuffle_buffer: int = 500
    pca_lighting: bool = False
    augment: Augment = "auto"  # auto (the stem's) | imagenet (RandomResizedCrop) | caffe | small
    max_steps_per_epoch: int = 0  # 0: the whole epoch; >0: smoke runs
    # steps between reads of the device-side non-finite-loss flag (no host sync per step); it is
    # also read at every epoch's end, before any checkpoint is written
    finite_check_steps: int = 50
    # > 0: the first `holdout` samples of the train split (the sharder's seeded shuffle, so a fixed
    # random subset) are held out of training and are the split every epoch evaluates (val_*), for
    # any pick (tune, the ablation); the test split is then reported beside it (test_*). 0: train
    # on the whole train split and evaluate the val/test split.
    holdout: int = 0
    # optimisation
    epochs: int = 1
    optimizer: Optimizer = "adam"  # adam: official recipe (linear decay to 0); sgd: paper's
    lr: float = 1e-3
    momentum: float = 0.9
    nesterov: bool = False  # sgd only: Nesterov momentum
    weight_decay: float = 0.0  # real parameters only; binary weights always get 0
    # auto: adam decays linearly to 0 (official), sgd steps x0.1 at lr_milestones (paper); linear |
    # step | cosine (to 0) for either optimizer; each segment (phase, step) has its own schedule
    schedule: Schedule = "auto"
    lr_milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])  # step: x0.1 at these fractions
    label_smoothing: float = 0.1
    precision: Precision = "fp32"  # fp32 (both references) | bf16 (autocast, CUDA only)
    # auto: binary convs run forward on the packed 1-bit ops where the device has them, saving 1-bit
    # signs for backward (cuda_ext.training); float: the float simulation (docs/training.md)
    kernels: Kernels = "auto"
    # the layout of the model's weights and of every batch: auto = channels_last on a GPU (what
    # bf16 tensor-core convs and the packed ops take without a copy), contiguous (NCHW) on a CPU
    memory_format: MemoryFormat = "auto"
    # torch.compile the model for training (its forward and backward; the binary convs through the
    # ops' fake kernels): off until a GPU run measures a gain (bench/gpu_train.py's compile rows)
    compile: bool = False
    weight_clip: float = 0.0  # > 0: clamp binarized latent weights to [-c, c] after each step
    # (Larq's weight_clip; Larq Zoo's Bi-Real-18 used 1.0)
    seed: int = 0
    # pretrain
    phases: list[Phase] = field(default_factory=lambda: ["relu", "leaky_clip", "clip"])
    phase_epochs: list[int] = field(default_factory=lambda: [1, 1, 1])
    # each phase's starting lr as a multiple of `lr`, with its own schedule: the leaky_clip and clip
    # phases fine-tune the previous phase's weights, so they start lower (paper, section 3.3)
    phase_lr_scale: list[float] = field(default_factory=lambda: [1.0, 0.1, 0.1])
    # the ablation's equal-compute control: the first (relu) phase's twin also trains on, still
    # ReLU, through the later phases' epochs and lrs -> pretrain-relu_control (init: relu_control)
    relu_control: bool = False
    # > 0: the clip twin must end within this much top-1 of the ReLU twin (0.02: two points), on the
    # split every epoch evaluates; while it is not, the clip phase runs again (its epochs, its lr
    # scale) up to clip_gate_max_epochs more, then the stage stops with an error naming the gap
    clip_gate: float = 0.0
    clip_gate_max_epochs: int = 0
    # > 0: the ReLU twin must end its phase at this top-1 or more, else the stage stops naming it
    # (an under-trained twin makes every comparison that starts from it say little)
    relu_floor: float = 0.0
    # binarize
    init: Init = "clip"  # scratch | relu | relu_control | clip (which pretrain checkpoint)
    latent_init: LatentInit = "default"  # scratch only: default (PyTorch's conv init) | official
    # (the authors' code: uniform [0, 0.001) latent weights)
    activation: Activation = "approx_sign"
    weight_gradient: WeightGradient = "paper"
    two_step: bool = False
    step1_epochs: int = 1  # two_step: of `epochs`, the activations-only ones
    # two_step: step 1's weight decay on its real weights (ReActNet: 1e-5); null: weight_decay
    step1_weight_decay: float | None = None
    # distillation (ReActNet's distribution loss; not Bi-Real's recipe): a teacher checkpoint (a
    # path or URL to .safetensors, or a stage checkpoint's name such as pretrain-relu, read like
    # init's) whose soft targets the student matches: loss = (1 - w) CE + w T^2 KL(p_teacher || p_student)
    distill_from: str = ""
    distill_weight: float = 1.0  # w: 1 = the KL term alone (ReActNet)
    distill_temperature: float = 1.0  # T
    init_from: str = ""  # folder of the pretrain checkpoints (default: out)
    tuned_config: str = ""  # a `bireal tune` best-config JSON whose keys override these
    artifacts: str = ""  # where rank 0 publishes the stage checkpoints (set from storage.artifacts)
    # finetune
    finetune_fc: bool = False  # also retrain the FC head (BN alone absorbs alpha)

    RANGES: ClassVar[dict[str, str]] = {
        "width": "> 0",
        "batch_size": ">= 1",
        "loader_workers": ">= 0",
        "shuffle_buffer": ">= 0",
        "max_steps_per_epoch": ">= 0",
        "finite_check_steps": ">= 1",
        "holdout": ">= 0",
        "epochs": ">= 0",
        "lr": "> 0",
        "momentum": "in [0, 1)",
        "weight_decay": ">= 0",
        "lr_milestones": "in (0, 1)",
        "label_smoothing": "in [0, 1)",
        "weight_clip": ">= 0",
        "seed": ">= 0",
        "phase_epochs": ">= 0",
        "phase_lr_scale": "> 0",
        "clip_gate": "in [0, 1)",
        "clip_gate_max_epochs": ">= 0",
        "relu_floor": "in [0, 1)",
        "step1_epochs": ">= 0",
        "step1_weight_decay": ">= 0",
        "distill_weight": "in [0, 1]",
        "distill_temperature": "> 0",
    }

    def __post_init__(self):
        check_choices(self)
        check_ranges(self)
        if self.pad_value not in PAD_VALUES:  # a float setting with three meaningful values
            raise ValueError(
                f"pad_value={self.pad_value!r}: one of {', '.join(f'{v:g}' for v in PAD_VALUES)} (what a binary "
                "conv's border holds after the sign: 0 as the paper's zero padding, or +1 / -1)"
            )
        if len(self.phases) != len(self.phase_epochs):
            raise ValueError(
                f"phases ({len(self.phases)}) and phase_epochs ({len(self.phase_epochs)}) differ in length"
            )
        if len(self.phase_lr_scale) != len(self.phases):
            raise ValueError(
                f"phase_lr_scale={self.phase_lr_scale}: one positive factor per phase "
                f"({len(self.phases)} phases: {self.phases})"
            )
        if self.relu_control and (self.phases[:1] != ["relu"] or len(self.phases) < 2):
            raise ValueError(
                f"relu_control continues the first phase, which must be relu, through the later "
                f"phases' epochs: phases={self.phases}"
            )
        if self.two_step and self.stage == "binarize" and not 0 < self.step1_epochs < self.epochs:
            raise ValueError(
                f"two_step: epochs={self.epochs} counts step 1's step1_epochs={self.step1_epochs} "
                "too (equal compute with one-step runs): need 0 < step1_epochs < epochs"
            )
        if sorted(self.lr_milestones) != self.lr_milestones:
            raise ValueError(f"lr_milestones={self.lr_milestones}: fractions of the stage's steps, in increasing order")
        if self.nesterov and (self.optimizer != "sgd" or self.momentum <= 0):
            raise ValueError(
                f"nesterov needs optimizer: sgd with momentum > 0 "
                f"(optimizer={self.optimizer}, momentum={self.momentum})"
            )
        if self.clip_gate and (
            self.phases[:1] != ["relu"] or self.phases[-1:] != ["clip"] or not self.phase_epochs[-1]
        ):
            raise ValueError(
                f"clip_gate compares the clip twin with the ReLU twin: phases must start with relu and end with "
                f"clip, with clip epochs > 0 (phases={self.phases}, phase_epochs={self.phase_epochs})"
            )
        if self.relu_floor and self.phases[:1] != ["relu"]:
            raise ValueError(
                f"relu_floor={self.relu_floor}: a top-1 that the first phase, relu, must reach (phases={self.phases})"
            )

    def model_kwargs(self) -> dict:
        return {"stem": self.stem, "width": self.width, "pad_value": self.pad_value}


# Whether each training setting changes what a stage computes (True) or only how or where it runs
# (False). A relaunch whose math settings and data are those of the run in storage resumes it, also
# with other operational settings (fewer loader workers after an OOM, another folder); one whose
# math changed is refused ("inputs changed: pass --restart"), and only --restart discards the run's
# checkpoints (pipeline/adapters/ray_train.py). tests/test_params.py fails on a setting missing here.
AFFECTS_MATH: dict[str, bool] = {
    # where things are: the data's identity is its manifest, which the digest reads separately
    "shards": False,
    "out": False,
    "init_from": False,
    "tuned_config": False,  # a path: its pick is applied to the settings below before the digest
    "artifacts": False,
    # how it runs: the same recipe
    "loader_workers": False,
    "loader": False,  # stream or resident: the same augmentation recipe, decoded elsewhere
    "decode": False,  # worker or device: the same recipe, resampled by PIL or by torch
    "kernels": False,  # packed ops or the float simulation: the same estimators and rules
    "memory_format": False,  # a layout: the same convolutions
    "compile": False,  # the same graph, generated code
    "finite_check_steps": False,
    # what it computes
    "stage": True,
    "arch": True,
    "stem": True,
    "width": True,
    "pad_value": True,
    "batch_size": True,
    "shuffle_buffer": True,
    "pca_lighting": True,
    "augment": True,
    "max_steps_per_epoch": True,
    "holdout": True,
    "epochs": True,
    "optimizer": True,
    "lr": True,
    "momentum": True,
    "nesterov": True,
    "weight_decay": True,
    "schedule": True,
    "lr_milestones": True,
    "label_smoothing": True,
    "precision": True,  # bf16 autocast changes the numbers, not only the speed
    "weight_clip": True,
    "seed": True,
    "phases": True,
    "phase_epochs": True,
    "phase_lr_scale": True,
    "relu_control": True,
    "clip_gate": True,
    "clip_gate_max_epochs": True,
    "relu_floor": False,  # a gate: it stops a stage, never changes what an epoch computes
    "init": True,
    "latent_init": True,
    "activation": True,
    "weight_gradient": True,
    "two_step": True,
    "step1_epochs": True,
    "step1_weight_decay": True,
    "distill_from": True,
    "distill_weight": True,
    "distill_temperature": True,
    "finetune_fc": True,
}


def math_settings(config: TrainConfig) -> dict[str, Any]:
    """The settings of ``config`` that change what its stage computes (``AFFECTS_MATH``)."""
    return {k: v for k, v in dataclasses.asdict(config).items() if AFFECTS_MATH[k]}


@dataclass
class TuneSettings:
    """The ``tune`` section: Ray Tune over the binarize stage's settings."""

    enabled: bool = True  # false: the stage writes an empty pick, binarize keeps its own
    # the grid: every combination of these axes (archs: empty = the train section's arch)
    archs: list[Arch] = field(default_factory=list)
    activations: list[Activation] = field(default_factory=lambda: ["approx_sign", "ste_sign"])
    weight_gradients: list[WeightGradient] = field(default_factory=lambda: ["paper"])
    inits: list[Init] = field(default_factory=lambda: ["scratch", "clip"])
    two_step: list[bool] = field(default_factory=lambda: [False])
    optimizers: list[Optimizer] = field(default_factory=lambda: ["adam"])
    # cells beside the grid: the paper's cell (ApproxSign, magnitude-aware, clip init, one step,
    # the first optimizer, the train arch) with the settings each entry names changed, e.g.
    # [{weight_gradient: caffe}, {arch: binary_resnet18}]: one axis at a time, as the paper ablates
    extra_cells: list[dict[str, Any]] = field(default_factory=list)
    lr_min: float = 0.002  # log-uniform in [lr_min, lr_max]; equal bounds fix it
    lr_max: float = 0.002
    seeds: list[int] = field(default_factory=lambda: [0])
    search: Search = "grid"  # grid: every cell x seed; random: num_samples draws
    num_samples: int = 1
    epochs: int = 1  # per trial (binarize epochs)
    max_steps_per_epoch: int = 0  # 0: whole epochs; >0 caps the images per epoch
    asha: bool = True  # early stopping (ASHA on val_top1); off for ablations
    grace_period: int = 1
    max_concurrent: int = 2
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0  # 1 on a GPU cluster
    storage_path: str = "ray_results"
    out: str = "tune"  # best config, table, plot
    # The ablation's design (docs/science.md). twin_per_seed: each seed's trials start from twins
    # pretrained with that seed (the twins' variance is sampled), not from the pretrain stage's one.
    twin_per_seed: bool = False
    # the scratch cells' epochs: equal compute with a cell that starts from a twin is the twin's
    # epochs + `epochs` (0: `epochs`, and the claim says the compute is unequal)
    scratch_epochs: int = 0
    # the budget check: these cells (the paper's cell with the settings each entry names changed;
    # {} is the paper's own) trained again at check_epochs, so each claim is judged at two budgets
    check_epochs: int = 0
    check_cells: list[dict[str, Any]] = field(default_factory=list)
    # a claim reads "contradicted" only where the paper's cell reaches this top-1 (below it a
    # comparison of 1-bit nets says little about their converged accuracy)
    paper_cell_bar: float = 0.0

    RANGES: ClassVar[dict[str, str]] = {
        "lr_min": "> 0",
        "lr_max": "> 0",
        "seeds": ">= 0",
        "num_samples": ">= 1",
        "epochs": ">= 1",
        "max_steps_per_epoch": ">= 0",
        "grace_period": ">= 1",
        "max_concurrent": ">= 1",
        "cpus_per_trial": "> 0",
        "gpus_per_trial": ">= 0",
        "scratch_epochs": ">= 0",
        "check_epochs": ">= 0",
        "paper_cell_bar": "in [0, 1]",
    }

    def __post_init__(self):
        check_choices(self)
        check_ranges(self)
        if self.lr_min > self.lr_max:
            raise ValueError(f"lr_min={self.lr_min:g} > lr_max={self.lr_max:g}: lr is drawn from [lr_min, lr_max]")
        for axis in ("activations", "weight_gradients", "inits", "two_step", "optimizers", "seeds"):
            if not getattr(self, axis):
                raise ValueError(f"{axis}=[]: the grid needs at least one value on every axis")
        repeated = sorted({seed for seed in self.seeds if self.seeds.count(seed) > 1})
        if repeated:  # the grid's cells are deduplicated; a seed's trials are the same trials again
            raise ValueError(
                f"seeds={self.seeds}: {', '.join(map(str, repeated))} more than once: a seed's trials would "
                "train again into the same folders, and count one run as two in the per-seed statistics"
            )
        for name in ("extra_cells", "check_cells"):
            for i, cell in enumerate(getattr(self, name)):
                _check_cell(cell, f"{name}[{i}]", empty_ok=name == "check_cells")
        if bool(self.check_epochs) != bool(self.check_cells):
            raise ValueError(
                f"check_epochs={self.check_epochs}, check_cells={self.check_cells}: the budget check needs both "
                "(epochs > 0 and the cells to train again), or neither"
            )
        if self.check_epochs and self.check_epochs == self.epochs:
            raise ValueError(f"check_epochs={self.check_epochs}: the budget check is another budget than epochs")
        if any(c.get("init") == "scratch" for c in self.check_cells):
            raise ValueError("check_cells: the budget check reruns cells that start from a twin, not scratch")
        if self.scratch_epochs and self.scratch_epochs < self.epochs:
            raise ValueError(
                f"scratch_epochs={self.scratch_epochs} < epochs={self.epochs}: equal compute gives scratch the "
                "twin's epochs on top of `epochs` (0: the same epochs as every cell)"
            )
        two_step_cells = [c.get("two_step") for c in self.extra_cells]
        if (True in self.two_step or True in two_step_cells) and self.epochs < 2:
            raise ValueError(
                f"two_step includes true but epochs={self.epochs}: a two-step trial spends "
                "1 of its epochs on step 1 (equal compute), so it needs epochs >= 2"
            )
        if any(c.get("two_step") for c in self.check_cells) and self.check_epochs < 2:
            raise ValueError(f"check_cells: a two-step cell needs check_epochs >= 2, got {self.check_epochs}")


# What one tune cell sets: the binarize stage's keys that the search varies, and their types.
CELL_AXES: dict[str, Any] = {
    "arch": Arch,
    "activation": Activation,
    "weight_gradient": WeightGradient,
    "init": Init,
    "two_step": bool,
    "optimizer": Optimizer,
}


def _check_cell(cell: Any, where: str, empty_ok: bool) -> None:
    """A cell given as the paper's cell's settings to change: known keys, allowed values."""
    if not isinstance(cell, dict) or not (cell or empty_ok):
        raise ValueError(f"{where}: a mapping of settings to change, got {cell!r}")
    for key, value in cell.items():
        if key not in CELL_AXES:
            raise ValueError(unknown_name(f"{where}.{key}", "setting", key, CELL_AXES))
        _check_type(value, CELL_AXES[key], f"{where}.{key}")


@dataclass
class RayConfig:
    address: str = ""  # "" = a local Ray instance (or $RAY_ADDRESS when set)
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    max_failures: int = 2
    storage_path: str = "ray_results"  # a cluster needs shared storage: s3://bucket/ray
    temp_dir: str = "/tmp/bireal-ray"  # short: AF_UNIX socket paths over ~107 bytes break Ray
    # auto: a stage's Ray run is named <pipeline_run>-<stage>; re-running it (a killed driver, a
    # retried job) continues from its last checkpoint in storage when its config and data are the
    # same. never: every launch starts over.
    resume: Resume = "auto"
    backend: Backend = "auto"  # auto: nccl with GPUs, gloo without
    placement_strategy: Placement = "PACK"  # how Ray places a stage's workers on nodes
    # the job's runtime_env (env_vars, working_dir, excludes, pip ...); the storage settings' env
    # vars are added to env_vars
    runtime_env: dict[str, Any] = field(default_factory=dict)
    # a driver's lease on its stage run (pipeline/lease.py), renewed every third of this: a second
    # driver on the run stops at once; a killed driver's run is taken over once its lease lapses
    lease_ttl_s: float = 60.0

    # max_failures: -1 retries without end (Ray's FailureConfig)
    RANGES: ClassVar[dict[str, str]] = {
        "num_workers": ">= 1",
        "cpus_per_worker": "> 0",
        "max_failures": ">= -1",
        "lease_ttl_s": "> 0",
    }

    def __post_init__(self):
        check_choices(self)
        check_ranges(self)


@dataclass
class StorageConfig:
    """The ``storage`` section: where stage outputs go, and how object storage is reached."""

    # stage outputs (checkpoints) travel with the run: rank 0 publishes each to
    # <artifacts>/<pipeline_run>/<name>.safetensors (+ .sha256) and later stages and the driver
    # fetch them from there; "" = the train section's local `out` only (one machine)
    artifacts: str = ""
    endpoint_url: str = ""  # an S3-compatible store (MinIO, moto): http://host:port
    shard_cache: str = ""  # a per-node folder caching remote shards ("" = stream them)
    # one S3 request's timeout: a store slower than this is retried, 10 attempts with backoff
    # (AWS's standard mode), by every client (s3fs, and pyarrow for Ray's storage)
    request_timeout_s: float = 60.0
    # with a shard_cache, one process per node downloads each shard and the node's others wait for
    # it this long at most: below the process group's timeout (Ray Train's, 1800 s), so a stuck
    # download fails naming its shard rather than as a collective's timeout
    stage_wait_s: float = 600.0

    RANGES: ClassVar[dict[str, str]] = {"request_timeout_s": "> 0", "stage_wait_s": "> 0"}

    def __post_init__(self):
        check_ranges(self)
        if self.stage_wait_s >= PROCESS_GROUP_TIMEOUT_S:
            raise ValueError(
                f"stage_wait_s={self.stage_wait_s:g}: > 0 and below the process group's timeout "
                f"({PROCESS_GROUP_TIMEOUT_S:.0f} s), or a rank waiting for a shard stalls every rank's collective"
            )


@dataclass
class MlflowConfig:
    tracking_uri: str = ""  # default: $MLFLOW_TRACKING_URI, else sqlite:///<current dir>/mlflow.db (made absolute)
    experiment: str = "bireal"
    artifact_location: str = ""  # default: <current dir>/mlartifacts (made absolute)
    # an MLflow outage: each epoch waits at most sync_wait_s for its metrics to be logged (then
    # they are buffered and sent when MLflow answers); the driver's writes at a stage's start and
    # end wait up to outage_wait_s, then fail naming MLflow (pipeline/adapters/tracking.py)
    sync_wait_s: float = 5.0
    outage_wait_s: float = 900.0
    # every node's CPU, memory, disk, network and GPU use (GPU with nvidia-ml-py, in the pipeline
    # extra) logged into each training stage's run as system/node<N>/..., sampled every this many
    # seconds; 0 = none
    system_metrics_s: float = 10.0

    RANGES: ClassVar[dict[str, str]] = {"sync_wait_s": ">= 0", "outage_wait_s": ">= 0", "system_metrics_s": ">= 0"}

    def __post_init__(self):
        check_ranges(self)
        if not self.experiment.strip():
            raise ValueError(f"experiment={self.experiment!r}: an MLflow experiment's name (not empty)")


@dataclass
class RegistryConfig:
    """The ``registry`` section: where ``bireal register`` puts the packed model."""

    model_name: str = "bireal-demo"
    min_top1: float = 0.0  # an evaluation below this is refused: nothing registered, the champion kept

    RANGES: ClassVar[dict[str, str]] = {"min_top1": "in [0, 1]"}

    def __post_init__(self):
        check_ranges(self)
        problem = registered_name_problem(self.model_name)
        if problem:
            raise ValueError(f"model_name={self.model_name!r}: {problem}")


# '/' and ':' MLflow refuses; quotes end the registry's search filters, '@' splits models:/NAME@ALIAS
NOT_IN_MODEL_NAMES = "/:'\"`@"


def registered_name_problem(name: str) -> str:
    """'' or why ``name`` cannot be a registered model's: checked with the params, since
    registering is the pipeline's last stage (MLflow would refuse it after the training)."""
    if not name.strip():
        return "a name (not empty)"
    if name != name.strip():
        return "no leading or trailing spaces"
    bad = sorted({c for c in name if c in NOT_IN_MODEL_NAMES or not c.isprintable()})
    if bad:
        return (
            f"{''.join(bad)!r} in the name (a registered model's has none of {NOT_IN_MODEL_NAMES} "
            "and no control characters)"
        )
    if name in (".", ".."):
        return "not a path step"
    return ""


# The file's sections; the three training stages' sections hold TrainConfig keys over ``train``.
@dataclass
class RecipeConfig:
    """The ``recipe`` section of a reproduction profile: the published values the profile is held
    to on any number of GPUs (``pipeline/profile_rules.py``; ``bireal check-params`` and ``bireal
    plan`` apply them). Empty in profiles that follow no published recipe."""

    source: str = ""  # where the numbers come from (repository file, paper section)
    batch: dict[str, int] = field(default_factory=dict)  # stage -> the global batch its lr is quoted at
    lr: dict[str, float] = field(default_factory=dict)  # stage -> the published lr at that batch
    # linear: another global batch scales the lr by global / batch (Goyal et al. 2017);
    # none: the profile must train at the published global batch
    lr_scaling: Literal["linear", "none"] = "linear"

    def __post_init__(self):
        for key in set(self.batch) | set(self.lr):
            if key not in STAGES:
                raise ValueError(f"recipe: {key!r} is not a stage ({', '.join(STAGES)})")
        for name, rule in (("batch", ">= 1"), ("lr", "> 0")):  # RANGES' rules, per stage of a mapping
            for stage, value in getattr(self, name).items():
                if not within(value, rule):
                    raise ValueError(f"{name}.{stage}={value}: must be {rule}")
        if set(self.batch) != set(self.lr):
            raise ValueError(
                f"recipe: batch names {sorted(self.batch)}, lr names {sorted(self.lr)}: name the same stages"
            )


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "storage": StorageConfig,
    "shard": ShardParams,
    "tune": TuneSettings,
    "ray": RayConfig,
    "mlflow": MlflowConfig,
    "registry": RegistryConfig,
    "recipe": RecipeConfig,
}


# ---------------------------------------------------------------------------- checking


def _choices(tp: Any) -> tuple | None:
    return typing.get_args(tp) if typing.get_origin(tp) is Literal else None


def near_miss(given: Any, known: typing.Iterable[Any]) -> str | None:
    """The one of ``known`` that ``given`` is a typo of ('phase_epoch' -> 'phase_epochs'), if any:
    a typo among the 50-odd training settings is hard to spot in their list."""
    close = difflib.get_close_matches(str(given), [str(k) for k in known], n=1, cutoff=0.8)
    return close[0] if close else None


def unknown_name(where: str, what: str, given: Any, known: typing.Iterable[Any]) -> str:
    """The message for a name not among ``known``: "<where>: unknown <what> (did you mean 'x'?
    known: a, b, c)"."""
    known = sorted(map(str, known))
    guess = near_miss(given, known)
    return f"{where}: unknown {what} ({f'did you mean {guess!r}? ' if guess else ''}known: {', '.join(known)})"


def not_one_of(value: Any, allowed: typing.Iterable[Any]) -> str:
    """The message for a value outside its choices: "'clp' is not one of a, clip (did you mean 'clip'?)"."""
    allowed = list(allowed)
    guess = near_miss(value, allowed) if isinstance(value, str) else None
    return f"{value!r} is not one of {', '.join(map(str, allowed))}" + (f" (did you mean {guess!r}?)" if guess else "")


def within(value: float, rule: str) -> bool:
    """Whether a finite ``value`` satisfies ``rule``: "> 0", ">= 1", "in [0, 1)" (the forms of
    the sections' RANGES tables, written as their error messages read)."""
    if not math.isfinite(value):
        return False
    if rule.startswith("in "):
        low, high = (float(bound) for bound in rule[4:-1].split(","))
        above = low <= value if rule[3] == "[" else low < value
        return above and (value <= high if rule[-1] == "]" else value < high)
    op, bound = rule.split()
    return value >= float(bound) if op == ">=" else value > float(bound)


def bounded(kind: type, rule: str) -> Callable[[str], Any]:
    """An argparse ``type``: the flag's text as ``kind`` (int or float) within ``rule`` (``within``'s
    forms), else argparse's error naming the flag: "argument --gpus: 0: must be >= 1"."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r}: expected {'an integer' if kind is int else 'a number'}"
            ) from None
        if not within(value, rule):
            raise argparse.ArgumentTypeError(f"{text}: must be {rule}")
        return value

    return parse


def check_ranges(obj: Any) -> None:
    """Every number of a section (each item of a list of numbers) named in its ``RANGES`` table is
    finite and within its rule; None (an optional setting left unset) passes. Like
    ``check_choices``, for instances built in code too."""
    for name, rule in type(obj).RANGES.items():
        value = getattr(obj, name)
        items = value if isinstance(value, list) else [] if value is None else [value]
        bad = [item for item in items if not within(item, rule)]
        if bad:
            each = "each must be" if isinstance(value, list) else "must be"
            finite = "" if all(map(math.isfinite, bad)) else " (and finite)"
            raise ValueError(f"{name}={value!r}: {each} {rule}{finite}")


def check_choices(obj: Any) -> None:
    """Every ``Literal`` field (and list of Literals) of a dataclass instance holds an allowed value;
    for instances built in code (tests, Tune trials) that bypass ``build``."""
    for name, tp in typing.get_type_hints(type(obj)).items():
        value = getattr(obj, name)
        items = value if typing.get_origin(tp) is list else [value]
        allowed = _choices(typing.get_args(tp)[0] if typing.get_origin(tp) is list else tp)
        for item in items if allowed else ():
            if item not in allowed:
                raise ValueError(f"{name}={not_one_of(item, allowed)}")


def _check_type(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    allowed = _choices(tp)
    if allowed is not None:
        if value not in allowed:
            raise ConfigError(f"{where}: {not_one_of(value, allowed)}")
        return value
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _check_type(value, option, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: {value!r} matches none of {tp}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{where}: expected null, got {value!r}")
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        key_tp, value_tp = typing.get_args(tp) or (Any, Any)
        return {_check_type(k, key_tp, where): _check_type(v, value_tp, f"{where}.{k}") for k, v in value.items()}
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)[:1] or (Any,)
        return [_check_type(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is bool and not isinstance(value, bool):
        yaml11 = " (YAML 1.2, as DVC reads the file: yes/no/on/off are words)" if _is_yaml11_bool(value) else ""
        raise ConfigError(f"{where}: expected true/false, got {value!r}{yaml11}")
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def _is_yaml11_bool(value: Any) -> bool:
    return isinstance(value, str) and value.lower() in ("yes", "no", "on", "off", "y", "n")


def build(cls: type[T], values: dict[str, Any], where: str) -> T:
    """``cls(**values)`` with every key, type and choice checked; ``where`` prefixes error messages."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(unknown_name(f"{where}.{unknown[0]}", "key", unknown[0], names))
    checked = {k: _check_type(v, hints[k], f"{where}.{k}") for k, v in values.items()}
    try:
        return cls(**checked)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from e


# ---------------------------------------------------------------------------- the file


def params_path(name_or_path: str | os.PathLike | None = None) -> Path:
    """A params file: a path, a profile name from ``pipeline/configs`` (``cifar10_bireal18``), or
    the default: ``$BIREAL_PARAMS`` (either of those), else params.yaml in the current directory
    (where `dvc repro` runs stages)."""
    if not name_or_path:
        if not os.environ.get("BIREAL_PARAMS"):
            return Path.cwd() / "params.yaml"
        try:
            return params_path(os.environ["BIREAL_PARAMS"])
        except ConfigError as e:
            raise ConfigError(f"$BIREAL_PARAMS={e}") from None
    path = Path(name_or_path)
    if path.is_file() or path.suffix in (".yaml", ".yml") or os.sep in str(name_or_path):
        return path
    profile = CONFIGS_DIR / f"{name_or_path}.yaml"
    if profile.is_file():
        return profile
    profiles = sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml"))
    guess = near_miss(name_or_path, profiles)
    hint = f"did you mean {guess!r}? " if guess else ""
    raise ConfigError(f"{name_or_path}: neither a params file nor a profile ({hint}profiles: {', '.join(profiles)})")


class ParamsLoader(yaml.SafeLoader):
    """PyYAML's safe loader reading plain scalars by YAML 1.2's core schema, as DVC's own parser
    (ruamel) reads the same file, and refusing a key given twice in one mapping (YAML 1.1 kept the
    last, so the first ``binarize:`` section of a file with two was dropped without a word).

    YAML 1.1, PyYAML's default, read ``epochs: 010`` as 8 (octal), ``1:30`` as 90 (base 60),
    ``yes``/``no``/``on``/``off`` as booleans and ``1e-3`` as a string, where DVC reads 10, '1:30',
    strings and 0.001: a stage trained what ``dvc params diff`` did not show."""

    yaml_implicit_resolvers: ClassVar[dict] = {}  # YAML 1.2's, below: none of SafeLoader's 1.1 ones

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            lines: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # '<<: *defaults': a merged key may be overridden, as intended
                key = self.construct_object(key_node, deep=True)
                if not isinstance(key, typing.Hashable):
                    continue  # PyYAML's own constructor names an unhashable key
                line = key_node.start_mark.line + 1
                if key in lines:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} given twice (lines {lines[key]} and {line})", key_node.start_mark
                    )
                lines[key] = line
        return super().construct_mapping(node, deep)

    def construct_yaml12_int(self, node) -> int:
        """YAML 1.2's integers: 0b, 0o and 0x prefixes; a leading zero is decimal, not octal."""
        text = self.construct_scalar(node).replace("_", "")
        sign = -1 if text.startswith("-") else 1
        digits = text.lstrip("+-")
        base = {"0b": 2, "0o": 8, "0x": 16}.get(digits[:2], 10)
        try:
            return sign * int(digits[2:] if base != 10 else digits, base)
        except ValueError:
            raise yaml.constructor.ConstructorError(
                None, None, f"{text!r} is not an integer", node.start_mark
            ) from None


YAML12_CORE_SCALARS = [  # (tag, pattern, first characters): the core schema as ruamel resolves it
    ("bool", r"true|True|TRUE|false|False|FALSE", "tTfF"),
    (
        "float",
        r"[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?"  # 1.5, 1., 1.5e-3
        r"|[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+"  # 1e-3
        r"|[-+]?\.[0-9_]+(?:[eE][-+][0-9]+)?"  # .5
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)",
        "-+0123456789.",
    ),
    ("int", r"[-+]?0b[0-1_]+|[-+]?0o?[0-7_]+|[-+]?[0-9_]+|[-+]?0x[0-9a-fA-F_]+", "-+0123456789"),
    ("merge", r"<<", "<"),
    ("null", r"~|null|Null|NULL|", ["~", "n", "N", ""]),
    (
        "timestamp",
        r"[0-9]{4}-[0-9]{2}-[0-9]{2}"
        r"|[0-9]{4}-[0-9]{1,2}-[0-9]{1,2}(?:[Tt]|[ \t]+)[0-9]{1,2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]*)?"
        r"(?:[ \t]*(?:Z|[-+][0-9]{1,2}(?::[0-9]{2})?))?",
        "0123456789",
    ),
]
for _tag, _pattern, _first in YAML12_CORE_SCALARS:
    ParamsLoader.add_implicit_resolver(f"tag:yaml.org,2002:{_tag}", re.compile(f"^(?:{_pattern})$"), list(_first))
ParamsLoader.add_constructor("tag:yaml.org,2002:int", ParamsLoader.construct_yaml12_int)


def parse_yaml(text: str | typing.TextIO) -> Any:
    return yaml.load(text, Loader=ParamsLoader)  # noqa: S506 (a SafeLoader)


def read_params(name_or_path: str | os.PathLike | None = None) -> dict[str, Any]:
    """The raw file as a dict. Without a params.yaml in the current directory every default
    applies ({}); a file named on the command line or in $BIREAL_PARAMS must exist."""
    path = params_path(name_or_path)
    if path.is_dir():
        raise ConfigError(f"{path}: a folder, not a params file")
    if not path.is_file():
        if name_or_path or os.environ.get("BIREAL_PARAMS"):
            raise ConfigError(f"{path}: params file not found")
        return {}
    try:
        with path.open(encoding="utf-8") as f:  # a stream, so the error's marks name the file
            data = parse_yaml(f) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a text file in UTF-8 ({e.reason} at byte {e.start})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return data


@dataclass
class Params:
    """One params file, read and checked once; what every command and stage takes."""

    path: Path
    raw: dict[str, Any]
    data: DataConfig
    shard: ShardParams
    tune: TuneSettings
    storage: StorageConfig
    ray: RayConfig
    mlflow: MlflowConfig
    registry: RegistryConfig
    recipe: RecipeConfig
    group: str  # groups one pipeline run's MLflow runs (see ``run_group``)
    train_overrides: dict[str, Any] = field(default_factory=dict)
    # this invocation's --restart: a stage whose math settings changed discards its run's
    # checkpoints and starts over, instead of refusing (pipeline/adapters/ray_train.py)
    restart: bool = False

    @property
    def where(self) -> str:
        """The params file as messages name it: a missing default file means the typed defaults."""
        return str(self.path) if self.path.is_file() else f"{self.path} (no such file: the defaults)"

    def train(self, stage: str, overrides: dict[str, Any] | None = None, tuned: bool = True) -> TrainConfig:
        """The stage's TrainConfig: ``train`` <- ``<stage>`` <- ``--set`` overrides; for binarize the
        tune stage's pick (``tuned_config``, read now: the flow runs tune after loading) overrides
        the keys it names unless the command line set them."""
        if stage not in STAGES:
            raise ConfigError(f"training stage {not_one_of(stage, STAGES)}")
        overrides = {**self.train_overrides, **(overrides or {})}
        check_overrides(overrides)
        values = {**(self.raw.get("train") or {}), **(self.raw.get(stage) or {}), **overrides, "stage": stage}
        if self.storage.artifacts and not values.get("artifacts"):  # <artifacts>/<pipeline_run>
            values["artifacts"] = f"{self.storage.artifacts.rstrip('/')}/{self.group}"
        pick = values.get("tuned_config")
        if tuned and pick and Path(pick).is_file():
            try:
                best = json.loads(Path(pick).read_text())["config"] or {}  # null: tuning was disabled
            except (ValueError, KeyError) as e:
                raise ConfigError(f"{pick}: not a `bireal tune` best-config file ({e})") from e
            values.update({k: v for k, v in best.items() if k not in overrides})
        try:
            return build(TrainConfig, values, f"{self.path}:{stage}")
        except ConfigError as e:  # a cross-setting rule may break by an override: say which were given
            given = ", ".join(f"{k}={v!r}" for k, v in overrides.items())
            raise ConfigError(f"{e} (with --set {given})" if overrides else str(e)) from e


def check_overrides(overrides: dict[str, Any]) -> None:
    """``--set KEY=VALUE`` entries: known training settings of the right type, named as given."""
    hints = typing.get_type_hints(TrainConfig)
    for key, value in overrides.items():
        if key not in AFFECTS_MATH:  # every TrainConfig field (tests/test_params.py)
            unknown = unknown_name(f"--set {key}", "training setting", key, AFFECTS_MATH)
            raise ConfigError(section_qualified(key) or unknown)
        _check_type(value, hints[key], f"--set {key}")


def section_qualified(key: str) -> str | None:
    """The message for ``--set train.lr=...`` (a params file's dotted key, as ``dvc exp run -S``
    writes it): --set names a setting bare, for the stage the command runs."""
    section, _, bare = key.rpartition(".")
    if not section or bare not in AFFECTS_MATH:
        return None
    return (
        f"--set {key}: name the training setting without its section (--set {bare}=...): "
        f"it applies to the stage this command runs; a stage's own value goes in its params section"
    )


def run_group(path: Path) -> str:
    """$BIREAL_PIPELINE_RUN, else a hash of the params file: the MLflow tag grouping a pipeline run."""
    if os.environ.get("BIREAL_PIPELINE_RUN"):
        return os.environ["BIREAL_PIPELINE_RUN"]
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12] if path.is_file() else "no-params"
    return f"params-{digest}"


def cluster_location_problems(params: Params) -> list[str]:
    """With ``ray.address`` set, every location that processes on other nodes read or write must be
    shared (a URL): -> one message per local-only one, naming its key. The train section's ``out``
    stays local: it is each node's working folder (stage outputs travel via ``storage.artifacts``)."""
    if not params.ray.address:
        return []
    where = f"{params.where}: ray.address is {params.ray.address!r}, so"
    problems = []

    def need_shared(key: str, value: str, why: str) -> None:
        if not storage.is_url(value):
            problems.append(f"{where} {key} must be shared storage (s3://...), not {value!r}: {why}")

    for stage in STAGES:
        need_shared(f"{stage}.shards", params.train(stage, tuned=False).shards, "every worker reads the shards")
    need_shared("ray.storage_path", params.ray.storage_path, "Ray keeps checkpoints there for every node")
    need_shared("tune.storage_path", params.tune.storage_path, "Tune's trials report there from every node")
    need_shared("storage.artifacts", params.storage.artifacts, "stage outputs must outlive the worker that wrote them")
    uri = storage.without_credentials(params.mlflow.tracking_uri)
    if not uri.startswith(("http://", "https://")):
        problems.append(
            f"{where} mlflow.tracking_uri must be a tracking server (http://...), not "
            f"{uri or 'the local SQLite file'!r}: rank 0 logs from another node"
        )
    elif params.mlflow.artifact_location and not storage.is_url(params.mlflow.artifact_location):
        problems.append(
            f"{where} mlflow.artifact_location must be shared storage, not {params.mlflow.artifact_location!r}"
        )
    return problems


def refuse_passwords(raw: Any, path: Path, where: str = "") -> None:
    """A URL with a password in a params file (``http://user:password@host``) is refused, naming
    the key: the file is committed, tracked by DVC, copied to the cluster with every job and read
    into summaries. Credentials come from the environment, as each client reads them."""
    if isinstance(raw, dict):
        for key, value in raw.items():
            refuse_passwords(value, path, f"{where}.{key}" if where else str(key))
    elif isinstance(raw, list):
        for i, value in enumerate(raw):
            refuse_passwords(value, path, f"{where}[{i}]")
    elif storage.has_password(raw):
        hint = (
            "$MLFLOW_TRACKING_USERNAME and $MLFLOW_TRACKING_PASSWORD, as MLflow's client reads them"
            if where.startswith("mlflow.")
            else "the environment, as the service's own client reads them"
        )
        user = urllib.parse.urlsplit(raw).username
        raise ConfigError(
            f"{path}:{where}: the address {storage.without_credentials(raw)!r} carries the password of user "
            f"{user!r}: a params file is committed and copied to every job; give the user and password in {hint}"
        )


def load_params(name_or_path: str | os.PathLike | None = None, train_overrides: dict[str, Any] | None = None) -> Params:
    """Read the params file once and check all of it (unknown sections and keys, types, choices,
    each training stage's merged settings) -> ``Params``. Raises ConfigError naming file and key."""
    path = params_path(name_or_path)
    raw = read_params(name_or_path)
    known = {*SECTIONS, "train", *STAGES}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(unknown_name(f"{path}:{unknown[0]}", "section", unknown[0], known))
    for section, value in raw.items():
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"{path}:{section}: expected a mapping of settings, got {value!r}")
    refuse_passwords(raw, path)
    sections = {name: build(cls, dict(raw.get(name) or {}), f"{path}:{name}") for name, cls in SECTIONS.items()}
    if not sections["mlflow"].tracking_uri and os.environ.get("MLFLOW_TRACKING_URI"):
        # MLflow's own variable, as the mlflow CLI and mlflow.start_run read it: a user who points
        # MLflow at a server expects the runs there, not in ./mlflow.db; the file's value wins
        sections["mlflow"].tracking_uri = os.environ["MLFLOW_TRACKING_URI"]
    params = Params(path, raw, group=run_group(path), train_overrides=dict(train_overrides or {}), **sections)
    # the storage settings reach this process's opens and, through the environment, its children
    # (DataLoader workers) and the Ray job's workers (adapters/ray_train.job_runtime_env)
    storage.configure(
        params.storage.endpoint_url,
        params.storage.shard_cache,
        params.storage.request_timeout_s,
        params.storage.stage_wait_s,
    )
    build(TrainConfig, dict(raw.get("train") or {}), f"{path}:train")  # errors name train.KEY
    for stage in STAGES:  # and then <stage>.KEY
        params.train(stage, tuned=False)
    problems = cluster_location_problems(params)
    if problems:
        raise ConfigError("\n".join(problems))
    return params


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``["epochs=2", "phases=[relu,clip]"]`` -> {"epochs": 2, "phases": ["relu", "clip"]} (YAML values)."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        out[key.strip()] = parse_yaml(value)
    return out

"""The rules a reproduction profile must keep on a cluster, checked before any GPU is paid for.

``bireal check-params`` prints every problem these find (and fails); ``bireal plan`` and ``bireal
submit`` refuse a profile that has one. Each rule names the keys to change:
- the global batch (per-worker batch x ``ray.num_workers``) is the recipe's, or the lr is the
  recipe's lr scaled linearly to it (``recipe.lr_scaling``);
- every data reader (workers x DataLoader workers) gets at least ``MIN_SHARDS_PER_READER`` shards
  (WebDataset splits shards, not samples: fewer leave readers idle or starved);
- an epoch holds at least ``MIN_STEPS_PER_EPOCH`` optimizer steps at the global batch (the loop
  drops a partial batch: a global batch near the training set trains on nothing, and the per-epoch
  schedules, validation and checkpoints lose their meaning);
- the shards are no smaller than what a stage reads: ``shard.resize`` (when it resizes) is at least
  every trained stage's evaluation resize, and at least ``MIN_CROPPED_SHARD_SIDE`` where a binary
  stage trains on RandomResizedCrop;
- the tune stage is off, or its trials take a GPU (full ImageNet epochs on CPU trials would run for
  weeks);
- every location is shared storage when ``ray.address`` is set (``params.cluster_location_problems``,
  enforced when the file is loaded).
"""

from __future__ import annotations

import math

from bireal_core.preprocess import default_input_config  # no torch: checking a file stays fast

from .params import STAGES, Params

MIN_SHARDS_PER_READER = 4
# a RandomResizedCrop at scale 0.08 cuts 28% of the shorter side: ~72 px of a 256-px shard, which
# it then upsamples to 224; from 512 px it is ~145 px, about what the original photo held
MIN_CROPPED_SHARD_SIDE = 512
BINARY_STAGES = ("binarize", "finetune")
MIN_STEPS_PER_EPOCH = 10
REL_TOL = 1e-6  # an lr written with 6 significant digits passes


def global_batch(params: Params, stage: str, gpus: int | None = None) -> int:
    """Images per optimizer step: the per-worker batch x the data-parallel workers."""
    return params.train(stage, tuned=False).batch_size * (gpus or params.ray.num_workers)


def expected_lr(params: Params, stage: str, gpus: int | None = None) -> float:
    """The recipe's lr at this profile's global batch (scaled linearly when the recipe allows)."""
    recipe = params.recipe
    batch = global_batch(params, stage, gpus)
    if recipe.lr_scaling == "none":
        return recipe.lr[stage]
    return recipe.lr[stage] * batch / recipe.batch[stage]


def shard_count(params: Params) -> int | None:
    """Training shards the data will make: from ``data.train_images`` and ``shard.samples_per_shard``
    (the sharder closes a shard early only at ``max_shard_bytes``: this is a lower bound)."""
    if params.data.train_images <= 0:
        return None
    return math.ceil(params.data.train_images / params.shard.samples_per_shard)


def stage_epochs(params: Params, stage: str) -> int:
    config = params.train(stage, tuned=False)
    return sum(config.phase_epochs) if stage == "pretrain" else config.epochs


def trained_stages(params: Params) -> list[str]:
    """The stages this profile trains (a from-scratch recipe has no pretrain, some no finetune)."""
    return [s for s in STAGES if stage_epochs(params, s) > 0]


def data_readers(params: Params, stage: str, gpus: int | None = None) -> int:
    return (gpus or params.ray.num_workers) * max(1, params.train(stage, tuned=False).loader_workers)


def batch_problems(params: Params, gpus: int | None = None) -> list[str]:
    out = []
    recipe = params.recipe
    for stage in (s for s in STAGES if s in recipe.batch):
        batch, lr = global_batch(params, stage, gpus), params.train(stage, tuned=False).lr
        if recipe.lr_scaling == "none" and batch != recipe.batch[stage]:
            out.append(
                f"{params.where}: {stage}: global batch {batch} (batch_size x ray.num_workers) is not the recipe's "
                f"{recipe.batch[stage]}, and recipe.lr_scaling is none: change {stage}.batch_size or ray.num_workers"
            )
        elif not math.isclose(lr, expected_lr(params, stage, gpus), rel_tol=REL_TOL):
            out.append(
                f"{params.where}: {stage}.lr is {lr:g}; at a global batch of {batch} the recipe's "
                f"{recipe.lr[stage]:g} at {recipe.batch[stage]} gives {expected_lr(params, stage, gpus):g} "
                f"(recipe.lr_scaling: {recipe.lr_scaling})"
            )
    return out


def step_problems(params: Params, gpus: int | None = None) -> list[str]:
    images = params.data.train_images
    if images <= 0:
        return []
    out = []
    for stage in trained_stages(params):
        batch = global_batch(params, stage, gpus)
        if images // batch < MIN_STEPS_PER_EPOCH:
            out.append(
                f"{params.where}: {stage}: a global batch of {batch} ({stage}.batch_size x ray.num_workers) makes "
                f"{images // batch} full step(s) of {images} images (data.train_images) an epoch, fewer than "
                f"{MIN_STEPS_PER_EPOCH}: the global batch must be at most {images // MIN_STEPS_PER_EPOCH}"
            )
    return out


def _shard_fix(params: Params, readers: int) -> str:
    """The shard size that gives every reader its shards, or, where even one image a shard would
    not, the readers to cut."""
    needed = MIN_SHARDS_PER_READER * readers
    if params.data.train_images >= needed:
        return f"set shard.samples_per_shard to {math.ceil(params.data.train_images / needed)} or fewer"
    return (
        f"{params.data.train_images} images cannot make {needed} shards: lower ray.num_workers (the GPUs) "
        "or train.loader_workers"
    )


def shard_problems(params: Params, gpus: int | None = None) -> list[str]:
    shards = shard_count(params)
    if shards is None:
        return []
    out = []
    for stage in trained_stages(params):
        readers = data_readers(params, stage, gpus)
        if shards < MIN_SHARDS_PER_READER * readers:
            out.append(
                f"{params.where}: {stage}: {shards} shards ({params.data.train_images} images / "
                f"shard.samples_per_shard {params.shard.samples_per_shard}) for {readers} data readers "
                "(ray.num_workers x loader_workers): "
                f"at least {MIN_SHARDS_PER_READER} each: {_shard_fix(params, readers)}"
            )
    return out


def resolution_problems(params: Params) -> list[str]:
    """Shards resized below what a stage reads: every image upsampled (blurred) before it trains."""
    side = params.shard.resize
    if side <= 0:  # full-size shards
        return []
    out = []
    for stage in trained_stages(params):
        config = params.train(stage, tuned=False)
        stem_input = default_input_config(config.stem)
        eval_resize = stem_input["resize"]
        augment = config.augment if config.augment != "auto" else stem_input["augment"]
        if side < eval_resize:
            out.append(
                f"{params.where}: shard.resize is {side}, below the {eval_resize}-px shorter side {stage} (stem "
                f"{config.stem}) resizes every image to: set shard.resize to 0 (full size) or >= {eval_resize}"
            )
        elif augment == "imagenet" and stage in BINARY_STAGES and side < MIN_CROPPED_SHARD_SIDE:
            out.append(
                f"{params.where}: shard.resize is {side}, and {stage} trains on RandomResizedCrop ({stage}.augment "
                f"{augment}): at scale 0.08 it upsamples ~{round(side * 0.08**0.5)} px of a shard to 224; set "
                f"shard.resize to 0 (full size) or >= {MIN_CROPPED_SHARD_SIDE}"
            )
    return out


def tune_problems(params: Params) -> list[str]:
    if params.tune.enabled and params.ray.use_gpu and params.tune.gpus_per_trial <= 0:
        return [
            f"{params.where}: tune is enabled with CPU trials (tune.gpus_per_trial: "
            f"{params.tune.gpus_per_trial:g}) on a GPU profile: set tune.enabled: false or tune.gpus_per_trial: 1"
        ]
    return []


def chain_problems(params: Params) -> list[str]:
    """Finetune retrains the binarize stage's net: its arch, stem and width must be binarize's."""
    if stage_epochs(params, "finetune") <= 0:
        return []
    binarize, finetune = params.train("binarize", tuned=False), params.train("finetune", tuned=False)
    differ = [
        f"finetune.{k} is {getattr(finetune, k)!r}, binarize.{k} {getattr(binarize, k)!r}"
        for k in ("arch", "stem", "width")
        if getattr(finetune, k) != getattr(binarize, k)
    ]
    if differ:
        return [f"{params.where}: {', '.join(differ)}: finetune retrains the binarize stage's net, so they must agree"]
    return []


def reproduction_problems(params: Params, gpus: int | None = None) -> list[str]:
    """Every rule's problems for this profile (on ``gpus`` workers instead of ``ray.num_workers``)."""
    return (
        batch_problems(params, gpus)
        + step_problems(params, gpus)
        + shard_problems(params, gpus)
        + resolution_problems(params)
        + tune_problems(params)
        + chain_problems(params)
    )

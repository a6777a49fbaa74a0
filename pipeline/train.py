"""The three training stages of Bi-Real Net: one ``train_loop`` built from plain functions.

``train_loop(config, runtime)`` runs in one process (tests, GPU checks) or on every Ray Train worker
(``pipeline/adapters/ray_train.py``); the only distributed lines go through ``runtime`` (rank, world size,
report + checkpoint, restore) and are marked ``# [dist]``.

A stage is a list of *segments* run in order, each with its own optimizer and schedule
(``pipeline/segments.py`` plans them):
- pretrain: the real-valued twin, one segment per activation phase (relu -> leaky_clip -> clip);
  each phase's final weights are saved as ``pretrain-<phase>.safetensors`` (binarize and tune start
  from the relu or the clip one);
- binarize: the Bi-Real net initialised from a pretrain checkpoint (or from scratch); with
  ``two_step``, a first segment binarizes activations only, a second adds the weights;
- finetune: weights constrained to +-1 (so alpha = 1), binary convs frozen, BatchNorm retrained to
  absorb the old alpha. Its checkpoint is what ``bireal export`` packs.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

import bireal_core as bc

from . import storage
from .params import STAGES, TrainConfig
from .segments import (
    Segment,
    check_clip_gate,
    check_relu_floor,
    classes_differ,
    clip_recovered,
    remove_stale_twins,
    segments,
    stage_checkpoint,
    stage_input,
    stage_input_config,
    trained_classes,
)

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from .data import ShardLoader

__all__ = ["STAGES", "TrainConfig", "Runtime", "train_loop"]

# ---------------------------------------------------------------------------- runtime


class Runtime:
    """What the loop needs from its environment. This one: a single process, no Ray (Ray Train and
    Ray Tune subclass it in ``pipeline/adapters``)."""

    rank, world_size = 0, 1

    def report(self, metrics: dict, checkpoint_dir: Path) -> None:
        """Called once per epoch after rank 0 wrote the epoch's train state to ``checkpoint_dir``."""

    def restore_dir(self) -> Path | None:
        return None

    def device(self) -> torch.device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ---------------------------------------------------------------------------- pieces


def batch_totals(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(loss sum, top-1 hits, top-5 hits, count) of one batch as a float64 tensor on its device:
    summed on the device, read once per evaluation."""
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices  # (B, k)
    hit = top == labels[:, None]
    return torch.stack(
        [
            F.cross_entropy(logits, labels, reduction="sum").double(),
            hit[:, 0].sum().double(),
            hit.any(dim=1).sum().double(),
            torch.tensor(float(len(labels)), dtype=torch.float64, device=logits.device),
        ]
    )


class Criterion:
    """The training loss: cross-entropy with label smoothing, or, with a ``teacher``, distillation
    to its soft targets (ReActNet's distribution loss when ``weight`` = 1):
    loss = (1 - weight) CE(logits, labels) + weight T^2 KL(softmax(t / T) || softmax(s / T)).
    The teacher runs in eval mode without gradients on the same (augmented) images."""

    def __init__(
        self,
        label_smoothing: float = 0.0,
        teacher: nn.Module | None = None,
        weight: float = 1.0,
        temperature: float = 1.0,
    ):
        self.label_smoothing, self.teacher = label_smoothing, teacher
        self.weight, self.temperature = weight, temperature

    def __call__(self, logits: torch.Tensor, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = logits.float()  # (B, classes)
        hard = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        if self.teacher is None:
            return hard
        with torch.no_grad():
            teacher_logits = self.teacher(images).float()  # (B, classes)
        t = self.temperature
        soft = F.kl_div(
            F.log_softmax(logits / t, dim=1),
            F.log_softmax(teacher_logits / t, dim=1),
            log_target=True,
            reduction="batchmean",
        )
        return (1 - self.weight) * hard + self.weight * t * t * soft


class EmptyEpochError(ValueError):
    """An epoch's plan has no full batch for some rank: nothing would train."""


def no_batch_message(config: TrainConfig, world_size: int, images: int) -> str:
    readers = f"{world_size} rank(s)"
    if config.loader == "stream":  # each DataLoader worker batches the shards it reads, alone
        readers += f" x {max(1, config.loader_workers)} loader worker(s), each batching its own shards"
    return (
        f"{config.stage}: no full batch of batch_size={config.batch_size} in an epoch: {images} training "
        f"images for {readers}; lower batch_size"
        + (" or loader_workers, or shard smaller (shard.samples_per_shard)" if config.loader == "stream" else "")
    )


def check_full_batches(config: TrainConfig, world_size: int) -> None:
    """The driver's check, before it starts any worker: the first epoch of the stream loader gives
    every rank at least one full batch (``run_epoch`` checks every epoch again, on the ranks)."""
    from .data import plan_epoch, read_manifest, split_shards

    if config.loader != "stream":
        return
    shards = split_shards(read_manifest(config.shards), config.shards, "train", config.holdout)
    plan = plan_epoch(shards, world_size, config.loader_workers, config.batch_size, train=True, seed=config.seed)
    if plan.steps == 0:
        raise EmptyEpochError(no_batch_message(config, world_size, plan.left_out))


class NonFiniteLossError(RuntimeError):
    """The training loss was NaN or infinite: the stage stops before any checkpoint of that state."""


class NonFiniteGuard:
    """A device-side record of the first step whose loss was not finite: no host sync per step.

    ``record`` (every step) is one masked fill on the device, so it works inside a CUDA graph too.
    Every ``every`` steps ``poll`` all-reduces the flag over the ranks (every rank polls at the same
    step, so every rank stops together) and starts a non-blocking copy to the host, which the next
    poll reads: a bad step stops the epoch within 2 x ``every`` steps, and ``check`` (a blocking
    read) runs at the epoch's end, before any checkpoint is written."""

    NONE = 2**62  # "no bad step" (the all-reduce takes the minimum over ranks)

    def __init__(self, device: torch.device, world_size: int = 1, every: int = 50, where: str = ""):
        self.first = torch.full((), self.NONE, dtype=torch.int64, device=device)
        self.world_size, self.every, self.where = world_size, max(1, every), where
        self.pending: tuple[torch.Tensor, torch.cuda.Event | None] | None = None

    def record(self, loss: torch.Tensor, step: int) -> None:
        self.first.masked_fill_(~torch.isfinite(loss.detach()) & (self.first == self.NONE), step)

    def _reduced(self) -> torch.Tensor:
        first = self.first.clone()
        if self.world_size > 1:  # [dist]
            torch.distributed.all_reduce(first, op=torch.distributed.ReduceOp.MIN)
        return first

    def poll(self, steps_done: int) -> None:
        """After ``steps_done`` steps of the epoch: every ``every`` steps, raise for the bad step the
        previous poll found, and start the next read."""
        if steps_done % self.every:
            return
        if self.pending is not None:
            host, event = self.pending
            if event is not None:
                event.synchronize()  # recorded ``every`` steps ago: long done
            self._raise_if_bad(int(host))
        first = self._reduced()
        if first.is_cuda:
            host = torch.empty((), dtype=torch.int64, pin_memory=True)
            host.copy_(first, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self.pending = (host, event)
        else:
            self.pending = (first, None)

    def check(self) -> None:
        """Blocking: raise if any rank saw a non-finite loss so far."""
        self._raise_if_bad(int(self._reduced()))

    def _raise_if_bad(self, first: int) -> None:
        if first != self.NONE:
            where = f"{self.where}, " if self.where else ""
            raise NonFiniteLossError(
                f"{where}step {first}: the loss is not finite (NaN or inf); stopped before writing a "
                "checkpoint of this state, so the last good one stays the latest (lower the lr, or check the data)"
            )


def train_one_epoch(
    model: nn.Module,
    batches: Iterable,
    optimizer: torch.optim.Optimizer,
    lr_at: Callable[[int], float],
    first_step: int,
    device: torch.device,
    criterion: Callable[..., torch.Tensor] | None = None,
    max_steps: int = 0,
    amp: bool = False,
    layout: torch.memory_format = torch.contiguous_format,
    world_size: int = 1,
    after_step: Callable[[], None] | None = None,
    check_every: int = 50,
    where: str = "",
) -> dict:
    """One pass over ``batches``; the learning rate is set per step from ``lr_at(global step)``;
    ``criterion(logits, images, labels)`` (default: plain cross-entropy) gives the loss. Loss,
    accuracy and images/s are totals over all ranks. The running sums stay on the device (no host
    sync per step); a non-finite loss raises ``NonFiniteLossError`` naming its global step, within
    2 x ``check_every`` steps and at the latest at the epoch's end (``NonFiniteGuard``)."""
    criterion = criterion or Criterion()
    guard = NonFiniteGuard(device, world_size, check_every, where)
    model.train()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, seen
    step = first_step
    timed = DataWait(batches, max_steps)
    start = time.perf_counter()
    for i, (images, labels) in enumerate(timed):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        images = images.to(device, non_blocking=True).contiguous(memory_format=layout)
        labels = labels.to(device, non_blocking=True)
        with torch.autocast(device.type, torch.bfloat16, enabled=amp):
            logits = model(images)
            loss = criterion(logits, images, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step()
        guard.record(loss, step)
        totals[0] += loss.detach().double() * len(labels)
        totals[1] += (logits.detach().argmax(dim=1) == labels).sum()
        totals[2] += len(labels)
        step += 1
        guard.poll(i + 1)
    guard.check()  # before the caller writes any checkpoint of this epoch
    seconds = time.perf_counter() - start
    totals = torch.cat([totals, torch.tensor([timed.seconds, seconds], dtype=torch.float64, device=device)])
    if world_size > 1:  # [dist]
        torch.distributed.all_reduce(totals)
    loss_sum, correct, seen, waited, busy = totals.tolist()
    seen = int(seen)
    return {
        "train_loss": loss_sum / max(seen, 1),
        "train_top1": correct / max(seen, 1),
        "train_images": seen,
        "img_s": seen / max(seconds, 1e-9),
        "steps": step - first_step,
        # the share of the epoch's training time the step waited for its next batch (all ranks
        # together): near 0 when the loader keeps up, near 1 when it starves the step
        "data_wait_fraction": waited / max(busy, 1e-9),
        "data_wait_s": waited / world_size,  # per rank
    }


class DataWait:
    """``batches`` (at most ``max_steps`` of them when > 0), adding up in ``seconds`` the time each
    ``next`` took: what the training step waited for its data. The steps themselves queue work on
    a GPU without waiting for it, so a loader that keeps up costs almost none of this time."""

    def __init__(self, batches: Iterable, max_steps: int = 0):
        self.batches, self.max_steps, self.seconds = batches, max_steps, 0.0

    def __iter__(self):
        source = iter(self.batches)
        for _ in itertools.count() if not self.max_steps else range(self.max_steps):
            start = time.perf_counter()
            batch = next(source, None)
            self.seconds += time.perf_counter() - start
            if batch is None:
                return
            yield batch


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable,
    device: torch.device,
    world_size: int = 1,
    layout: torch.memory_format = torch.contiguous_format,
) -> dict:
    """Loss, top-1 and top-5 over this rank's batches, summed over ranks when distributed."""
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top-1, top-5, count
    for images, labels in batches:
        images, labels = images.to(device).contiguous(memory_format=layout), labels.to(device)
        totals += batch_totals(model(images).float(), labels)
    if world_size > 1:  # [dist] on the device: NCCL reduces CUDA tensors only
        torch.distributed.all_reduce(totals)
    loss_sum, top1, top5, count = totals.tolist()
    n = max(count, 1.0)
    return {"val_loss": loss_sum / n, "val_top1": top1 / n, "val_top5": top5 / n, "val_images": int(count)}


def memory_format(config: TrainConfig, device: torch.device) -> torch.memory_format:
    """``config.memory_format`` on ``device``: auto is channels_last on a GPU, NCHW elsewhere."""
    if config.memory_format == "channels_last" or (config.memory_format == "auto" and device.type == "cuda"):
        return torch.channels_last
    return torch.contiguous_format


def step_model(model: nn.Module, config: TrainConfig, runtime: Runtime) -> nn.Module:
    """What the steps call: ``model``, in DistributedDataParallel across ranks, then with
    ``config.compile`` under torch.compile (after DDP, as PyTorch's DDP notes advise: its graph is
    split at the gradient buckets so their all-reduces still overlap the backward). On one rank
    the graph must be whole (``fullgraph``): a break fails at the first step, naming what broke it,
    instead of silently training at eager speed."""
    train_model = model
    if runtime.world_size > 1:  # [dist]
        train_model = nn.parallel.DistributedDataParallel(model)
    if config.compile:
        train_model = torch.compile(train_model, fullgraph=runtime.world_size == 1)
    return train_model


def route_binary_convs(model: nn.Module, config: TrainConfig, device: torch.device) -> int:
    """Apply ``config.kernels`` to the model's binary convs: ``auto`` runs them on the packed 1-bit
    ops where ``device`` has them (cuda_ext.training), ``float`` on the float simulation. Returns
    how many run packed; call again whenever the binarizers change."""
    from cuda_ext.training import use_kernels

    return use_kernels(model, config.kernels, device)


def binary_conv_weights(model: nn.Module) -> list[torch.Tensor]:
    return [m.weight for m in model.modules() if isinstance(m, bc.BinaryConv2d) and m.is_binary]


def weight_signs(model: nn.Module) -> list[torch.Tensor]:
    return [w.detach().ge(0) for w in binary_conv_weights(model)]


def flip_ratio(before: list[torch.Tensor], model: nn.Module) -> float:
    """Fraction of binary weights whose sign changed during the epoch (0 when none are binary)."""
    after = weight_signs(model)
    total = sum(b.numel() for b in before)
    if not total or len(after) != len(before):
        return 0.0
    return sum(int((a != b).sum()) for a, b in zip(after, before)) / total


def binarized_weights(model: nn.Module) -> set[int]:
    """ids of the latent weights that are binarized in the forward (a weight binarizer is set). The
    real-valued twin's convs and two-step step 1's convs are BinaryConv2d too, with real weights."""
    return {id(m.weight) for m in model.modules() if isinstance(m, bc.BinaryConv2d) and m.weight_binarizer is not None}


def weight_clipper(model: nn.Module, config: TrainConfig) -> Callable[[], None] | None:
    """With ``weight_clip`` > 0: a step hook that clamps the binarized latent weights to
    [-weight_clip, weight_clip] (their gradient is 0 past |W| = 1, so a weight out there is stuck)."""
    if config.weight_clip <= 0:
        return None
    ids = binarized_weights(model)
    weights = [p for p in model.parameters() if id(p) in ids]

    @torch.no_grad()
    def clip() -> None:
        for w in weights:
            w.clamp_(-config.weight_clip, config.weight_clip)

    return clip


def make_optimizer(model: nn.Module, config: TrainConfig, weight_decay: float | None = None) -> torch.optim.Optimizer:
    """Binarized latent weights get no weight decay (the paper and the official recipe: wd 0 on
    them); every real-valued weight, the twin's convs and two-step step 1's included, gets the
    configured decay (``weight_decay``, when given: a segment's own, e.g. two-step step 1's)."""
    decay = config.weight_decay if weight_decay is None else weight_decay
    binary = binarized_weights(model)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if id(p) in binary], "weight_decay": 0.0},
        {"params": [p for p in params if id(p) not in binary], "weight_decay": decay},
    ]
    groups = [g for g in groups if g["params"]]
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov)
    return torch.optim.Adam(groups, lr=config.lr)


def lr_schedule(config: TrainConfig, total_steps: int, base_lr: float | None = None) -> Callable[[int], float]:
    """From ``base_lr`` (default ``config.lr``) over one segment of ``total_steps``: ``linear`` to 0
    (the official recipe; ``auto`` with adam), ``step``: x0.1 at each of ``lr_milestones`` (the
    paper; ``auto`` with sgd), ``cosine``: half a cosine to 0."""
    lr = config.lr if base_lr is None else base_lr
    schedule = config.schedule if config.schedule != "auto" else ("linear" if config.optimizer == "adam" else "step")
    total = max(total_steps, 1)
    if schedule == "linear":
        return lambda step: lr * max(0.0, 1.0 - step / total)
    if schedule == "cosine":
        return lambda step: lr * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
    bounds = [m * total_steps for m in config.lr_milestones]
    return lambda step: lr * 0.1 ** sum(step >= b for b in bounds)


# ---------------------------------------------------------------------------- train state (resume)


def save_train_state(
    directory: Path,
    model: nn.Module,
    optimizer,
    segment: int,
    epoch: int,
    history: list[dict],
    config: TrainConfig,
    extra: dict,
) -> None:
    """Model as a bireal checkpoint + optimizer/RNG/progress in a weights-only torch file."""
    directory.mkdir(parents=True, exist_ok=True)
    bc.save_checkpoint(
        directory / "model.safetensors",
        model,
        stage=config.stage,
        config=asdict(config),
        metrics=history[-1] if history else {},
    )
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "segment": segment,
            "epoch": epoch,
            "history": history,
            "torch_rng": torch.get_rng_state(),
            "extra": extra,
        },
        directory / "train_state.pt",
    )


def load_train_state(directory: Path) -> tuple[nn.Module, dict]:
    model, _ = bc.load_checkpoint(directory / "model.safetensors")
    state = torch.load(directory / "train_state.pt", weights_only=True)  # no arbitrary pickle
    return model, state


# ---------------------------------------------------------------------------- the loop


def prune_train_states(out: str, stage: str, keep: int = 2) -> None:
    """Keep the newest ``keep`` per-epoch train states of a stage (Ray keeps its own copies)."""
    import shutil

    states = sorted((Path(out) / ".train_state").glob(f"{stage}-epoch*"))
    for old in states[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


@dataclass
class Progress:
    """Where a stage (re)starts: segment index, epoch within it, history so far, optimizer state."""

    segment: int = 0
    epoch: int = 0
    history: list = None
    model: nn.Module | None = None
    optimizer_state: dict | None = None
    restarts: int = 0
    # what a restore restored: the global epoch of its checkpoint and that model's weights digest
    # (-1 and "" for a fresh start); each epoch of this attempt records both, so a fault test can
    # tell a resume from the latest checkpoint from one from an older one (tests/test_cluster.py)
    restored_epoch: int = -1
    restored_sha256: str = ""


def weights_digest(model: nn.Module) -> str:
    """sha256 over the model's tensors in name order: the same weights give the same digest,
    wherever and however they were stored."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_stage_checkpoint(
    config: TrainConfig, name: str, model: nn.Module, history: list[dict], **extra_config
) -> Path:
    """``<out>/<name>.safetensors`` with the stage's config and its last epoch's metrics, also
    published to ``artifacts`` (with its sha256) when the stages' outputs travel with the run."""
    path = stage_checkpoint(config, name)
    bc.save_checkpoint(
        path,
        model,
        stage=config.stage,
        config={**asdict(config), **extra_config},
        metrics=history[-1] if history else {},
    )
    if config.artifacts:
        storage.publish(path, storage.join(config.artifacts, f"{name}.safetensors"))
    return path


def _wait_for_rank0() -> None:
    """[dist] every rank waits until rank 0 has saved (and published) a checkpoint a later
    segment may read."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def resume_progress(config: TrainConfig, runtime: Runtime, plan: list[Segment]) -> Progress:
    """A fresh start, or the progress saved in the runtime's restore checkpoint: the epoch after the
    last reported one (a segment that had finished saves its extra checkpoint and hands over)."""
    restore = runtime.restore_dir()  # [dist] resume
    if restore is None:
        return Progress(history=[])
    model, state = load_train_state(restore)
    torch.set_rng_state(state["torch_rng"])
    progress = Progress(
        state["segment"],
        state["epoch"] + 1,
        state["history"],
        model,
        state["optimizer"],
        int(state["extra"].get("restarts", 0)) + 1,
        restored_epoch=len(state["history"]) - 1,
        restored_sha256=weights_digest(model),
    )
    if progress.epoch >= plan[progress.segment].epochs:  # that segment had finished
        done = plan[progress.segment]
        if runtime.rank == 0 and done.save_as:
            save_stage_checkpoint(config, done.save_as, model, progress.history)
        progress.segment, progress.epoch, progress.optimizer_state = progress.segment + 1, 0, None
    return progress


@dataclass
class DataSpec:
    manifest: dict
    input_config: dict
    eval_split: str  # what val_* measures: the held-out split with ``holdout``, else val/test
    test_split: str | None = None  # reported beside it as test_* (with ``holdout``)
    resident: dict = field(default_factory=dict)  # loader: resident: split -> ResidentSplit
    train_loader: ShardLoader | None = None  # loader: stream: its persistent workers serve every epoch

    def close(self) -> None:
        if self.train_loader is not None:
            self.train_loader.close()
            self.train_loader = None


def data_spec(config: TrainConfig, manifest: dict, device: torch.device) -> DataSpec:
    """The stage's splits (and with ``loader: resident`` their pixels, decoded once onto ``device``)."""
    from .data import HOLDOUT, eval_split_name, split_shards

    input_config = stage_input_config(config)
    if not config.holdout:
        spec = DataSpec(manifest, input_config, eval_split_name(manifest, config.shards))
    else:
        split_shards(manifest, config.shards, HOLDOUT, config.holdout)  # too large a holdout fails here
        spec = DataSpec(manifest, input_config, HOLDOUT, eval_split_name(manifest, config.shards))
    if config.loader == "resident":
        from .resident import check_resident, decode_split

        check_resident(input_config, config.shards)
        for split in ("train", spec.eval_split, spec.test_split):
            if split:
                spec.resident[split] = decode_split(
                    config.shards, manifest, split, input_config["size"], device, config.holdout
                )
    return spec


def load_teacher(config: TrainConfig, device: torch.device, class_names: list[str]) -> nn.Module | None:
    """The distillation teacher (``distill_from``), frozen in eval mode on ``device``; None without.
    Its outputs are the student's soft targets: a teacher of another class count or stem (the
    input it was trained on) is refused here, not as a shape error in the first step, and so is
    one whose checkpoint names other classes or another order (``class_names``: the shards'):
    its i-th output would teach the student's i-th class another class's score."""
    if not config.distill_from:
        return None
    source = config.distill_from
    if source.endswith(".safetensors"):
        local = Path(config.out) / ".inputs" / "teacher.safetensors"
        path = storage.fetch(source, local) if storage.is_url(source) else Path(source)
    else:  # a stage checkpoint's name, read where init reads it
        path = stage_input(config, source, config.init_from)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: distill_from={source!r} names no checkpoint")
    teacher, header = bc.load_checkpoint(path)
    kwargs = teacher.model_spec["kwargs"]
    have, wanted = (kwargs.get("num_classes"), kwargs.get("stem")), (len(class_names), config.stem)
    if have != wanted:
        raise ValueError(
            f"{path}: distill_from={source!r} is a {have[0]}-way net with the {have[1]} stem; this stage "
            f"trains a {wanted[0]}-way net (the shards' classes) with the {wanted[1]} stem: a teacher must be both"
        )
    other_classes = classes_differ(trained_classes(header), class_names)
    if other_classes:
        raise ValueError(
            f"{path}: distill_from={source!r} was trained on other classes or another order than these shards' "
            f"({other_classes})"
        )
    teacher.eval().requires_grad_(False)
    return teacher.to(device)


def epoch_batches(
    config: TrainConfig, runtime: Runtime, data: DataSpec, global_epoch: int
) -> tuple[Iterable, int, int]:
    """This rank's training batches of one epoch -> (batches, steps, samples left out), from the
    resident tensors or streamed from the shards."""
    if data.resident:
        from .resident import train_batches

        return train_batches(
            data.resident["train"],
            data.input_config,
            config.batch_size,
            rank=runtime.rank,
            world_size=runtime.world_size,
            seed=config.seed,
            epoch=global_epoch,
            pca_lighting=config.pca_lighting,
        )
    if data.train_loader is None:  # the first epoch starts the workers; they serve every later one
        from .data import ShardLoader

        data.train_loader = ShardLoader(
            config.shards,
            "train",
            data.input_config,
            config.batch_size,
            train=True,
            seed=config.seed,
            shuffle_buffer=config.shuffle_buffer,
            pca_lighting=config.pca_lighting,
            persistent=True,
            **_stream_where(config, runtime, data),
        )
    batches, plan = data.train_loader.epoch(global_epoch)
    return batches, plan.steps, plan.left_out


def eval_batches(config: TrainConfig, runtime: Runtime, data: DataSpec, split: str) -> Iterable:
    """This rank's share of ``split`` for evaluation (every sample once across ranks)."""
    if data.resident:
        from .resident import eval_batches as resident_eval

        return resident_eval(
            data.resident[split], data.input_config, config.batch_size, rank=runtime.rank, world_size=runtime.world_size
        )
    from .data import make_loader

    batches, _ = make_loader(
        config.shards, split, data.input_config, config.batch_size, train=False, **_stream_where(config, runtime, data)
    )
    return batches


def _stream_where(config: TrainConfig, runtime: Runtime, data: DataSpec) -> dict:
    """Where this rank reads the shards: the same for the training and the evaluation loaders."""
    return {
        "rank": runtime.rank,
        "world_size": runtime.world_size,
        "workers": config.loader_workers,
        "manifest": data.manifest,
        "holdout": config.holdout,
        "device": runtime.device(),  # the uint8 batches are finished where they train
        "decode": config.decode,  # and with decode: device, decoded there too
    }


def run_epoch(
    config: TrainConfig,
    runtime: Runtime,
    data: DataSpec,
    model: nn.Module,
    train_model: nn.Module,
    optimizer,
    seg: Segment,
    epoch: int,
    global_epoch: int,
    device: torch.device,
    criterion: Criterion,
) -> dict:
    """Train one epoch of segment ``seg`` and evaluate; -> the epoch's metrics."""
    train_batches, plan_steps, left_out = epoch_batches(config, runtime, data, global_epoch)
    if plan_steps == 0:  # the stage would run and save a checkpoint that trained nothing
        raise EmptyEpochError(no_batch_message(config, runtime.world_size, left_out))
    steps = min(plan_steps, config.max_steps_per_epoch or plan_steps)
    lr_at = lr_schedule(config, steps * seg.epochs, config.lr * seg.lr_scale)
    before = weight_signs(model)
    layout = memory_format(config, device)  # of the batches, as of the model's weights
    epoch_start = time.perf_counter()
    metrics = train_one_epoch(
        train_model,
        train_batches,
        optimizer,
        lr_at,
        epoch * steps,
        device,
        criterion,
        steps,
        amp=config.precision == "bf16" and device.type == "cuda",
        layout=layout,
        world_size=runtime.world_size,
        after_step=weight_clipper(model, config),
        check_every=config.finite_check_steps,
        where=f"{config.stage} stage, segment {seg.name}, epoch {global_epoch}",
    )

    def scored(split: str) -> dict:
        return evaluate(model, eval_batches(config, runtime, data, split), device, runtime.world_size, layout)

    metrics.update(scored(data.eval_split))
    if data.test_split:
        test = scored(data.test_split)
        metrics.update({"test" + k.removeprefix("val"): v for k, v in test.items()})
    metrics.update(
        {
            "epoch": global_epoch,
            "segment": seg.name,
            "lr": lr_at(epoch * steps),
            "flip_ratio": flip_ratio(before, model),
            "left_out": left_out,
            "epoch_s": time.perf_counter() - epoch_start,
            # when the epoch ended: the timestamp of its metrics in MLflow, the same on every send
            # (a retry after a timeout, the driver's backfill), so a repeat is one row, not two
            "ended_ms": int(time.time() * 1000),
        }
    )
    return metrics


def epoch_provenance(progress: Progress, runtime: Runtime, model: nn.Module, packed_convs: int) -> dict:
    """What an epoch's metrics record besides its scores: which attempt ran it and what it resumed
    from (fault tests tell a resume from the latest checkpoint from one from an older one), the
    weights its checkpoint holds (rank 0), and how many binary convs ran on the packed ops."""
    provenance = {
        "restarts": progress.restarts,
        "resumed_from_epoch": progress.restored_epoch,
        "restored_sha256": progress.restored_sha256,
        "packed_convs": packed_convs,  # kernels: auto
    }
    if runtime.rank == 0:
        provenance["weights_sha256"] = weights_digest(model)
    return provenance


def end_epoch(
    config: TrainConfig,
    runtime: Runtime,
    progress: Progress,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    where: tuple[int, int, int],
    on_epoch: Callable[[dict], None] | None,
) -> None:
    """After an epoch (``where``: segment index, epoch in it, global epoch) was added to the history:
    rank 0 saves the train state, logs it (``on_epoch``, before the report: Tune may stop the trial
    there), every rank reports it with that state as the checkpoint, and rank 0 prunes old states."""
    segment, epoch, global_epoch = where
    history = progress.history
    ckpt_dir = Path(config.out) / ".train_state" / f"{config.stage}-epoch{global_epoch:03d}"
    if runtime.rank == 0:
        save_train_state(ckpt_dir, model, optimizer, segment, epoch, history, config, {"restarts": progress.restarts})
        if on_epoch is not None:
            on_epoch(history[-1])
    runtime.report(history[-1], ckpt_dir)  # [dist] report + checkpoint
    if runtime.rank == 0:
        prune_train_states(config.out, config.stage)


def train_loop(
    config: TrainConfig, runtime: Runtime | None = None, on_epoch: Callable[[dict], None] | None = None
) -> dict:
    """Run one stage; returns {"checkpoint", "history", "final"}. ``on_epoch`` (rank 0) logs."""
    from .data import read_manifest
    from .shard_read import check_sizes

    if config.stage == "pretrain" and not any(config.phase_epochs):  # before any data is read
        raise ValueError(
            f"pretrain: phase_epochs={config.phase_epochs}, nothing to train (a recipe that "
            "binarizes from scratch, init: scratch, needs no pretrain stage)"
        )
    runtime = runtime or Runtime()
    device = runtime.device()
    torch.manual_seed(config.seed + runtime.rank)
    manifest = read_manifest(config.shards)
    check_sizes(manifest, config.shards)  # every attempt: a truncated shard stops it before a step
    # the teacher first: a missing one fails before the resident loader decodes a split
    class_names = [c["name"] for c in manifest["classes"]]  # in label order
    teacher = load_teacher(config, device, class_names)
    criterion = Criterion(config.label_smoothing, teacher, config.distill_weight, config.distill_temperature)
    data = data_spec(config, manifest, device)
    input_config = data.input_config
    plan = segments(config, len(class_names), class_names)
    progress = resume_progress(config, runtime, plan)
    if runtime.rank == 0 and progress.restored_epoch < 0:  # a fresh start: the twins of earlier runs go
        for path in remove_stale_twins(config):
            log.warning("removed %s: an earlier run's twin that this pretrain stage does not write", path)
    history, model = progress.history, progress.model
    global_epoch = len(history)  # every epoch run so far (skipped clip extensions ran none)

    try:
        for si in range(progress.segment, len(plan)):
            seg, resuming = plan[si], si == progress.segment and progress.optimizer_state is not None
            if seg.gated and not resuming and clip_recovered(config, history):
                continue  # the clip twin is within the gate: no more clip epochs
            if not resuming:
                model = seg.prepare(model)
            model = model.to(device, memory_format=memory_format(config, device))
            packed_convs = route_binary_convs(model, config, device)
            train_model = step_model(model, config, runtime)
            optimizer = make_optimizer(model, config, seg.weight_decay)
            if resuming:
                optimizer.load_state_dict(progress.optimizer_state)
            for epoch in range(progress.epoch if si == progress.segment else 0, seg.epochs):
                metrics = run_epoch(
                    config, runtime, data, model, train_model, optimizer, seg, epoch, global_epoch, device, criterion
                )
                metrics.update(epoch_provenance(progress, runtime, model, packed_convs))
                history.append(metrics)
                end_epoch(config, runtime, progress, model, optimizer, (si, epoch, global_epoch), on_epoch)
                global_epoch += 1
            if runtime.rank == 0 and seg.save_as:
                save_stage_checkpoint(config, seg.save_as, model, history)
            _wait_for_rank0()
            check_relu_floor(config, plan, si, history)
            check_clip_gate(config, plan, si, history)
    finally:
        data.close()  # the training loader's persistent workers
    final = stage_checkpoint(config, config.stage)
    main = [seg for seg in plan if not seg.side]
    if plan[-1].side and main:  # the stage's result is its main line's last model, saved as it ended
        model, _ = bc.load_checkpoint(stage_input(config, main[-1].save_as))
    if runtime.rank == 0:
        save_stage_checkpoint(
            config,
            config.stage,
            model,
            history,
            class_names=class_names,
            input=input_config,
        )
    return {"checkpoint": str(final), "history": history, "final": history[-1] if history else {}}

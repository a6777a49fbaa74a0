"""A stage as a list of *segments* run in order, each with its own optimizer and schedule (``train_loop``
runs them): the twin's activation phases, the clip gate's extensions and the ReLU control for
pretrain; scratch or twin init and the two steps for binarize; the +-1 constraint for finetune.
Also where a stage's checkpoints are named, read from and published.

Each segment's ``prepare`` turns the previous segment's model into this one's (None before the
first), so a plan is data that tests read without training anything."""

from __future__ import annotations

import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

import bireal_core as bc

from . import storage
from .params import Phase, TrainConfig


@dataclass
class Segment:
    name: str
    epochs: int
    prepare: Callable[[nn.Module | None], nn.Module]  # previous segment's model -> this one's
    save_as: str | None = None  # extra checkpoint at the segment's end
    lr_scale: float = 1.0  # its starting lr = lr_scale * config.lr
    side: bool = False  # a side branch (the ablation's control): not the stage's result
    weight_decay: float | None = None  # its real weights' decay (None: config.weight_decay)
    gated: bool = False  # a clip-phase extension: runs only while the clip twin is not recovered


def stage_input_config(config: TrainConfig) -> dict:
    """The stem's input settings with the stage's augmentation (``auto``: the stem's own)."""
    input_config = bc.default_input_config(config.stem)
    if config.augment != "auto":
        input_config["augment"] = config.augment
    return input_config


def stage_checkpoint(config: TrainConfig, name: str, folder: str = "") -> Path:
    """Checkpoint ``name`` of the stages, in ``folder`` (default: the config's ``out``)."""
    return Path(folder or config.out) / f"{name}.safetensors"


def stage_input(config: TrainConfig, name: str, folder: str = "") -> Path:
    """A stage checkpoint this process reads, as a local file: from ``folder`` (``init_from``: a
    path or URL), else from where the stages publish (``artifacts``), else the local ``out``. A
    remote one is fetched (and checked against its sha256) into ``<out>/.inputs/``."""
    source = folder or config.artifacts
    if source and storage.is_url(source):
        local = Path(config.out) / ".inputs" / f"{name}.safetensors"
        return storage.fetch(storage.join(source, f"{name}.safetensors"), local)
    return stage_checkpoint(config, name, source)


def published_names(config: TrainConfig) -> list[str]:
    """The checkpoints a stage writes (and publishes): pretrain's per-phase ones, the stage's own."""
    if config.stage != "pretrain":
        return [config.stage]
    names = [f"pretrain-{a}" for a, e in zip(config.phases, config.phase_epochs) if e > 0]
    return names + (["pretrain-relu_control"] if config.relu_control else []) + ["pretrain"]


def remove_stale_twins(config: TrainConfig) -> list[Path]:
    """A fresh pretrain stage removes the twin checkpoints in ``out`` that it will not write again
    (a phase now at 0 epochs, relu_control now off): binarize's ``init`` would otherwise start from
    an earlier run's twin without a word. -> the files removed."""
    if config.stage != "pretrain":
        return []
    every = {f"pretrain-{phase}" for phase in typing.get_args(Phase)} | {"pretrain-relu_control"}
    paths = [stage_checkpoint(config, name) for name in sorted(every - set(published_names(config)))]
    stale = [path for path in paths if path.is_file()]
    for path in stale:
        path.unlink()
    return stale


def _twin_phase(config: TrainConfig, activation: str, num_classes: int):
    def prepare(previous: nn.Module | None) -> nn.Module:
        model = bc.create_twin(config.arch, activation=activation, num_classes=num_classes, **config.model_kwargs())
        if previous is not None:
            report = bc.init_from_twin(model, previous.state_dict())
            assert report.complete, str(report)
        return model

    return prepare


def _binarize_init(config: TrainConfig, num_classes: int):
    def prepare(previous: nn.Module | None) -> nn.Module:
        model = bc.create_model(
            config.arch,
            num_classes=num_classes,
            activation=config.activation,
            weight_gradient=config.weight_gradient,
            binary_weights=not config.two_step,
            **config.model_kwargs(),
        )
        if config.init == "scratch" and config.latent_init == "official":
            with torch.no_grad():  # HardBinaryConv: torch.rand(...) * 0.001
                for m in model.modules():
                    if isinstance(m, bc.BinaryConv2d) and m.input_binarizer is not None:
                        m.weight.uniform_(0.0, 0.001)
        if config.init != "scratch":
            hint = " (pretrain with relu_control: true)" if config.init == "relu_control" else ""
            try:
                path = stage_input(config, f"pretrain-{config.init}", config.init_from)
            except FileNotFoundError as e:
                raise FileNotFoundError(f"{e}: init {config.init!r} needs this pretrain checkpoint{hint}") from e
            if not path.is_file():
                raise FileNotFoundError(f"{path}: init {config.init!r} needs this pretrain checkpoint{hint}")
            twin, _ = bc.load_checkpoint(path)
            report = bc.init_from_twin(model, twin.state_dict())
            if not report.complete:
                raise ValueError(f"{path}: does not fit {config.arch}: {report}")
        return model

    return prepare


def _binarize_weights(config: TrainConfig):
    def prepare(previous: nn.Module) -> nn.Module:
        bc.set_binary_weights(previous, True, config.weight_gradient)
        return previous

    return prepare


def absorb_alpha_into_bn(conv: bc.BinaryConv2d, bn: nn.BatchNorm2d) -> None:
    """Set W <- sign(W) (alpha becomes 1) and rescale BN so its eval output is unchanged:
    BN(alpha z) = gamma (alpha z - mu) / sqrt(var + eps) + beta
                = gamma' (z - mu / alpha) / sqrt(var / alpha^2 + eps) + beta,
    with gamma' = gamma * sqrt(var / alpha^2 + eps) * alpha / sqrt(var + eps)."""
    alpha = conv.weight_binarizer.scale(conv.weight.detach()).flatten()  # (C_out,)
    conv.weight.copy_(bc.sign(conv.weight))
    var = bn.running_var.clone()
    bn.running_mean.div_(alpha)
    bn.running_var.div_(alpha**2)
    bn.weight.mul_(torch.sqrt(bn.running_var + bn.eps) * alpha / torch.sqrt(var + bn.eps))


def constrain_for_finetune(model: nn.Module, finetune_fc: bool = False) -> nn.Module:
    """Weights to +-1 (alpha = 1) with BN rescaled to absorb alpha exactly, then everything but
    BatchNorm (and optionally the FC head) frozen: BN is retrained on the +-1 network."""
    with torch.no_grad():
        for _, conv, bn in bc.binary_conv_bn_pairs(model):
            absorb_alpha_into_bn(conv, bn)
    for _name, p in model.named_parameters():
        p.requires_grad = False
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            for p in m.parameters():
                p.requires_grad = True
    if finetune_fc:
        for p in model.fc.parameters():
            p.requires_grad = True
    return model


def _finetune_init(config: TrainConfig, num_classes: int, class_names: list[str] | None):
    def prepare(previous: nn.Module | None) -> nn.Module:
        path = stage_input(config, "binarize", config.init_from)
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: finetune starts from the binarize stage's checkpoint (train binarize first)"
            )
        model, header = bc.load_checkpoint(path)
        check_starting_net(path, model, config, num_classes, trained_classes(header), class_names)
        return constrain_for_finetune(model, config.finetune_fc)

    return prepare


def trained_classes(header: dict) -> list[str] | None:
    """The class names a checkpoint was trained on: a stage's final checkpoint names them (the
    shards' classes, in label order); a phase's or an imported one does not (None)."""
    names = (header.get("config") or {}).get("class_names")
    return list(names) if names is not None else None


def classes_differ(trained: list[str] | None, class_names: list[str] | None) -> str:
    """'' or the first class where a checkpoint's names and the shards' differ, as
    "class 0: 'airplane' there, '0' here" (nothing to compare where either is unknown)."""
    if trained is None or class_names is None or trained == list(class_names):
        return ""
    i = next((i for i, (a, b) in enumerate(zip(trained, class_names)) if a != b), min(len(trained), len(class_names)))
    there = repr(trained[i]) if i < len(trained) else "none"
    here = repr(class_names[i]) if i < len(class_names) else "none"
    return f"class {i}: {there} there, {here} here"


def check_starting_net(
    path: Path,
    model: nn.Module,
    config: TrainConfig,
    num_classes: int,
    trained: list[str] | None = None,
    class_names: list[str] | None = None,
) -> None:
    """Finetune retrains the binarize stage's net as it is: a ValueError before any epoch when that
    net is not the one this stage's settings and shards describe (before, a finetune section with
    another width trained binarize's width silently, and other shards' labels failed mid-epoch), or
    was trained on other classes or another order than the shards (``trained``: its checkpoint's
    class names, ``class_names``: the shards')."""
    spec = model.model_spec
    have = {"arch": spec["name"], **{k: spec["kwargs"].get(k) for k in ("stem", "width", "num_classes")}}
    wanted = {"arch": config.arch, "stem": config.stem, "width": config.width, "num_classes": num_classes}
    differ = [f"{k} {have[k]!r} (finetune: {wanted[k]!r})" for k in wanted if have[k] != wanted[k]]
    other_classes = classes_differ(trained, class_names)
    if other_classes and not differ:
        differ = [f"trained on other classes or another order than these shards' ({other_classes})"]
    if differ:
        raise ValueError(
            f"{path}: {', '.join(differ)}: finetune retrains the binarize stage's net, so finetune.arch, "
            "stem and width must be binarize's, and the shards (their classes, num_classes) the ones it trained on"
        )


def _relu_control(config: TrainConfig, num_classes: int) -> list[Segment]:
    """The equal-compute ReLU twin: from pretrain-relu, one ReLU segment per later phase with that
    phase's epochs and lr scale, so it costs exactly what the leaky_clip -> clip chain costs."""

    def from_relu_phase(previous: nn.Module | None) -> nn.Module:
        model, _ = bc.load_checkpoint(stage_input(config, "pretrain-relu"))
        return model

    later = [(e, scale) for e, scale in zip(config.phase_epochs[1:], config.phase_lr_scale[1:]) if e > 0]
    return [
        Segment(
            f"pretrain-relu_control-{i}",
            e,
            from_relu_phase if i == 0 else (lambda previous: previous),
            "pretrain-relu_control" if i == len(later) - 1 else None,
            scale,
            side=True,
        )
        for i, (e, scale) in enumerate(later)
    ]


def _clip_extensions(config: TrainConfig) -> list[Segment]:
    """With ``clip_gate``: the clip phase again (its epochs and lr scale, from where it ended), as
    many times as ``clip_gate_max_epochs`` holds; ``train_loop`` runs one only while the gate fails."""
    if not config.clip_gate:
        return []
    epochs, scale = config.phase_epochs[-1], config.phase_lr_scale[-1]
    rounds = config.clip_gate_max_epochs // epochs
    return [
        Segment(f"pretrain-clip-more{k}", epochs, lambda previous: previous, "pretrain-clip", scale, gated=True)
        for k in range(1, rounds + 1)
    ]


class ClipGateError(RuntimeError):
    """The clip twin stayed further below the ReLU twin than ``clip_gate`` allows."""


def clip_gap(history: list[dict]) -> float | None:
    """ReLU twin's last top-1 minus the clip twin's last (None until both phases have an epoch)."""
    relu = [h["val_top1"] for h in history if h["segment"] == "pretrain-relu"]
    clip = [h["val_top1"] for h in history if h["segment"].startswith("pretrain-clip")]
    return relu[-1] - clip[-1] if relu and clip else None


def clip_recovered(config: TrainConfig, history: list[dict]) -> bool:
    """Whether the clip twin is within ``clip_gate`` of the ReLU twin (or not yet measured)."""
    gap = clip_gap(history)
    return gap is None or gap <= config.clip_gate


class ReluFloorError(RuntimeError):
    """The ReLU twin ended its phase below ``relu_floor``."""


def check_relu_floor(config: TrainConfig, plan: list[Segment], si: int, history: list[dict]) -> None:
    """After segment ``si`` saved the ReLU twin: stop the stage if it is under ``relu_floor``."""
    if not config.relu_floor or plan[si].save_as != "pretrain-relu":
        return
    top1 = history[-1]["val_top1"]
    if top1 < config.relu_floor:
        raise ReluFloorError(
            f"pretrain: the ReLU twin ends its {plan[si].epochs} epochs at top-1 {top1:.4f}, under "
            f"relu_floor={config.relu_floor}: train it longer (phase_epochs[0]) or at another lr"
        )


def check_clip_gate(config: TrainConfig, plan: list[Segment], si: int, history: list[dict]) -> None:
    """After segment ``si`` saved the clip twin: stop the stage if it is still outside the gate and
    no extension is left."""
    if not config.clip_gate or plan[si].save_as != "pretrain-clip" or clip_recovered(config, history):
        return
    gap = clip_gap(history)
    if any(seg.gated for seg in plan[si + 1 :]):
        return
    extra = sum(seg.epochs for seg in plan[: si + 1] if seg.gated)
    raise ClipGateError(
        f"pretrain: the clip twin ends {gap:.4f} top-1 below the ReLU twin ({history[-1]['val_top1']:.4f} vs "
        f"{gap + history[-1]['val_top1']:.4f}), over clip_gate={config.clip_gate} after {extra} extra clip epochs "
        f"(clip_gate_max_epochs={config.clip_gate_max_epochs}): lengthen the leaky_clip/clip phases or raise the cap"
    )


def segments(config: TrainConfig, num_classes: int, class_names: list[str] | None = None) -> list[Segment]:
    """The stage's segments in order (``class_names``: the shards', checked against the checkpoint
    finetune starts from where that names its own)."""
    if config.stage == "pretrain":
        chain = [
            Segment(f"pretrain-{a}", e, _twin_phase(config, a, num_classes), f"pretrain-{a}", scale)
            for a, e, scale in zip(config.phases, config.phase_epochs, config.phase_lr_scale)
            if e > 0
        ]
        chain += _clip_extensions(config)
        return chain + (_relu_control(config, num_classes) if config.relu_control else [])
    if config.stage == "binarize":
        init = _binarize_init(config, num_classes)
        if not config.two_step:
            return [Segment("binarize", config.epochs, init)]
        # step 1 counts inside the stage's epochs: a two-step run costs what a one-step run costs
        return [
            Segment("binarize-step1-activations", config.step1_epochs, init, weight_decay=config.step1_weight_decay),
            Segment("binarize-step2-weights", config.epochs - config.step1_epochs, _binarize_weights(config)),
        ]
    return [Segment("finetune", config.epochs, _finetune_init(config, num_classes, class_names))]

"""Load the authors' PyTorch checkpoints (liuzechun/Bi-Real-net) into this project's models.

Their models and ours register the same layers in the same order with the same sizes (checked
against their key lists by tests/test_models.py), so the mapping is positional; only the names
differ, their ``HardBinaryConv`` keeps its weight flattened as ``(O*I*k*k, 1)``, and their
Bi-Real-50 builds one conv it never uses (``layers.0.down_conv1x1``), which is dropped. Their
binary conv is ``mean|W| * sign(W)`` on ApproxSign activations, which is this project's
Bi-Real net with ``activation="approx_sign"`` and ``weight_gradient="official"``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch import nn

from .checkpoint import project_file_kind
from .registry import create_model

OFFICIAL_ARCHS = ("bireal18", "bireal34", "bireal50")
UNUSED_KEYS = ("layers.0.down_conv1x1.",)  # Bi-Real-50: built, never used in the forward


def read_official_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict of an authors' checkpoint (``{"state_dict": ...}`` or a bare state dict;
    the ``module.`` prefix of DataParallel removed). Tensors only: no arbitrary pickle runs."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    kind = project_file_kind(path)  # torch.load reads safetensors too, and would map its keys by position
    if kind:
        raise ValueError(f"{path}: {kind}, not an authors' checkpoint (their .pth.tar) to import")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle with objects besides tensors in it, or not a torch file at all
        raise load_error(path, e) from e
    state = data.get("state_dict", data) if isinstance(data, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        found = list(data)[:5] if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{path}: no state dict of tensors inside (found {found})")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_error(path: Path, e: Exception) -> ValueError:
    """torch.load's failure in one line. Its weights-only refusal is a page that suggests
    ``weights_only=False`` (which runs whatever the pickle names); this names the object instead
    and how to keep the tensors alone from a file one trusts."""
    other = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
    if other:
        return ValueError(
            f"{path}: holds an object of type {other.group(1)} besides tensors, and only tensors are read (unpickling "
            "objects can run code); where you trust the file, save its state dict alone: "
            f"torch.save({{'state_dict': torch.load('{path}', weights_only=False)['state_dict']}}, 'tensors.pth.tar')"
        )
    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    if "WeightsUnpickler error:" in text:  # the reason is on the lines after torch's advice
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    reason = f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__
    return ValueError(f"{path}: not a PyTorch checkpoint (torch.load: {reason})")


def import_official(arch: str, state: dict[str, torch.Tensor]) -> nn.Module:
    """This project's ``arch`` (ImageNet stem, width 1, 1000 classes) with the authors' weights."""
    if arch not in OFFICIAL_ARCHS:
        raise ValueError(f"arch={arch!r}: the authors published {', '.join(OFFICIAL_ARCHS)}")
    theirs = [(k, v) for k, v in state.items() if not k.startswith(UNUSED_KEYS)]
    model = create_model(
        arch, num_classes=1000, stem="imagenet", width=1.0, activation="approx_sign", weight_gradient="official"
    )
    ours = model.state_dict()
    if len(theirs) != len(ours):
        raise ValueError(
            f"{arch}: the checkpoint has {len(theirs)} entries, the model {len(ours)}: not the authors' " + arch
        )
    mapped = {}
    for (name, target), (their_name, value) in zip(ours.items(), theirs):
        if value.numel() != target.numel():
            raise ValueError(f"{arch}: {their_name} {tuple(value.shape)} does not fit {name} {tuple(target.shape)}")
        mapped[name] = value.reshape(target.shape).to(target.dtype)
    model.load_state_dict(mapped)
    return model

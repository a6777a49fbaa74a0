"""The real-valued twin and initializing a Bi-Real net from it (the paper's initialization)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import nn

from .binarizers import TWIN_ACTIVATIONS
from .registry import create_model


def create_twin(name: str, activation: str = "relu", **kwargs) -> nn.Module:
    """The real-valued twin of Bi-Real model ``name``: same topology and parameter names,
    ``activation`` (relu | leaky_clip | clip) where the binary net has sign, real weights."""
    if activation not in TWIN_ACTIVATIONS:
        raise ValueError(f"twin activation must be one of {TWIN_ACTIVATIONS}, got {activation!r}")
    kwargs.pop("binary_weights", None)
    return create_model(name, activation=activation, binary_weights=False, **kwargs)


@dataclass
class InitReport:
    copied: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # in the model, not in the twin
    unexpected: list[str] = field(default_factory=list)  # in the twin, not in the model
    mismatched: list[str] = field(default_factory=list)  # same name, different shape

    @property
    def complete(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def __str__(self) -> str:
        parts = [f"copied {len(self.copied)} tensors"]
        for label in ("missing", "unexpected", "mismatched"):
            names = getattr(self, label)
            if names:
                parts.append(f"{label}: {', '.join(names)}")
        return "; ".join(parts)


def init_from_twin(model: nn.Module, twin_state: Mapping[str, torch.Tensor]) -> InitReport:
    """Copy every tensor of ``twin_state`` into ``model`` by name; report what could not map."""
    report = InitReport()
    own = model.state_dict()
    for name, tensor in twin_state.items():
        if name not in own:
            report.unexpected.append(name)
        elif own[name].shape != tensor.shape:
            report.mismatched.append(f"{name} {tuple(tensor.shape)} -> {tuple(own[name].shape)}")
        else:
            own[name] = tensor.detach().clone()
            report.copied.append(name)
    report.missing = [n for n in own if n not in twin_state]
    model.load_state_dict(own)
    return report

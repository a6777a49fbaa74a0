"""bireal_core: Bi-Real Net in plain PyTorch (binarizers, layers, models, checkpoints, cost).

Imports nothing from the pipeline; everything here runs on a CPU.

The names below are imported on first use (PEP 562), so ``bireal_core.preprocess`` (input
geometry and the image conversion) loads without torch: the shard stage's encoding processes run
it, and torch would cost each of them seconds and about 600 MB.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# each public name -> the submodule that defines it
_EXPORTS = {
    "ApproxSign": "binarizers",
    "Clip": "binarizers",
    "IdentitySign": "binarizers",
    "LeakyClip": "binarizers",
    "MagnitudeAwareSign": "binarizers",
    "SteSign": "binarizers",
    "channel_scale": "binarizers",
    "sign": "binarizers",
    "CheckpointError": "checkpoint",
    "NonFiniteError": "checkpoint",
    "load_checkpoint": "checkpoint",
    "read_header": "checkpoint",
    "save_checkpoint": "checkpoint",
    "PAPER_TABLE": "cost",
    "CostSummary": "cost",
    "summary": "cost",
    "BinaryConv2d": "layers",
    "ConvSpec": "models",
    "binary_conv_bn_pairs": "models",
    "set_binary_weights": "models",
    "AUGMENTS": "preprocess",
    "default_input_config": "preprocess",
    "input_config_problem": "preprocess",
    "create_model": "registry",
    "list_models": "registry",
    "register_model": "registry",
    "InitReport": "twin",
    "create_twin": "twin",
    "init_from_twin": "twin",
}
_SUBMODULES = (
    "augment",
    "binarizers",
    "checkpoint",
    "cost",
    "layers",
    "models",
    "official",
    "preprocess",
    "registry",
    "twin",
)
__all__ = [  # _EXPORTS' names (tests/test_import_layers.py keeps the two the same)
    "AUGMENTS",
    "ApproxSign",
    "BinaryConv2d",
    "binary_conv_bn_pairs",
    "CheckpointError",
    "Clip",
    "ConvSpec",
    "CostSummary",
    "IdentitySign",
    "InitReport",
    "LeakyClip",
    "MagnitudeAwareSign",
    "NonFiniteError",
    "PAPER_TABLE",
    "SteSign",
    "channel_scale",
    "create_model",
    "default_input_config",
    "create_twin",
    "init_from_twin",
    "input_config_problem",
    "list_models",
    "load_checkpoint",
    "read_header",
    "register_model",
    "save_checkpoint",
    "set_binary_weights",
    "sign",
    "summary",
]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS, *_SUBMODULES})


if TYPE_CHECKING:  # what type checkers and editors see
    from .binarizers import ApproxSign, Clip, IdentitySign, LeakyClip, MagnitudeAwareSign, SteSign, channel_scale, sign
    from .checkpoint import CheckpointError, NonFiniteError, load_checkpoint, read_header, save_checkpoint
    from .cost import PAPER_TABLE, CostSummary, summary
    from .layers import BinaryConv2d
    from .models import ConvSpec, binary_conv_bn_pairs, set_binary_weights
    from .preprocess import AUGMENTS, default_input_config, input_config_problem
    from .registry import create_model, list_models, register_model
    from .twin import InitReport, create_twin, init_from_twin

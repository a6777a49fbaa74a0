"""One registry for every model family; ``create_model`` records how each model was built.

The recorded ``model_spec`` (registry name + constructor arguments) is what checkpoints and
packed artifacts store, so a later stage can rebuild the exact model.
"""

from __future__ import annotations

import math
from typing import Callable

from torch import nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: register ``fn`` under its ``__name__``; a second model of that name is refused."""
    name = fn.__name__
    if name in _MODELS:
        raise ValueError(f"model {name!r} is already registered")
    _MODELS[name] = fn
    return fn


def registered() -> dict[str, Callable[..., nn.Module]]:
    """Every model family, registered when ``bireal_core.models`` is first imported (the package
    imports its submodules on first use)."""
    from . import models  # noqa: F401  (registers every model family)

    return _MODELS


def list_models() -> list[str]:
    return sorted(registered())


def create_model(name: str, num_classes: int = 1000, **kwargs) -> nn.Module:
    """Build registered model ``name``; the model remembers ``model_spec`` = {name, kwargs}."""
    if name not in registered():
        raise KeyError(f"unknown model {name!r}; registered: {', '.join(list_models())}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes={num_classes!r}: must be an integer >= 1")
    width = kwargs.get("width", 1.0)
    if not (isinstance(width, (int, float)) and math.isfinite(width) and width > 0):
        raise ValueError(f"width={width!r}: the channel multiplier must be > 0")
    model = _MODELS[name](num_classes=num_classes, **kwargs)
    model.model_spec = {"name": name, "kwargs": {"num_classes": num_classes, **kwargs}}
    return model

"""Float ResNet-18 / -34 baselines (torchvision), for the cost table and speed comparisons."""

from __future__ import annotations

from torch import nn

from ..registry import register_model
from .common import STEMS


def _resnet(name: str, num_classes: int, stem: str, width: float) -> nn.Module:
    # torchvision on first use: importing it costs every process ~165 MB (each Ray Train worker
    # imports bireal_core, and these baselines are for cost tables and benchmarks only)
    import torchvision

    if stem not in STEMS:
        raise ValueError(f"stem must be one of {STEMS}, got {stem!r}")
    if width != 1.0:
        raise ValueError("the float ResNet baselines have no width multiplier (width=1.0)")
    model = getattr(torchvision.models, name)(num_classes=num_classes)
    if stem == "small":  # 3x3/1 stem without maxpool for 32x32 inputs, as the Bi-Real small stem
        model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
    return model


@register_model
def resnet18(num_classes: int = 1000, stem: str = "imagenet", width: float = 1.0) -> nn.Module:
    return _resnet("resnet18", num_classes, stem, width)


@register_model
def resnet34(num_classes: int = 1000, stem: str = "imagenet", width: float = 1.0) -> nn.Module:
    return _resnet("resnet34", num_classes, stem, width)

"""Pieces shared by the model families: the conv factory, stems, head and the build options."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..binarizers import SIGN_ACTIVATIONS, TWIN_ACTIVATIONS, MagnitudeAwareSign, make_activation
from ..layers import BinaryConv2d

STEMS = ("imagenet", "small")


@dataclass(frozen=True)
class ConvSpec:
    """How every binary conv of a network is built.

    activation: the sign estimator (``approx_sign`` | ``ste_sign`` | ``identity_sign``) for the
        Bi-Real net, or ``relu`` | ``leaky_clip`` | ``clip`` for its real-valued twin.
    binary_weights: False keeps weights real (the twin, and step 1 of the two-step scheme).
    weight_gradient: ``paper`` | ``official`` | ``plain`` (see ``MagnitudeAwareSign``).
    pad_value: the border value of the binarized input (0 = official zero padding).
    """

    activation: str = "approx_sign"
    binary_weights: bool = True
    weight_gradient: str = "paper"
    pad_value: float = 0.0

    def __post_init__(self):
        if self.activation not in SIGN_ACTIVATIONS + TWIN_ACTIVATIONS:
            raise ValueError(
                f"activation must be one of {SIGN_ACTIVATIONS + TWIN_ACTIVATIONS}, got {self.activation!r}"
            )
        make_activation(self.activation)
        MagnitudeAwareSign(self.weight_gradient)  # validates the name

    def conv(self, c_in: int, c_out: int, kernel: int, stride: int = 1) -> BinaryConv2d:
        """A binary conv (or the twin's real conv) with 'same' padding."""
        return BinaryConv2d(
            c_in,
            c_out,
            kernel,
            stride=stride,
            padding=kernel // 2,
            bias=False,
            input_binarizer=make_activation(self.activation),
            weight_binarizer=MagnitudeAwareSign(self.weight_gradient) if self.binary_weights else None,
            pad_value=self.pad_value,
        )

    def as_kwargs(self) -> dict:
        return asdict(self)


def scaled(channels: int, width: float) -> int:
    """Channel count under a width multiplier (smoke runs use width 0.25 or less)."""
    return max(1, int(round(channels * width)))


def conv1x1(c_in: int, c_out: int) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 1, bias=False)


def make_stem(stem: str, c_out: int) -> nn.Sequential:
    """ImageNet: 7x7/2 conv -> BN -> 3x3/2 maxpool (224 -> 56; no ReLU, as in the official code).
    small: 3x3/1 conv -> BN for 32x32 inputs (no downsampling)."""
    if stem == "imagenet":
        return nn.Sequential(nn.Conv2d(3, c_out, 7, 2, 3, bias=False), nn.BatchNorm2d(c_out), nn.MaxPool2d(3, 2, 1))
    if stem == "small":
        return nn.Sequential(nn.Conv2d(3, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out))
    raise ValueError(f"stem must be one of {STEMS}, got {stem!r}")


def make_shortcut(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    """Real-valued downsampling shortcut: AvgPool 2x2/2 -> 1x1 conv -> BN (kept real everywhere)."""
    pool = nn.AvgPool2d(2, 2) if stride > 1 else nn.Identity()
    return nn.Sequential(pool, conv1x1(c_in, c_out), nn.BatchNorm2d(c_out))


def set_binary_weights(model: nn.Module, enabled: bool, weight_gradient: str = "paper") -> int:
    """Turn weight binarization of every binary conv on or off (the two-step scheme's switch).

    Returns how many convs changed; the model's ``model_spec`` is updated so checkpoints rebuild
    the model as it now is.
    """
    changed = 0
    for m in model.modules():
        if isinstance(m, BinaryConv2d):
            m.weight_binarizer = MagnitudeAwareSign(weight_gradient) if enabled else None
            m.kernel = None  # chosen for the old binarizers: cuda_ext.training.use_kernels again
            changed += 1
    spec = getattr(model, "model_spec", None)
    if spec is not None:
        spec["kwargs"].update(binary_weights=enabled, weight_gradient=weight_gradient)
    return changed


class BiRealBase(nn.Module):
    """Stem -> blocks -> global average pool -> FC. Subclasses define ``blocks`` and ``run_blocks``."""

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(x), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.run_blocks(self.stem(x)))


def binary_conv_bn_pairs(model: nn.Module) -> list[tuple[str, BinaryConv2d, nn.BatchNorm2d]]:
    """(name, conv, the BatchNorm right after it) for every binary conv of a Bi-Real net: the pairs
    whose alpha folds into BN (export) or is absorbed by BN (finetune)."""
    pairs = []
    for name, block in model.named_modules():
        for conv_attr, bn_attr in (("conv", "bn"), ("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")):
            conv, bn = getattr(block, conv_attr, None), getattr(block, bn_attr, None)
            if isinstance(conv, BinaryConv2d) and conv.is_binary and isinstance(bn, nn.BatchNorm2d):
                pairs.append((f"{name}.{conv_attr}", conv, bn))
    return pairs

"""Bi-Real Net, basic design (Bi-Real-18 / -34): one binary 3x3 conv per block.

    out = BN(BinaryConv3x3(sign(x))) + shortcut(x)

The real-valued x is carried around every binary conv by a parameter-free identity shortcut
(or, at a stage entry, by AvgPool 2x2/2 -> real 1x1 conv -> BN). No ReLU after the add. The
real-valued twin is the same network built with ``activation='relu'`` (or ``leaky_clip`` /
``clip``) and ``binary_weights=False``: same topology, same parameter names.
"""

from __future__ import annotations

import torch
from torch import nn

from ..registry import register_model
from .common import BiRealBase, ConvSpec, make_shortcut, make_stem, scaled

STAGE_CHANNELS = (64, 128, 256, 512)


class BiRealBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, spec: ConvSpec):
        super().__init__()
        self.conv = spec.conv(c_in, c_out, 3, stride)
        self.bn = nn.BatchNorm2d(c_out)
        needs_shortcut = stride != 1 or c_in != c_out
        self.downsample = make_shortcut(c_in, c_out, stride) if needs_shortcut else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.bn(self.conv(x)) + shortcut


class BiRealNet(BiRealBase):
    """Stem, four stages of ``block`` (the first of each later stage with stride 2), pool, FC.
    ``block``: BiRealBlock, or another block with its signature (the 1-bit ResNet baseline)."""

    def __init__(
        self,
        repeats: tuple[int, ...],
        num_classes: int = 1000,
        stem: str = "imagenet",
        width: float = 1.0,
        block: type[nn.Module] = BiRealBlock,
        **conv_kwargs,
    ):
        super().__init__()
        spec = ConvSpec(**conv_kwargs)
        channels = [scaled(c, width) for c in STAGE_CHANNELS]
        self.stem = make_stem(stem, channels[0])
        blocks, c_in = [], channels[0]
        for stage, (c_out, n) in enumerate(zip(channels, repeats)):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(block(c_in, c_out, stride, spec))
                c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)

    def run_blocks(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


@register_model
def bireal18(**kwargs) -> BiRealNet:
    return BiRealNet((4, 4, 4, 4), **kwargs)


@register_model
def bireal34(**kwargs) -> BiRealNet:
    return BiRealNet((6, 8, 12, 6), **kwargs)

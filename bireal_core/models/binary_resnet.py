"""The 1-bit ResNet the paper compares against: Bi-Real's network without its per-conv shortcut.

    h   = BN1(BinaryConv3x3(sign(x)))
    out = BN2(BinaryConv3x3(sign(h))) + shortcut(x)

The block has two binary convs and one shortcut, as in XNOR-Net / ResNet. The real-valued h between
the convs is binarized again before the second conv and is not carried past it. Everything else is
the same as in Bi-Real-18: stem, stage widths, stage-entry shortcut (AvgPool -> real 1x1 -> BN),
binarizers, padding and head. The paper attributes about 10 top-1 points at 18 layers to the extra
shortcut; the ablation trains this net with its own real-valued twin. A training baseline only:
the packed format holds Bi-Real nets.
"""

from __future__ import annotations

import torch
from torch import nn

from ..registry import register_model
from .bireal import BiRealNet
from .common import ConvSpec, make_shortcut


class BinaryResNetBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, spec: ConvSpec):
        super().__init__()
        self.conv1 = spec.conv(c_in, c_out, 3, stride)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = spec.conv(c_out, c_out, 3)
        self.bn2 = nn.BatchNorm2d(c_out)
        needs_shortcut = stride != 1 or c_in != c_out
        self.downsample = make_shortcut(c_in, c_out, stride) if needs_shortcut else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.bn2(self.conv2(self.bn1(self.conv1(x)))) + shortcut


@register_model
def binary_resnet18(**kwargs) -> BiRealNet:
    """Bi-Real-18's 16 binary convs in 8 two-conv blocks with one shortcut each."""
    return BiRealNet((2, 2, 2, 2), block=BinaryResNetBlock, **kwargs)

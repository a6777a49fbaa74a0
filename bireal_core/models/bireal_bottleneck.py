"""Bi-Real Net, bottleneck design (Bi-Real-50 / -101 / -152), after the authors' BiReal_50.

Every conv of the 1x1 -> 3x3 -> 1x1 bottleneck is binary and has its own shortcut, so a block
carries two real-valued streams: ``mid`` (the 1x1-reduce level, C/4 channels) and ``out`` (C):

    m1  = BN(conv1(sign(out_prev))) + mid_prev        # mid_prev adapted by a real 1x1 at stage entries
    m2  = BN(conv2(sign(m1)))  + AvgPool(m1)          # 3x3, stride s; AvgPool 2x2 only when s = 2
    out = BN(conv3(sign(m2)))  + shortcut(out_prev)   # shortcut: AvgPool -> real 1x1 -> BN at entries
    returns (m2, out)

The very first 1x1 conv of stage 1 is real-valued, reads LeakyClip(x), and has no shortcut.
Repeats: 50 = 3-4-6-3 (official); 101 = 3-4-23-3 and 152 = 3-8-36-3 follow ResNet.
"""

from __future__ import annotations

import torch
from torch import nn

from ..binarizers import LeakyClip
from ..registry import register_model
from .common import BiRealBase, ConvSpec, conv1x1, make_shortcut, make_stem, scaled

STAGE_CHANNELS = (256, 512, 1024, 2048)
EXPANSION = 4


class BiRealBottleneck(nn.Module):
    def __init__(
        self, c_in: int, c_out: int, stride: int, spec: ConvSpec, stage_entry: bool = False, first: bool = False
    ):
        super().__init__()
        mid, mid_in = max(1, c_out // EXPANSION), max(1, c_in // EXPANSION)
        self.first = first
        if first:
            self.clip = LeakyClip()
            self.conv1 = conv1x1(c_in, mid)  # the one real conv inside a block (official design)
        else:
            self.conv1 = spec.conv(c_in, mid, 1)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = spec.conv(mid, mid, 3, stride)
        self.bn2 = nn.BatchNorm2d(mid)
        self.mid_pool = nn.AvgPool2d(2, 2) if stride > 1 else None
        self.conv3 = spec.conv(mid, c_out, 1)
        self.bn3 = nn.BatchNorm2d(c_out)
        # Real 1x1 that adapts the previous block's mid stream at a stage entry (the authors'
        # `down_conv1x1`, registered here as they do, so the state dicts line up one to one).
        self.mid_adapt = conv1x1(mid_in, mid) if stage_entry and not first else None
        self.downsample = make_shortcut(c_in, c_out, stride) if stage_entry else None

    def forward(self, mid_prev: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.first:
            m1 = self.bn1(self.conv1(self.clip(x)))
        else:
            adapted = mid_prev if self.mid_adapt is None else self.mid_adapt(mid_prev)
            m1 = self.bn1(self.conv1(x)) + adapted
        m2 = self.bn2(self.conv2(m1)) + (m1 if self.mid_pool is None else self.mid_pool(m1))
        shortcut = x if self.downsample is None else self.downsample(x)
        return m2, self.bn3(self.conv3(m2)) + shortcut


class BiRealBottleneckNet(BiRealBase):
    def __init__(
        self,
        repeats: tuple[int, ...],
        num_classes: int = 1000,
        stem: str = "imagenet",
        width: float = 1.0,
        **conv_kwargs,
    ):
        super().__init__()
        spec = ConvSpec(**conv_kwargs)
        c_in = scaled(64, width)
        self.stem = make_stem(stem, c_in)
        blocks = []
        for stage, n in enumerate(repeats):
            c_out = scaled(STAGE_CHANNELS[stage], width)
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(
                    BiRealBottleneck(c_in, c_out, stride, spec, stage_entry=i == 0, first=stage == 0 and i == 0)
                )
                c_in = c_out
        self.blocks = nn.ModuleList(blocks)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)

    def run_blocks(self, x: torch.Tensor) -> torch.Tensor:
        mid = x  # unused by the first block, which has no mid shortcut
        for block in self.blocks:
            mid, x = block(mid, x)
        return x


@register_model
def bireal50(**kwargs) -> BiRealBottleneckNet:
    return BiRealBottleneckNet((3, 4, 6, 3), **kwargs)


@register_model
def bireal101(**kwargs) -> BiRealBottleneckNet:
    return BiRealBottleneckNet((3, 4, 23, 3), **kwargs)


@register_model
def bireal152(**kwargs) -> BiRealBottleneckNet:
    return BiRealBottleneckNet((3, 8, 36, 3), **kwargs)

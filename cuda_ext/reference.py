"""Pure-torch references of the bireal ops: slow, obviously correct, run anywhere.

Packed layout (format version 1, docs/packed_format.md): int64 words along channels, NHWC;
bit j (LSB = 0) of word k is the sign of channel 64k + j, 1 = +1 (x >= 0), 0 = -1; tail bits 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

WORD_BITS = 64


def words_for(channels: int) -> int:
    return (channels + WORD_BITS - 1) // WORD_BITS


def pack_signs_ref(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) real -> (N, H, W, ceil(C/64)) int64 sign bits."""
    n, c, h, w = x.shape
    cw = words_for(c)
    bits = (x >= 0).permute(0, 2, 3, 1).to(torch.int64)  # (N, H, W, C)
    bits = F.pad(bits, (0, cw * WORD_BITS - c)).reshape(n, h, w, cw, WORD_BITS)
    weights = torch.ones(WORD_BITS, dtype=torch.int64, device=x.device) << torch.arange(
        WORD_BITS, device=x.device
    )  # 2^j, j=63 wraps to -2^63
    return (bits * weights).sum(-1)  # distinct bits: sum == OR


def max_pool_signs_ref(
    x: torch.Tensor, kernel_size: int, stride: int, padding: int, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """max_pool2d of x (N, C, H, W) + bias (C,) and the packed signs of that: (out, pack_signs(out)).
    The bias is added first, to every value, as a conv's bias is (the kernels add it after the max)."""
    if bias is not None:
        x = x + bias.view(1, -1, 1, 1)
    out = F.max_pool2d(x, kernel_size, stride, padding)
    return out, pack_signs_ref(out)


def unpack_signs_ref(packed: torch.Tensor, channels: int) -> torch.Tensor:
    """(N, H, W, Cw) int64 -> (N, C, H, W) float +-1: the inverse of ``pack_signs_ref``."""
    shifts = torch.arange(WORD_BITS, device=packed.device)
    bits = (packed.unsqueeze(-1) >> shifts) & 1  # (N, H, W, Cw, 64)
    bits = bits.flatten(-2)[..., :channels]
    return (bits * 2 - 1).to(torch.float32).permute(0, 3, 1, 2).contiguous()


def pack_weight_ref(w: torch.Tensor) -> torch.Tensor:
    """(O, C, KH, KW) real -> (O, KH, KW, ceil(C/64)) int64, signs of the weights."""
    return pack_signs_ref(w)


def binary_conv2d_ref(
    packed_x: torch.Tensor,
    packed_w: torch.Tensor,
    in_channels: int,
    stride: int,
    padding: int,
    pad_value: float,
    scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    border_classes: torch.Tensor | None = None,
) -> torch.Tensor:
    """Unpack to +-1 floats, pad with ``pad_value``, convolve in float64 (exact for integers),
    then ``dot * scale + bias + residual`` in float32 in that order; ``out_dtype=torch.bfloat16``
    rounds that result once (to nearest even). ``border_classes`` (a kernel's shortcut for zero
    padding) is accepted as the ops accept it, and not needed here."""
    x = unpack_signs_ref(packed_x, in_channels).double()
    w = unpack_signs_ref(packed_w, in_channels).double()
    x = F.pad(x, (padding,) * 4, value=float(pad_value))
    out = F.conv2d(x, w, stride=stride).float()
    if scale is not None:
        out = out * scale.view(1, -1, 1, 1)
    if bias is not None:
        out = out + bias.view(1, -1, 1, 1)
    if residual is not None:
        out = out + residual.float()
    return out.to(out_dtype or torch.float32).contiguous(memory_format=torch.channels_last)


def binary_block_ref(
    packed_x: torch.Tensor,
    packed_w: torch.Tensor,
    in_channels: int,
    stride: int,
    padding: int,
    pad_value: float,
    scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    border_classes: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``binary_conv2d_ref`` and the packed signs of its output (``border_classes``: not needed)."""
    out = binary_conv2d_ref(
        packed_x, packed_w, in_channels, stride, padding, pad_value, scale, bias, residual, out_dtype
    )
    return out, pack_signs_ref(out)

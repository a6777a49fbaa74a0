"""The packed model's real-valued parts rewritten for a GPU: the same functions in shapes and kernel
counts that suit cuDNN and CUDA graphs better. ``PackedBiReal``'s switches (``space_to_depth_stem``,
``fuse_shortcuts``; off by default, timed by ``bireal bench model --device cuda``) apply them; each
equals the plain layer to float rounding (tests/test_packed.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def pools_then_mixes(shortcut: nn.Sequential) -> bool:
    """Whether ``shortcut`` is (AvgPool 2x2/2, 1x1 conv), the form ``fused_shortcut`` rewrites."""
    pool, conv = shortcut
    plain_pool = (
        isinstance(pool, nn.AvgPool2d)
        and {pool.kernel_size, pool.stride} <= {2, (2, 2)}
        and pool.padding in (0, (0, 0))
        and not pool.ceil_mode
        and pool.divisor_override is None
    )
    return plain_pool and conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.padding == (0, 0)


def fused_shortcut(shortcut: nn.Sequential) -> tuple[nn.Sequential, torch.Tensor]:
    """(AvgPool 2x2/2, 1x1 conv + bias) -> (one 2x2 stride-2 conv without bias, the bias (O,)).

    The same function: the mean of a 2x2 window, then a mix of its channels, is the mix of the
    window's four pixels, each weighted 1/4 (an exact scaling in float). One kernel reads x once
    instead of a pool writing a quarter-size copy for the conv to read back. The bias is returned for
    the block's epilogue to add (``PackedBiReal.fuse_shortcuts``): cuDNN adds a conv's bias in an
    elementwise kernel of its own. The sums run in another order, so the result differs from the
    two-step one by float rounding. Kept as a Sequential (Identity, conv): the conv stays
    ``downsample.1``."""
    _pool, conv = shortcut
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, 2, stride=2, bias=False)
    fused = fused.to(conv.weight.device, conv.weight.dtype, memory_format=torch.channels_last)
    with torch.no_grad():
        fused.weight.copy_(conv.weight.expand(-1, -1, 2, 2) / 4)  # (O, C, 1, 1) -> (O, C, 2, 2)
    return nn.Sequential(nn.Identity(), fused), conv.bias.detach().clone()


# The ImageNet stem conv as a space-to-depth conv (PackedBiReal.space_to_depth_stem): 7x7, stride 2,
# padding 3 on C channels == 4x4, stride 1, no padding, on the 2x2 blocks of the input padded by 4
# before and 2 after (2 and 1 blocks), each block's C x 2 x 2 values as channels, zero-padded to 16.
S2D_KERNEL, S2D_CHANNELS = 4, 16
S2D_PAD_BEFORE, S2D_PAD_AFTER = 2, 1  # in blocks of 2 x 2 pixels


def space_to_depth_conv(conv: nn.Conv2d) -> nn.Conv2d:
    """The 7x7/2 (padding 3) stem conv as the 4x4/1 conv over space-to-depth blocks
    (``space_to_depth_input``): the same products, summed in another order.

    With the input padded by 4 before (one more than the conv's 3), out[i] = sum over k' = 0..7 of
    w'[k'] x[2i + k' - 4] with w'[k'] = w[k' - 1] and w'[0] = 0; k' = 2q + r puts tap k' at offset q
    of the 4x4 kernel on channel (c, r) of the blocks: (O, C, 7, 7) -> (O, 16, 4, 4)."""
    o, c, kh, kw = conv.weight.shape
    if (kh, kw) != (7, 7) or conv.stride != (2, 2) or conv.padding != (3, 3) or 4 * c > S2D_CHANNELS:
        raise ValueError(
            f"space_to_depth_stem: needs the 7x7, stride 2, padding 3 stem conv on at most {S2D_CHANNELS // 4} "
            f"channels, got {kh}x{kw}, stride {conv.stride}, padding {conv.padding}, {c} channels"
        )
    shifted = F.pad(conv.weight, (1, 0, 1, 0))  # (O, C, 8, 8): w'[k'] = w[k' - 1]
    blocks = shifted.reshape(o, c, 4, 2, 4, 2).permute(0, 1, 3, 5, 2, 4).reshape(o, 4 * c, 4, 4)  # (O, (c,r,r'), q, q')
    s2d = nn.Conv2d(S2D_CHANNELS, o, S2D_KERNEL, bias=True).to(conv.weight.device, memory_format=torch.channels_last)
    with torch.no_grad():
        s2d.weight.copy_(F.pad(blocks, (0, 0, 0, 0, 0, S2D_CHANNELS - 4 * c)))
        s2d.bias.copy_(conv.bias)
    return s2d


def space_to_depth_input(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(N, C, H, W) images, H and W even -> (N, 16, H/2 + 3, W/2 + 3) in ``dtype``, channels_last:
    channel (c, r, r') of block (j, l) holds x[c, 2(j - 2) + r, 2(l - 2) + r'], zero outside the image
    and past channel 4C. Two kernels: the zeros, and one copy that casts and rearranges."""
    n, c, h, w = x.shape
    if h % 2 or w % 2:
        raise ValueError(f"space_to_depth_stem: the input's height and width must be even, got {h}x{w}")
    rows, cols = h // 2 + S2D_PAD_BEFORE + S2D_PAD_AFTER, w // 2 + S2D_PAD_BEFORE + S2D_PAD_AFTER
    z = x.new_zeros((n, rows, cols, S2D_CHANNELS), dtype=dtype)  # NHWC storage
    inside = z[:, S2D_PAD_BEFORE : S2D_PAD_BEFORE + h // 2, S2D_PAD_BEFORE : S2D_PAD_BEFORE + w // 2, : 4 * c]
    blocks = x.reshape(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)  # (N, H/2, W/2, C, 2, 2): a view
    # of an NCHW or channels_last x
    inside.unflatten(-1, (c, 2, 2)).copy_(blocks)
    return z.permute(0, 3, 1, 2)

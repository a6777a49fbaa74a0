"""Python face of the bireal ops: the loaded extension, fake kernels, and friendly wrappers.

Schemas live in csrc/ops.cpp (``TORCH_LIBRARY(bireal, ...)``); the CPU (csrc/binary_conv_cpu.cpp)
and CUDA (csrc/binary_conv_cuda.cu) implementations register separately. The fake kernels here let
``torch.compile`` and ``opcheck`` trace the ops.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch

from .reference import words_for

try:
    from . import _C  # noqa: F401  (registers torch.ops.bireal.*)
except ImportError as e:  # pragma: no cover - only on a broken install
    raise ImportError(
        f"cuda_ext._C is not built ({e}). Run `make install` (or `pip install --no-build-isolation "
        f"-e .`) with torch {torch.__version__} in this environment; the extension must be built "
        f"against the torch it runs with."
    ) from e


def cpu_paths() -> list[str]:
    """CPU code paths this CPU can run, fastest first (e.g. ['avx512', 'avx2', 'portable'])."""
    return list(_C.cpu_paths())


def cpu_path() -> str:
    return _C.cpu_path()


@contextlib.contextmanager
def _forced_path(get, set_, name: str) -> Iterator[None]:
    previous = get()
    set_(name)
    try:
        yield
    finally:
        set_(previous)


def forced_cpu_path(name: str) -> contextlib.AbstractContextManager[None]:
    """Run the enclosed ops on CPU code path ``name`` (tests use it to cover every path)."""
    return _forced_path(_C.cpu_path, _C.set_cpu_path, name)


def cuda_built() -> bool:
    """Whether this build of the extension has the CUDA kernels (torch with CUDA + nvcc at build)."""
    return bool(_C.cuda_built())


def cuda_paths() -> list[str]:
    """CUDA code paths: 'bmma' (1-bit tensor cores, the default), 'simt' (CUDA-core cross-check),
    'bmma_async' (operand tiles staged in shared memory by cp.async), 'bmma_lean' (bmma's main
    loop with an epilogue compiled for each option set; bmma runs what it does not instantiate),
    'bmma_lean1' (the same with one AND-popc MMA per k-step), 'bmma_split' (bmma_lean with the
    k-steps of a layer with few tiles split over a cluster of blocks, sm_90+: ``split_k_plan``),
    'bmma_halo' (that epilogue and one MMA, each block's input read once into a halo in shared
    memory; bmma_lean runs what does not fit), 'bmma_halo_w' (the same with the block's weights in
    shared memory too) and 'bmma_halo_p' (persistent blocks that copy the next tile's halo and
    residuals in while they compute one). The last seven are variants under test until a GPU run
    measures them."""
    return list(_C.cuda_paths())


def split_k_plan(blocks: int, steps: int, sms: int) -> tuple[int, int]:
    """How 'bmma_split' splits a conv: ``(splits, steps_per_split)`` for a grid of ``blocks`` tiles
    of 128 pixels x 64 channels, ``steps`` k-steps of 256 bits each (ceil(KH * KW * ceil(C / 64) /
    4)) and ``sms`` multiprocessors. splits is 1 (bmma_lean runs) where the tiles fill the device."""
    splits, steps_per_split = _C.split_k_plan(blocks, steps, sms)
    return int(splits), int(steps_per_split)


def forced_cuda_path(name: str) -> contextlib.AbstractContextManager[None]:
    """Run the enclosed CUDA ops on code path ``name`` (one of ``cuda_paths()``, or 'auto')."""
    return _forced_path(_C.cuda_path, _C.set_cuda_path, name)


SKIP_CUDA_PATHS_ENV = "BIREAL_SKIP_CUDA_PATHS"


def skipped_cuda_paths() -> set[str]:
    """The CUDA paths named in ``BIREAL_SKIP_CUDA_PATHS`` (a comma list): the GPU scripts set it for
    the steps after a path's kernel lost the CUDA context on the machine, so that the benchmarks,
    the smoke and the tests run every other path instead of dying on that one."""
    return set(filter(None, os.environ.get(SKIP_CUDA_PATHS_ENV, "").split(",")))


def kernel_paths(device: torch.device | str) -> list[str]:
    """The code paths of ``device``'s kind: ``cuda_paths()`` less ``skipped_cuda_paths()`` on a CUDA
    device, else ``cpu_paths()``."""
    if torch.device(device).type != "cuda":
        return cpu_paths()
    skipped = skipped_cuda_paths()
    return [path for path in cuda_paths() if path not in skipped]


def forced_kernel_path(device: torch.device | str, name: str) -> contextlib.AbstractContextManager[None]:
    """``forced_cuda_path(name)`` on a CUDA device, else ``forced_cpu_path(name)``."""
    return forced_cuda_path(name) if torch.device(device).type == "cuda" else forced_cpu_path(name)


def programmatic_launch(on: bool = True) -> contextlib.AbstractContextManager[None]:
    """Inside: the lean and halo CUDA kernels launch with programmatic dependent launch (sm_90 and
    newer; a no-op elsewhere): each may start while the kernel before it in the stream finishes, and
    waits for it before reading anything. Off by default until a GPU run measures it (the model
    table's ``tuned_pdl_bf16_ms``)."""
    return _forced_path(_C.programmatic_launch, _C.set_programmatic_launch, on)


def persistent_blocks(blocks: int) -> contextlib.AbstractContextManager[None]:
    """Inside: 'bmma_halo_p' launches at most ``blocks`` persistent blocks (0: as many as fit on the
    device at once, the default), so that on a small conv every block loops over many work items,
    prefetching each next one: how the tests and compute-sanitizer reach that loop."""
    return _forced_path(_C.persistent_blocks, _C.set_persistent_blocks, blocks)


def debug_fill() -> contextlib.AbstractContextManager[None]:
    """Inside: every op fills its outputs with 0xFF bytes before its kernels run (NaN floats, packed
    words with the tail bits set), so an element a kernel never writes can't pass a test unseen."""
    return _forced_path(_C.debug_fill, _C.set_debug_fill, True)  # restores the previous setting


@torch.library.register_fake("bireal::pack_signs")
def _pack_signs_fake(x: torch.Tensor) -> torch.Tensor:
    n, c, h, w = x.shape
    return x.new_empty((n, h, w, words_for(c)), dtype=torch.int64)


@torch.library.register_fake("bireal::binary_conv2d")
def _binary_conv2d_fake(
    packed_x,
    packed_w,
    in_channels,
    stride,
    padding,
    pad_value,
    scale=None,
    bias=None,
    residual=None,
    out_dtype=None,
    border_classes=None,
):
    n, h, w, _ = packed_x.shape
    o, kh, kw, _ = packed_w.shape
    ho, wo = (h + 2 * padding - kh) // stride + 1, (w + 2 * padding - kw) // stride + 1
    out = packed_x.new_empty((n, ho, wo, o), dtype=out_dtype or torch.float32)
    return out.permute(0, 3, 1, 2)


@torch.library.register_fake("bireal::binary_block")
def _binary_block_fake(*args, **kwargs):
    """binary_conv2d's output (same arguments) and its packed signs."""
    out = _binary_conv2d_fake(*args, **kwargs)
    n, o, ho, wo = out.shape
    return out, out.new_empty((n, ho, wo, words_for(o)), dtype=torch.int64)


@torch.library.register_fake("bireal::max_pool_signs")
def _max_pool_signs_fake(x, kernel_size, stride, padding, bias=None):
    n, c, h, w = x.shape
    ho, wo = (h + 2 * padding - kernel_size) // stride + 1, (w + 2 * padding - kernel_size) // stride + 1
    out = x.new_empty((n, ho, wo, c)).permute(0, 3, 1, 2)
    return out, x.new_empty((n, ho, wo, words_for(c)), dtype=torch.int64)


def pack_signs(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) real -> (N, H, W, ceil(C/64)) int64 sign bits (1 = +1, sign(0) = +1)."""
    return torch.ops.bireal.pack_signs(x)


def binary_conv2d(
    packed_x: torch.Tensor,
    packed_w: torch.Tensor,
    in_channels: int,
    stride: int = 1,
    padding: int = 1,
    pad_value: float = 0.0,
    scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    border_classes: torch.Tensor | None = None,
) -> torch.Tensor:
    """1-bit convolution of packed operands, with the fused epilogue
    ``out = dot * scale + bias + residual`` computed in float32: (N, O, Ho, Wo) in channels_last
    memory, float32 or (``out_dtype=torch.bfloat16``) rounded once to bfloat16. ``residual`` may be
    float32 or bfloat16. ``border_classes``: ``border_classes(packed_w, in_channels, padding)``,
    made once for weights that do not change; the bmma_lean and bmma_halo CUDA paths then do not
    make it per call, every other path ignores it."""
    return torch.ops.bireal.binary_conv2d(
        packed_x, packed_w, in_channels, stride, padding, float(pad_value), scale, bias, residual, out_dtype,
        border_classes,
    )  # fmt: skip


def binary_block(
    packed_x: torch.Tensor,
    packed_w: torch.Tensor,
    in_channels: int,
    stride: int = 1,
    padding: int = 1,
    pad_value: float = 0.0,
    scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    border_classes: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused Bi-Real block: ``binary_conv2d`` and the packed signs of its output (as stored, so
    of the bfloat16 value when ``out_dtype`` is bfloat16), for the next block's conv:
    ``(out, pack_signs(out))``. On CUDA one kernel writes both."""
    return torch.ops.bireal.binary_block(
        packed_x, packed_w, in_channels, stride, padding, float(pad_value), scale, bias, residual, out_dtype,
        border_classes,
    )  # fmt: skip


def border_classes(packed_w: torch.Tensor, in_channels: int, padding: int) -> torch.Tensor:
    """What zero padding adds to the dot products of an output pixel on the border, per border class
    and output channel: (P^4, O) int32, P = padding + 1. A pixel's class (a, b, c, d) counts its tap
    rows above and below the image and its tap columns left and right of it, each 0..padding,
    indexed ((a * P + b) * P + c) * P + d; the entry is the sum of the channel's +-1 weights over
    the taps outside (kh < a, kh >= KH - b, kw < c or kw >= KW - d). The lean epilogue adds one
    entry per output (docs/cuda.md); this makes the table once, in plain torch ops on any device,
    for weights that do not change (a packed model's), to pass to ``binary_conv2d`` /
    ``binary_block``."""
    o, kh, kw, cw = packed_w.shape
    if packed_w.dtype != torch.int64 or words_for(in_channels) != cw:
        raise ValueError(f"border_classes: packed_w must be int64 (O, KH, KW, {words_for(in_channels)}) for "
                         f"{in_channels} channels, got {packed_w.dtype} {tuple(packed_w.shape)}")  # fmt: skip
    sums = unpack_signs(packed_w, in_channels, torch.int64).sum(1)  # (O, KH, KW): each tap's sum of +-1 weights
    P = padding + 1
    cut = torch.arange(P, device=packed_w.device)
    rows, cols = torch.arange(kh, device=packed_w.device), torch.arange(kw, device=packed_w.device)
    out_rows = (rows < cut[:, None, None]) | (rows >= kh - cut[None, :, None])  # (a, b, KH)
    out_cols = (cols < cut[:, None, None]) | (cols >= kw - cut[None, :, None])  # (c, d, KW)
    outside = out_rows[:, :, None, None, :, None] | out_cols[None, None, :, :, None, :]  # (a, b, c, d, KH, KW)
    # (P^4, O): broadcast and summed, not einsum, which CUDA does not run on integers
    table = (outside.reshape(P**4, 1, kh, kw).to(torch.int64) * sums).sum((-2, -1))
    return table.to(torch.int32).contiguous()


def max_pool_signs(
    x: torch.Tensor, kernel_size: int = 3, stride: int = 2, padding: int = 1, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ImageNet stem's max-pool and the first binary conv's packed input in one pass:
    ``(max_pool2d(x + bias, kernel_size, stride, padding), pack_signs(of that))``, the output
    channels_last; ``bias`` (C,) in x's dtype, per channel, or None. One kernel reads x once and
    writes both (torch's channels_last max-pool also writes int64 indices, and a separate pack reads
    its output again). The bias is added after the max, to 1/4 of the values (the same result:
    rounding is monotonic), so the stem conv runs without its own bias pass (cuDNN adds a conv's bias
    in a separate kernel). Where its CUDA kernel lost the context on this machine
    (``skipped_cuda_paths``), the two-op route runs instead (``max_pool_then_pack``)."""
    if x.is_cuda and "max_pool_signs" in skipped_cuda_paths():
        return max_pool_then_pack(x, kernel_size, stride, padding, bias)
    return torch.ops.bireal.max_pool_signs(x, kernel_size, stride, padding, bias)


def max_pool_then_pack(
    x: torch.Tensor, kernel_size: int, stride: int, padding: int, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``max_pool_signs`` as two ops (torch's max-pool, the bias after the max, then ``pack_signs``):
    the same values and bits, in two passes over the pooled output."""
    out = torch.nn.functional.max_pool2d(x, kernel_size, stride, padding)
    if bias is not None:
        out = out + bias.view(1, -1, 1, 1)
    out = out.contiguous(memory_format=torch.channels_last)
    return out, pack_signs(out)


def unpack_signs(packed: torch.Tensor, channels: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(N, H, W, ceil(C/64)) int64 sign bits -> (N, C, H, W) +-1 in ``dtype``, channels_last memory:
    the inverse of ``pack_signs`` (``reference.unpack_signs_ref`` is the slow, obvious one).

    Plain torch ops, so one implementation serves every device and ``torch.compile``: each word is
    cut into its 8 bytes (byte b of word k holds channels 64k + 8b .. 64k + 8b + 7) and each byte
    looks its 8 signs up in a (256, 8) table."""
    if packed.dtype != torch.int64 or packed.dim() != 4:
        raise ValueError(
            f"unpack_signs: packed must be int64 (N, H, W, C/64), got {packed.dtype} {tuple(packed.shape)}"
        )
    if words_for(channels) != packed.shape[-1]:
        raise ValueError(f"unpack_signs: {channels} channels need {words_for(channels)} words, got {packed.shape[-1]}")
    n, h, w, cw = packed.shape
    bit = torch.arange(8, device=packed.device)
    table = (((torch.arange(256, device=packed.device)[:, None] >> bit) & 1) * 2 - 1).to(dtype)  # (256, 8)
    as_bytes = (packed.unsqueeze(-1) >> (8 * bit)) & 0xFF  # (N, H, W, Cw, 8); >> keeps the sign: & drops it
    signs = table[as_bytes].reshape(n, h, w, cw * 64)[..., :channels]  # (N, H, W, C)
    return signs.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)

"""Batched, device-agnostic augmentation on uint8 images: one implementation for every loader.

Each function takes a batch of uint8 images (B, 3, H, W) on any device (CPU tensors in CI, the GPU
in a GPU-resident loader) and draws its randomness from a ``torch.Generator`` on the CPU, so a
seed gives the same crops and flips on every device. The images stay uint8 until ``normalize``
(the last step), which does what ``ToTensor`` + ``Normalize`` do, in the same order, so its output
equals the PIL path's bit for bit (``tests/test_augment.py``).

- ``pad_crop_flip``: the CIFAR recipe (the ``small`` augment): reflect-pad by 4, a random crop of
  the original size, a horizontal flip with probability 1/2;
- ``lighting``: the official ImageNet recipe's PCA lighting, on uint8 with the clamp and the
  truncating cast of ``bireal_core.preprocess.Lighting``;
- ``normalize``: uint8 -> float32, (x / 255 - mean) / std;
- ``finish``: lighting (draws made by the loader's workers) then ``normalize``: what the streaming
  loader does after collation, on the device the batch trains on.
"""

from __future__ import annotations

import torch

from .preprocess import lighting_shift


def crop_offsets(batch: int, room: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Top and left offsets (B,) in [0, room] of each image's crop, from the CPU ``generator``."""
    top = torch.randint(0, room + 1, (batch,), generator=generator)
    left = torch.randint(0, room + 1, (batch,), generator=generator)
    return top, left


def reflect_index(size: int, padding: int) -> torch.Tensor:
    """Source index of each position of a reflect-padded axis: (size + 2 * padding,), e.g. for
    size 4, padding 2: [2, 1, 0, 1, 2, 3, 2, 1] (the edge is not repeated, as torch's reflect)."""
    if padding >= size:
        raise ValueError(f"reflect padding {padding} needs an axis longer than that, got {size}")
    index = torch.arange(-padding, size + padding).abs()  # reflect at 0
    return torch.where(index >= size, 2 * (size - 1) - index, index)  # and at size - 1


def crop_flip(
    images: torch.Tensor, top: torch.Tensor, left: torch.Tensor, flip: torch.Tensor, padding: int
) -> torch.Tensor:
    """uint8 (B, C, H, W) -> (B, C, H, W): image b cropped at (top[b], left[b]) from its reflect
    padding by ``padding``, mirrored where flip[b]. One gather: no padded copy is made."""
    b, _, h, w = images.shape
    device = images.device
    rows = reflect_index(h, padding)[top[:, None] + torch.arange(h)]  # (B, H) source rows
    cols = reflect_index(w, padding)[left[:, None] + torch.arange(w)]  # (B, W) source columns
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    rows, cols = rows.to(device), cols.to(device)
    batch = torch.arange(b, device=device)[:, None, None]
    out = images.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


def pad_crop_flip(images: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """The CIFAR recipe on a uint8 batch (B, C, H, W): a random crop of the reflect-padded image and
    a random horizontal flip per image."""
    top, left = crop_offsets(images.shape[0], 2 * padding, generator)
    flip = torch.rand(images.shape[0], generator=generator) < 0.5
    return crop_flip(images, top, left, flip, padding)


def lighting(images: torch.Tensor, std: float, generator: torch.Generator) -> torch.Tensor:
    """PCA lighting on uint8 (B, 3, H, W), as ``preprocess.Lighting`` does per image: each image gets
    eigvec @ (alpha * eigval), alpha ~ N(0, std) per channel, added to its 0-255 values, clamped to
    [0, 255] and cast back to uint8 (truncating: a draw moves a pixel by at most one step)."""
    if std == 0:
        return images
    return lighting_with(images, torch.randn(images.shape[0], 3, generator=generator) * std)


def lighting_with(images: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """``lighting`` with the draws given: alpha (B, 3)."""
    shift = lighting_shift(alpha).to(images.device)  # (B, 3)
    pixels = images.float() + shift[:, :, None, None]
    return pixels.clamp_(0, 255).to(torch.uint8)


def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32: ``ToTensor`` (x / 255) then ``Normalize`` ((x - mean) / std),
    the same operations in the same order, so equal bit for bit to the PIL path's tensors."""
    return _scale_and_normalize(images.float(), mean, std)


def _scale_and_normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """float32 x of whole values 0-255, in place: (x / 255 - mean) / std, in that order."""
    mean_t = torch.tensor(mean, dtype=torch.float32, device=x.device)[:, None, None]
    std_t = torch.tensor(std, dtype=torch.float32, device=x.device)[:, None, None]
    return x.div_(255).sub_(mean_t).div_(std_t)


def finish(images: torch.Tensor, mean, std, alpha: torch.Tensor | None = None) -> torch.Tensor:
    """What the uint8 loaders leave for after collation, on the images' device: PCA lighting with
    the draws the workers made (alpha (B, 3); None: no lighting), then ``normalize``. uint8 (B, 3, H,
    W) -> float32 (B, 3, H, W), equal bit for bit to ``preprocess.train_transform`` per image. One
    float buffer throughout: the truncation to whole values stands in for ``lighting_with``'s cast
    to uint8 and back (the clamped values are >= 0, where truncating is that cast)."""
    x = images.float()
    if alpha is not None:
        shift = lighting_shift(alpha).to(images.device)  # (B, 3)
        x.add_(shift[:, :, None, None]).clamp_(0, 255).trunc_()
    return _scale_and_normalize(x, mean, std)

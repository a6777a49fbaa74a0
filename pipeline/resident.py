"""The resident loader (``loader: resident``): a small data set decoded once into one uint8 tensor on
the training device, augmented there batch by batch.

CIFAR-10's 50,000 training images are 150 MB as uint8: held on the GPU they cost no decoding per
epoch, and the pad-4 crop and flip run there (``bireal_core.augment``, the same code the CPU runs in
the tests). The JPEG-shard loader decodes every image every epoch, which on a GPU machine bounds a
small net's epoch by the CPUs (docs/benchmarks.md). The shards, the manifest, the held-out split
and the rank split are the streaming loader's; only where the pixels live changes:
- training: each epoch one permutation of the split (seed, epoch), cut into equal contiguous parts
  per rank, each part into full batches (``drop_last``): every rank runs the same number of steps,
  each sample is used at most once, and ``left_out`` counts the rest;
- evaluation: rank r takes samples r, r + R, r + 2R, ...: every sample exactly once across ranks.
For images already at the model's input size (32x32 with the small stem): the ImageNet recipes
crop and resize whole JPEGs, which is the streaming loader's job.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from bireal_core.augment import lighting, normalize, pad_crop_flip

from .data import decoded_samples, epoch_seed_of, iter_shard_slice, split_shards
from .shard_read import shard_records

MAX_BYTES = 4 << 30  # a split larger than this as uint8 belongs to the streaming loader


@dataclass
class ResidentSplit:
    images: torch.Tensor  # (N, 3, H, W) uint8 on the training device
    labels: torch.Tensor  # (N,) int64 on the same device


def check_resident(input_config: dict, location: str) -> None:
    """The resident loader runs the small (CIFAR) recipe on images at the input size; anything else
    is refused before a byte is decoded."""
    if input_config.get("augment") != "small" or input_config["resize"] != input_config["size"]:
        raise ValueError(
            f"loader: resident runs the small recipe (pad-4 crop + flip) on images of the input size; "
            f"this stage's augment is {input_config.get('augment')!r} at {input_config['size']} px "
            f"(eval resize {input_config['resize']}): use loader: stream for {location}"
        )


def decode_split(
    location: str, manifest: dict, split: str, size: int, device: torch.device, holdout: int = 0
) -> ResidentSplit:
    """Every sample of ``split`` decoded once into (N, 3, size, size) uint8 on ``device``."""
    shards = split_shards(manifest, location, split, holdout)
    count = sum(n for _, n in shards)
    if count * 3 * size * size > MAX_BYTES:
        raise ValueError(
            f"loader: resident: {location} split {split!r} is {count:,} images of {size}x{size}, "
            f"{count * 3 * size * size / 2**30:.1f} GiB as uint8 (at most {MAX_BYTES / 2**30:.0f}): use loader: stream"
        )
    pixels = np.empty((count, size, size, 3), dtype=np.uint8)  # (N, H, W, C), as PIL gives them
    labels = np.empty(count, dtype=np.int64)
    records, i = shard_records(manifest, location), 0
    for url, _ in shards:  # a damaged sample is replaced by the next good one, as the streaming loader does
        for image, label, key in decoded_samples(iter_shard_slice(url, records)):
            image = np.asarray(image)
            if image.shape != (size, size, 3):
                raise ValueError(
                    f"loader: resident: {url} sample {key} is {image.shape[1]}x{image.shape[0]}, "
                    f"not the input size {size}x{size}: use loader: stream"
                )
            pixels[i], labels[i] = image, label
            i += 1
    if i != count:
        raise ValueError(f"loader: resident: {location} split {split!r} has {i} samples, the manifest says {count}")
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()  # (N, 3, H, W)
    return ResidentSplit(images.to(device), torch.from_numpy(labels).to(device))


def train_batches(
    data: ResidentSplit,
    input_config: dict,
    batch_size: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    epoch: int = 0,
    pca_lighting: bool = False,
) -> tuple[Iterator[tuple[torch.Tensor, torch.Tensor]], int, int]:
    """-> (batches of (float images (B, 3, H, W), labels (B,)), steps per rank, samples left out)."""
    n, epoch_seed = len(data.labels), epoch_seed_of(seed, epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(epoch_seed))
    per_rank = n // world_size
    steps = per_rank // batch_size
    mine = order[rank * per_rank : rank * per_rank + steps * batch_size].to(data.labels.device)
    # the augmentation's draws: per (seed, epoch, rank), on the CPU, so every device crops alike
    draws = torch.Generator().manual_seed(epoch_seed * 4099 + rank)

    def batches():
        for step in range(steps):
            index = mine[step * batch_size : (step + 1) * batch_size]
            images = pad_crop_flip(data.images[index], draws)
            if pca_lighting:
                images = lighting(images, 0.1, draws)
            yield normalize(images, input_config["mean"], input_config["std"]), data.labels[index]

    return batches(), steps, n - steps * batch_size * world_size


def eval_batches(
    data: ResidentSplit, input_config: dict, batch_size: int, *, rank: int = 0, world_size: int = 1
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's samples (r, r + R, ...) in batches, normalized, not augmented."""
    mine = torch.arange(rank, len(data.labels), world_size, device=data.labels.device)
    for start in range(0, len(mine), batch_size):
        index = mine[start : start + batch_size]
        yield normalize(data.images[index], input_config["mean"], input_config["std"]), data.labels[index]

"""Decoding the shards' images, in the loader's workers (``decode: worker``) or on the device the
batch trains on (``decode: device``).

- ``decode_image``: the workers' decode, a file's bytes -> RGB uint8 (3, H, W): libjpeg-turbo through
  torchvision, PIL for what it will not take; the workers then run ``bireal_core.augment.ImageRecipe``
  (crop, flip, lighting draws) and hand over uint8 crops. ``decode_rgb`` is the PIL decode of the
  float reference path.
- ``decode: device``: the workers hand over the JPEG bytes, one flat uint8 tensor per batch with
  their offsets (``collate_encoded``); ``decode_batch`` decodes the batch where it trains (nvJPEG
  through ``torchvision.io.decode_jpeg(..., device="cuda")``, in every torchvision wheel, so a loader
  process only reads shards; libjpeg-turbo elsewhere, which is how CI tests it) in one call, and
  where that fails image by image, then through PIL on the CPU (CMYK, a PNG stored as .jpg); an
  image nothing decodes is replaced by the batch's previous good one (logged with its key), so the
  batch keeps its size and every rank its steps, as on the worker path. ``DeviceRecipe`` runs the
  same ``ImageRecipe`` per image there, every draw from one CPU generator per (epoch seed, rank),
  then lighting and normalisation batched (``finish``).
An image too elongated to resize (``bireal_core.preprocess.too_elongated``: a 20000 x 1 strip in
shards made before the shard stage quarantined such images) counts as damaged on both paths.
Both paths crop, flip and light as the PIL reference (``bireal_core.preprocess``) does, resampled
by torch: within one level of 255 of its pixels, not equal bit for bit (``bireal_core/augment.py``).
"""

from __future__ import annotations

import io
import itertools
import logging
from typing import Iterator

import numpy as np
import torch

from bireal_core import augment
from bireal_core.preprocess import rgb_image, too_elongated

log = logging.getLogger(__name__)


def encoded_sample(data: bytes) -> torch.Tensor:
    """A JPEG file's bytes as a uint8 tensor (1-D), what a worker hands over per image."""
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def collate_encoded(samples: list[tuple]) -> tuple:
    """[(bytes (n_i,), label[, key])] -> ((flat bytes (sum n_i,), offsets (B + 1,)), labels (B,)[, keys]):
    one tensor per batch crosses from the worker instead of B."""
    data = [s[0] for s in samples]
    offsets = torch.tensor([0, *itertools.accumulate(len(d) for d in data)], dtype=torch.int64)
    labels = torch.tensor([s[1] for s in samples], dtype=torch.int64)
    keys = [tuple(s[2] for s in samples)] if len(samples[0]) > 2 else []  # as default_collate gives them
    return (torch.cat(data), offsets), labels, *keys


def split_encoded(flat: torch.Tensor, offsets: torch.Tensor) -> list[torch.Tensor]:
    """The batch's files as views of ``flat``."""
    bounds = offsets.tolist()
    return [flat[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def decode_image(data: bytes) -> torch.Tensor:
    """A shard's image file -> RGB uint8 (3, H, W) on the CPU: libjpeg-turbo through torchvision
    (about 30% faster than PIL's decode and convert on one core), PIL for what it will not take
    (CMYK, a PNG stored as .jpg); raises ``damaged_sample_errors()`` for bytes nothing decodes."""
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        image = decode_jpeg(encoded_sample(data), mode=ImageReadMode.RGB)
    except RuntimeError:
        pixels = np.asarray(decode_rgb(data))  # (H, W, 3); PIL's errors name a damaged file
        return torch.from_numpy(pixels.copy()).permute(2, 0, 1).contiguous()
    reason = too_elongated(image.shape[-1], image.shape[-2])  # image: (3, H, W)
    if reason:
        raise ValueError(reason)
    return image


def _resizable(image: torch.Tensor) -> bool:
    return not too_elongated(image.shape[-1], image.shape[-2])  # (3, H, W)


def decode_batch(files: list[torch.Tensor], device: torch.device, keys: list[str] | None = None) -> list[torch.Tensor]:
    """JPEG files (CPU uint8) -> RGB uint8 images (3, H_i, W_i) on ``device``: one batched decode, or
    image by image where that fails (see the module's docstring)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        images: list[torch.Tensor | None] = list(decode_jpeg(files, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:
        images = [_decode_one(f, device) for f in files]
    images = [image if image is not None and _resizable(image) else None for image in images]
    good = next((im for im in images if im is not None), None)
    if good is None:
        raise ValueError(f"none of the batch's {len(files)} images decodes (keys: {(keys or [])[:5]})")
    for i, image in enumerate(images):
        if image is None:
            log.warning(
                "damaged or too elongated image %s replaced by the batch's previous good one",
                keys[i] if keys else f"#{i}",
            )
            images[i] = good
        else:
            good = image
    return images


def _decode_one(data: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        pass
    try:  # what nvJPEG will not take, the workers' decode may (libjpeg, then PIL: CMYK, a PNG named .jpg)
        return decode_image(data.numpy().tobytes()).to(device)
    except damaged_sample_errors():
        return None


def damaged_sample_errors() -> tuple[type[BaseException], ...]:
    from PIL import Image

    # what PIL raises on bytes that are not a whole image (truncated, garbage, a bomb), and a
    # missing or non-integer label
    return (OSError, ValueError, SyntaxError, KeyError, EOFError, Image.DecompressionBombError)


def decode_rgb(data: bytes):
    """A file's bytes -> an RGB PIL image (what the worker path's transforms take)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        reason = too_elongated(*im.size)  # from the header, before decoding
        if reason:
            raise ValueError(reason)
        return rgb_image(im)[0]


class DeviceRecipe:
    """A stage's augmentation of a decoded batch (a list of uint8 (3, H_i, W_i) on one device) ->
    float32 (B, 3, S, S) finished: ``bireal_core.augment.ImageRecipe`` per image, every draw from
    ``generator`` (a CPU generator), then lighting and normalisation batched (``finish``)."""

    def __init__(self, input_config: dict, train: bool, pca_lighting: bool, generator: torch.Generator):
        self.config, self.lighting = input_config, train and pca_lighting
        self.per_image = augment.ImageRecipe(input_config, train, pca_lighting, generator)

    def __call__(self, images: list[torch.Tensor]) -> torch.Tensor:
        crops, alphas = zip(*(self.per_image(image) for image in images))
        alpha = torch.stack(alphas) if self.lighting else None
        return augment.finish(torch.stack(crops), self.config["mean"], self.config["std"], alpha)


def device_finished(batches: Iterator, recipe: DeviceRecipe, device: torch.device) -> Iterator[tuple]:
    """Collated ((flat bytes, offsets), labels, [keys]) -> (float32 images on ``device``, labels, [keys])."""
    for (flat, offsets), labels, *keys in batches:
        images = decode_batch(split_encoded(flat, offsets), device, keys[0] if keys else None)
        yield recipe(images), labels, *keys


def recipe_generator(epoch_seed: int, rank: int) -> torch.Generator:
    """The CPU generator of a rank's device-side draws in one epoch."""
    return torch.Generator().manual_seed(epoch_seed * 1_000 + rank)

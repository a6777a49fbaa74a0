"""Decoding the shards' images: ``decode_rgb`` (PIL, in the loader's workers), and the loader's
``decode: device`` path, where the workers hand over JPEG bytes and decode, crop, flip, lighting
and normalisation run batched on the device the batch trains on.

On a GPU the decode is nvJPEG through ``torchvision.io.decode_jpeg(..., device="cuda")`` (in every
torchvision wheel), so a loader process only reads shards and the CPU cost per image is the tar
parse; elsewhere the same code decodes on the CPU (libjpeg-turbo), which is how CI tests it. What
crosses from the workers is one flat uint8 tensor of the batch's JPEG files and their offsets.

- ``collate_encoded``: a worker's samples -> ((flat bytes, offsets (B + 1,)), labels, [keys]);
- ``decode_batch``: one batched decode; when it fails (a damaged or unusual file), each image again
  on its own, then on the CPU through PIL (CMYK, PNG-in-JPEG), and an image nothing decodes is
  replaced by the batch's previous good one (logged with its key), so the batch keeps its size and
  every rank its steps, as on the worker path;
- ``DeviceRecipe``: the stage's recipe (official RandomResizedCrop, Caffe resize + random crop,
  CIFAR pad-crop, evaluation resize + centre crop) on the decoded list, with every random draw
  from one CPU generator per (epoch seed, rank), then ``bireal_core.augment.finish``.
The recipes are those of the worker path (``bireal_core.preprocess``), resampled in torch rather
than PIL: the same augmentation, not the same pixels bit for bit (``bireal_core/augment.py``).
"""

from __future__ import annotations

import io
import itertools
import logging
from typing import Iterator

import torch

from bireal_core import augment

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


def decode_batch(files: list[torch.Tensor], device: torch.device, keys: list[str] | None = None) -> list[torch.Tensor]:
    """JPEG files (CPU uint8) -> RGB uint8 images (3, H_i, W_i) on ``device``: one batched decode, or
    image by image where that fails (see the module's docstring)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return list(decode_jpeg(files, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:
        pass
    images: list[torch.Tensor | None] = [_decode_one(f, device) for f in files]
    good = next((im for im in images if im is not None), None)
    if good is None:
        raise ValueError(f"none of the batch's {len(files)} images decodes (keys: {(keys or [])[:5]})")
    for i, image in enumerate(images):
        if image is None:
            log.warning("damaged image %s replaced by the batch's previous good one", keys[i] if keys else f"#{i}")
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
    try:  # what nvJPEG or libjpeg will not take, PIL may (CMYK, a PNG named .jpg)
        import numpy as np

        pixels = np.asarray(decode_rgb(data.numpy().tobytes()))  # (H, W, 3)
        return torch.from_numpy(pixels.copy()).permute(2, 0, 1).contiguous().to(device)
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
        return im.convert("RGB")


class DeviceRecipe:
    """A stage's augmentation on decoded images (a list of uint8 (3, H_i, W_i) on one device) ->
    float32 (B, 3, S, S) finished: the recipe ``input_config["augment"]`` names when training, the
    evaluation resize and centre crop otherwise. ``generator``: the CPU generator of every draw."""

    def __init__(self, input_config: dict, train: bool, pca_lighting: bool, generator: torch.Generator):
        self.config, self.train, self.generator = input_config, train, generator
        self.size, self.recipe = input_config["size"], input_config.get("augment", "imagenet")
        self.lighting_std = 0.1 if train and pca_lighting else 0.0

    def __call__(self, images: list[torch.Tensor]) -> torch.Tensor:
        crops = self._crops(images)  # uint8 (B, 3, S, S)
        alpha = None
        if self.train and self.recipe != "small":  # pad_crop_flip flips for itself
            crops = augment.flip_where(crops, torch.rand(len(images), generator=self.generator) < 0.5)
        if self.lighting_std:
            alpha = torch.randn(len(images), 3, generator=self.generator) * self.lighting_std
        return augment.finish(crops, self.config["mean"], self.config["std"], alpha)

    def _crops(self, images: list[torch.Tensor]) -> torch.Tensor:
        size, g = self.size, self.generator
        if not self.train:
            shown = [augment.resize_shorter(im, self.config["resize"]) for im in images]
            boxes = [augment.center_box(*im.shape[-2:], size) for im in shown]
            return torch.stack([augment.resized_crop(im, box, size) for im, box in zip(shown, boxes)])
        if self.recipe == "small":
            return augment.pad_crop_flip(torch.stack([augment.resize_to(im, size, size) for im in images]), g)
        if self.recipe == "caffe":
            shown = [augment.resize_shorter(im, self.config["resize"]) for im in images]
            boxes = augment.random_crop_boxes([tuple(im.shape[-2:]) for im in shown], size, g)
            return torch.stack([augment.resized_crop(im, box, size) for im, box in zip(shown, boxes)])
        boxes = augment.random_resized_boxes([tuple(im.shape[-2:]) for im in images], g)
        return torch.stack([augment.resized_crop(im, box, size) for im, box in zip(images, boxes)])


def device_finished(batches: Iterator, recipe: DeviceRecipe, device: torch.device) -> Iterator[tuple]:
    """Collated ((flat bytes, offsets), labels, [keys]) -> (float32 images on ``device``, labels, [keys])."""
    for (flat, offsets), labels, *keys in batches:
        images = decode_batch(split_encoded(flat, offsets), device, keys[0] if keys else None)
        yield recipe(images), labels, *keys


def recipe_generator(epoch_seed: int, rank: int) -> torch.Generator:
    """The CPU generator of a rank's device-side draws in one epoch."""
    return torch.Generator().manual_seed(epoch_seed * 1_000 + rank)

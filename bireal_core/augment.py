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
None of them waits for the GPU: the CPU-side draws and constants go over with non-blocking copies
(``to_device``), so preparing a batch never stalls the host behind the step before it.

For one decoded image (uint8 (3, H, W), any size), ``ImageRecipe`` is a stage's whole per-image
part: the crop of its recipe, the flip, and the lighting draws, with torchvision's draws in its
order. The loader's workers run it on the CPU, and the ``decode: device`` path runs it per image on
the GPU. Its pieces:
- ``random_resized_boxes`` + ``resized_crop``: RandomResizedCrop (scale 0.08-1, ratio 3/4-4/3, the
  official ImageNet recipe: torchvision's boxes at a seed, 10 tries then the centre);
- ``resize_shorter`` + ``random_crop_boxes`` / ``center_box``: the Caffe recipe's resize-256 and
  random 224 crop, and evaluation's centre crop; ``pad_crop``: CIFAR's pad-4 crop of one image;
- ``flip_where``: the horizontal flips of a batch.
Resizing is bilinear with antialiasing: torch's uint8 kernel on a CPU, float rounded back to uint8
elsewhere. PIL's bilinear differs from it by a level of 255 at under 1% of the pixels, so these
give the recipe's crops, flips and draws, not the PIL path's pixels bit for bit.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .preprocess import lighting_shift, shorter_side_resized


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small CPU tensor (draws, indices, constants) on ``device`` without a host sync: a copy from
    pageable memory that does not block (CUDA stages it at once), so the host can prepare the next
    batch while the GPU still runs the last step."""
    return t.to(device, non_blocking=True)


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
    rows, cols = to_device(rows, device), to_device(cols, device)
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
    shift = to_device(lighting_shift(alpha), images.device)  # (B, 3)
    pixels = images.float() + shift[:, :, None, None]
    return pixels.clamp_(0, 255).to(torch.uint8)


def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32: ``ToTensor`` (x / 255) then ``Normalize`` ((x - mean) / std),
    the same operations in the same order, so equal bit for bit to the PIL path's tensors."""
    return _scale_and_normalize(images.float(), mean, std)


def _scale_and_normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """float32 x of whole values 0-255, in place: (x / 255 - mean) / std, in that order."""
    mean_t = to_device(torch.tensor(mean, dtype=torch.float32), x.device)[:, None, None]
    std_t = to_device(torch.tensor(std, dtype=torch.float32), x.device)[:, None, None]
    return x.div_(255).sub_(mean_t).div_(std_t)


def finish(images: torch.Tensor, mean, std, alpha: torch.Tensor | None = None) -> torch.Tensor:
    """What the uint8 loaders leave for after collation, on the images' device: PCA lighting with
    the draws the workers made (alpha (B, 3); None: no lighting), then ``normalize``. uint8 (B, 3, H,
    W) -> float32 (B, 3, H, W), equal bit for bit to ``preprocess.train_transform``'s Lighting,
    ToTensor and Normalize of the same uint8 crops. One float buffer throughout: the truncation to
    whole values stands in for ``lighting_with``'s cast to uint8 and back (the clamped values are
    >= 0, where truncating is that cast)."""
    x = images.float()
    if alpha is not None:
        shift = to_device(lighting_shift(alpha), images.device)  # (B, 3)
        x.add_(shift[:, :, None, None]).clamp_(0, 255).trunc_()
    return _scale_and_normalize(x, mean, std)


Box = tuple[int, int, int, int]  # (top, left, height, width) of a crop


def random_resized_boxes(
    sizes: list[tuple[int, int]],
    generator: torch.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> list[Box]:
    """RandomResizedCrop's box for each image of (height, width) ``sizes``: an area fraction uniform
    in ``scale`` and a log-uniform aspect ratio in ``ratio``, 10 tries to fit the image, else the
    largest centred box within the ratio range."""
    log_lo, log_hi = torch.log(torch.tensor(ratio)).tolist()  # float32 bounds, as torchvision draws them
    boxes = []
    for height, width in sizes:
        boxes.append(_centre_fallback(height, width, ratio))
        for _ in range(10):
            area = height * width * _uniform(scale[0], scale[1], generator)
            aspect = math.exp(_uniform(log_lo, log_hi, generator))
            w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
                left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
                boxes[-1] = (top, left, h, w)
                break
    return boxes


def _uniform(lo: float, hi: float, generator: torch.Generator) -> float:
    return float(torch.empty(1).uniform_(lo, hi, generator=generator))


def _centre_fallback(height: int, width: int, ratio: tuple[float, float]) -> Box:
    shape = width / height
    if shape < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif shape > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def random_crop_boxes(sizes: list[tuple[int, int]], size: int, generator: torch.Generator) -> list[Box]:
    """A uniformly placed ``size`` x ``size`` box in each image (each at least that large)."""
    boxes = []
    for height, width in sizes:
        if height < size or width < size:
            raise ValueError(f"a random {size}x{size} crop needs an image at least that large, got {height}x{width}")
        if (height, width) == (size, size):  # nothing to draw (torchvision draws nothing either)
            boxes.append((0, 0, size, size))
            continue
        top = int(torch.randint(0, height - size + 1, (1,), generator=generator))
        left = int(torch.randint(0, width - size + 1, (1,), generator=generator))
        boxes.append((top, left, size, size))
    return boxes


def center_box(height: int, width: int, size: int) -> Box:
    """The centred ``size`` x ``size`` box (torchvision's CenterCrop rounding)."""
    return round((height - size) / 2), round((width - size) / 2), size, size


def resize_to(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 (C, H, W) -> uint8 (C, height, width): bilinear with antialiasing. On a CPU torch's
    uint8 kernel (channels_last: about 4x PIL's resize on one core); elsewhere in float, rounded."""
    if image.shape[-2:] == (height, width):
        return image
    if image.device.type == "cpu":
        x = image[None].contiguous(memory_format=torch.channels_last)
        return F.interpolate(x, (height, width), mode="bilinear", antialias=True, align_corners=False)[0]
    x = F.interpolate(image[None].float(), (height, width), mode="bilinear", antialias=True, align_corners=False)
    return x[0].round_().clamp_(0, 255).to(torch.uint8)


def resize_shorter(image: torch.Tensor, side: int) -> torch.Tensor:
    """uint8 (C, H, W) with its shorter side resized to ``side`` (torchvision's Resize(int) sizes)."""
    return resize_to(image, *shorter_side_resized(*image.shape[-2:], side))


def resized_crop(image: torch.Tensor, box: Box, size: int) -> torch.Tensor:
    """uint8 (C, H, W): ``box`` cut out and resized to ``size`` x ``size``."""
    top, left, h, w = box
    return resize_to(image[:, top : top + h, left : left + w], size, size)


def flip_where(images: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) with the images where ``flips`` (B,) bool is set mirrored left-right."""
    flips = to_device(flips, images.device)[:, None, None, None]
    return torch.where(flips, images.flip(-1), images)


def pad_crop(image: torch.Tensor, top: int, left: int, size: int, padding: int) -> torch.Tensor:
    """uint8 (C, H, W) -> (C, size, size): the box at (top, left) of the image reflect-padded by
    ``padding`` (one gather, no padded copy)."""
    h, w = image.shape[-2:]
    rows = to_device(reflect_index(h, padding)[top : top + size], image.device)
    cols = to_device(reflect_index(w, padding)[left : left + size], image.device)
    return image[:, rows[:, None], cols[None, :]]


class ImageRecipe:
    """A stage's augmentation of one decoded image in torch: uint8 (3, H, W) -> (uint8 crop (3, S, S),
    lighting draws alpha (3,) float32; zeros without lighting), lighting and normalisation left to
    ``finish`` after collation. The loader's workers run it on the CPU (``decode: worker``) and the
    device path per image on the GPU (``decode: device``).

    The draws are torchvision's, in its order, from ``generator`` (None: the process's default
    generator, as in a DataLoader worker): the crop's (RandomResizedCrop's area and ratio then
    position; Caffe's and CIFAR's RandomCrop positions), the flip's ``rand(1) < 0.5``, then
    ``Lighting``'s ``randn(3) * 0.1``. So at a seed a worker crops, flips and lights exactly as the
    PIL reference (``preprocess.train_transform``) does; the resampling is torch's antialiased
    bilinear, within one level of 255 of PIL's (tests/test_data.py)."""

    def __init__(self, input_config: dict, train: bool, pca_lighting: bool = False, generator=None):
        self.size, self.resize = input_config["size"], input_config["resize"]
        self.augment = input_config.get("augment", "imagenet" if self.size > 64 else "small")
        self.train, self.generator = train, generator
        self.lighting_std = 0.1 if train and pca_lighting else 0.0

    def __call__(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.train:  # Resize(resize) + CenterCrop(size)
            shown = resize_shorter(image, self.resize)
            return resized_crop(shown, center_box(*shown.shape[-2:], self.size), self.size), torch.zeros(3)
        crop = self._crop(image)
        if torch.rand(1, generator=self.generator) < 0.5:
            crop = crop.flip(-1)
        if not self.lighting_std:
            return crop, torch.zeros(3)
        return crop, torch.randn(3, generator=self.generator) * self.lighting_std

    def _crop(self, image: torch.Tensor) -> torch.Tensor:
        size, g = self.size, self.generator
        if self.augment == "small":  # RandomCrop(size, padding=4, reflect): positions in the padded image
            h, w = image.shape[-2:]
            if h + 8 < size or w + 8 < size:
                raise ValueError(f"a {size}x{size} crop of a {h}x{w} image padded by 4: the image is too small")
            if (h + 8, w + 8) == (size, size):  # nothing to draw (torchvision draws nothing either)
                return pad_crop(image, 0, 0, size, 4)
            top = int(torch.randint(0, h + 8 - size + 1, (1,), generator=g))
            left = int(torch.randint(0, w + 8 - size + 1, (1,), generator=g))
            return pad_crop(image, top, left, size, 4)
        if self.augment == "caffe":  # Resize(resize) + RandomCrop(size)
            shown = resize_shorter(image, self.resize)
            (box,) = random_crop_boxes([tuple(shown.shape[-2:])], size, g)
            return resized_crop(shown, box, size)
        (box,) = random_resized_boxes([tuple(image.shape[-2:])], g)
        return resized_crop(image, box, size)

"""Input geometry and normalisation of a model, by stem: the one place these numbers live.

The data loaders, the exported artifact and ``bireal predict`` all read them from here (or from
the copy a checkpoint / artifact carries), never from a second hard-coded table.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# CIFAR-10 training-set statistics; used for every 32x32 data set (the demo data included).
SMALL_MEAN = (0.4914, 0.4822, 0.4465)
SMALL_STD = (0.2470, 0.2435, 0.2616)
# the training recipes an input config's ``augment`` names (see ``train_crop_flip``)
AUGMENTS = ("imagenet", "caffe", "small")


def default_input_config(stem: str) -> dict:
    """{"size": crop side, "resize": eval resize of the shorter side, "mean", "std",
    "augment": the training recipe, "imagenet" or "small"}."""
    if stem == "imagenet":
        return {
            "size": 224,
            "resize": 256,
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
            "augment": "imagenet",
        }
    if stem == "small":
        return {"size": 32, "resize": 32, "mean": list(SMALL_MEAN), "std": list(SMALL_STD), "augment": "small"}
    raise ValueError(f"stem must be 'imagenet' or 'small', got {stem!r}")


def shorter_side_resized(height: int, width: int, side: int) -> tuple[int, int]:
    """(height, width) once the shorter side is resized to ``side``: torchvision's ``Resize(int)``
    sizes (the longer side scaled and truncated), as ``eval_transform`` and the Caffe recipe resize."""
    if height <= width:
        return side, int(side * width / height)
    return int(side * height / width), side


# The most pixels an image may have as it is, or once its shorter side is resized for a model: a
# 97-byte 20000 x 1 PNG resized to 256 is 5,120,000 x 256 RGB (8.7 GB peak in an evaluation loader,
# 6 GB in `bireal predict`). 40 MP (e.g. 8000 x 5000) is 120 MB of RGB.
MAX_PIXELS = 40_000_000


def resize_overflow(width: int, height: int, side: int) -> str:
    """'' if a width x height image stays within ``MAX_PIXELS`` with its shorter side resized to
    ``side``, else what it would become ("20000 x 1 would be 5120000 x 256 = 1,310,720,000 pixels
    with its shorter side resized to 256, over the 40,000,000"), for the caller to finish."""
    h, w = shorter_side_resized(height, width, side)
    if w * h <= MAX_PIXELS:
        return ""
    return (
        f"{width} x {height} would be {w} x {h} = {w * h:,} pixels with its shorter side resized to {side}, "
        f"over the {MAX_PIXELS:,}"
    )


# the longest shorter side any stem's recipe resizes to (256): the bound for images not yet tied to a stem
LONGEST_RESIZE = max(default_input_config(stem)["resize"] for stem in ("imagenet", "small"))


def too_elongated(width: int, height: int) -> str:
    """'' or why no recipe should resize a width x height image: with its shorter side at
    ``LONGEST_RESIZE`` it would be over ``MAX_PIXELS``, as a 20000 x 1 strip is (5,120,000 x 256).
    The shard stage quarantines such images; the loaders replace any that older shards hold, as
    they replace a damaged one. Called per image by the loaders: arithmetic only."""
    overflow = resize_overflow(width, height, LONGEST_RESIZE)
    return f"too elongated: {overflow} the loaders allow" if overflow else ""


# PIL's modes of more than 8 bits per pixel: 16-bit integers (PNG, TIFF), 32-bit integers and floats
WIDE_MODES = ("I;16", "I;16B", "I;16L", "I", "F")


def rgb_image(im: "Image.Image") -> tuple["Image.Image", list[str]]:
    """Any PIL image -> (8-bit RGB image, the conversions made), the one conversion of the shard
    stage (what a model trains and is evaluated on) and of ``bireal predict`` (what it is asked):
    16-bit integers are divided by 257 (65535 -> 255); 32-bit integers and floats are scaled by
    255 / their maximum (at least 1: floats in [0, 1] become 0..255). Not PIL's ``convert("RGB")``
    alone: it clips a 16-bit image at 255, almost all white."""
    import numpy as np
    from PIL import Image

    notes = []
    if im.mode in WIDE_MODES:
        sixteen_bit = im.mode.startswith("I;16")
        pixels = np.nan_to_num(np.asarray(im, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)  # (H, W)
        scale = 1 / 257.0 if sixteen_bit else 255.0 / max(float(pixels.max(initial=0.0)), 1.0)
        notes.append(("16-bit" if sixteen_bit else "32-bit") + " to 8-bit")
        im = Image.fromarray(np.clip(np.rint(pixels * scale), 0, 255).astype(np.uint8))
    if im.mode != "RGB":
        notes.append(f"{im.mode} to RGB")
    return im.convert("RGB"), notes  # a copy even of an RGB image: loaded, its file free to close


def eval_transform(input_config: dict):
    """PIL image -> normalised float tensor (3, size, size): resize the shorter side to
    ``resize``, center-crop ``size`` (for 32x32 data sets both are 32: the image as is)."""
    from torchvision import transforms as T

    return T.Compose(
        [
            T.Resize(input_config["resize"], interpolation=T.InterpolationMode.BILINEAR, antialias=True),
            T.CenterCrop(input_config["size"]),
            T.ToTensor(),
            T.Normalize(input_config["mean"], input_config["std"]),
        ]
    )


MAX_SIDE = 4096  # the largest crop or eval resize an artifact may declare (224 and 256 for ImageNet)


def input_config_problem(config: object, channels: int = 3) -> str:
    """'' or what makes an input config read from a file (an artifact's header, a checkpoint's
    config) unusable by ``eval_transform`` and the loaders, named by key: "input.std=[0.2, 0.0,
    0.2]: 3 numbers > 0 (one per image channel)". A mean of one number would broadcast over the
    channels and a zero std divides by zero: both silently change every prediction."""
    if not isinstance(config, dict):
        return f"input={config!r}: a mapping with size, resize, mean and std"
    for key in ("size", "resize"):
        side = config.get(key)
        if isinstance(side, bool) or not isinstance(side, int) or not 1 <= side <= MAX_SIDE:
            return f"input.{key}={side!r}: an integer side in 1..{MAX_SIDE}"
    if config["size"] > config["resize"]:
        return (
            f"input.size={config['size']} is larger than input.resize={config['resize']}: "
            "the center crop would pad every image"
        )
    for key, rule, ok in (("mean", "finite numbers", lambda v: True), ("std", "numbers > 0", lambda v: v > 0)):
        values = config.get(key)
        numbers = isinstance(values, list) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values
        )
        if not numbers or len(values) != channels or not all(ok(v) for v in values):
            return f"input.{key}={values!r}: {channels} {rule} (one per image channel)"
    augment = config.get("augment", AUGMENTS[0])
    if augment not in AUGMENTS:
        return f"input.augment={augment!r}: one of {', '.join(AUGMENTS)}"
    return ""


# PCA lighting noise of the official ImageNet recipe (AlexNet-style), eigen-decomposition of the
# ImageNet RGB covariance.
_EIGVAL = (0.2175, 0.0188, 0.0045)
_EIGVEC = ((-0.5675, 0.7192, 0.4009), (-0.5808, -0.0045, -0.8140), (-0.5836, -0.6948, 0.4203))


class Lighting:
    """PCA lighting noise as the official PyTorch recipe applies it: to the uint8 PIL image, before
    ToTensor. It adds ``eigvec @ (alpha * eigval)``, with alpha ~ N(0, std) per image and ImageNet's
    eigenvalues on the [0, 1] scale, to 0-255 values, then casts back to uint8. The cast truncates,
    so a draw changes a pixel by at most one step of 1/255. The same noise added to a [0, 1] tensor
    (this project's earlier version) was about 3x stronger."""

    def __init__(self, std: float = 0.1):
        self.std = std

    def __call__(self, img):
        import torch

        if self.std == 0:
            return img
        return self.apply(img, torch.randn(3) * self.std)

    @staticmethod
    def apply(img, alpha):
        """``img`` with the shift of one draw ``alpha`` (3,) added, clamped and truncated to uint8."""
        import numpy as np
        from PIL import Image

        inc = lighting_shift(alpha[None])[0].numpy()  # (3,)
        pixels = np.asarray(img.convert("RGB"), dtype=np.float32) + inc  # (H, W, 3)
        return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def lighting_shift(alpha):
    """The RGB shift eigvec @ (alpha * eigval) of draws ``alpha`` (B, 3) -> (B, 3), float32 on the
    CPU: the one computation behind the PIL path (``Lighting``) and the batched one
    (``bireal_core.augment.lighting``), so both add exactly the same values."""
    import torch

    eigvec = torch.tensor(_EIGVEC, dtype=torch.float32)  # (3, 3): columns are the eigenvectors
    eigval = torch.tensor(_EIGVAL, dtype=torch.float32)
    return (alpha.float() * eigval) @ eigvec.T


def train_crop_flip(input_config: dict) -> list:
    """The geometric part of the training augmentation named by the input config's ``augment``
    (PIL image -> PIL image; ``augment.ImageRecipe`` makes the same draws on tensors):

    - ``imagenet``: RandomResizedCrop(size, scale 0.08-1) + flip: the official PyTorch recipe;
    - ``caffe``: shorter side resized to ``resize`` (256), a random ``size`` (224) crop, mirror: the
      paper's Caffe training data layer;
    - ``small``: pad-4 random crop + flip, the standard CIFAR recipe for 32x32-class inputs."""
    from torchvision import transforms as T

    size = input_config["size"]
    augment = input_config.get("augment", "imagenet" if size > 64 else "small")
    if augment not in AUGMENTS:
        raise ValueError(f"augment must be one of {AUGMENTS}, got {augment!r}")
    if augment == "small":
        crop = [T.RandomCrop(size, padding=4, padding_mode="reflect")]
    elif augment == "caffe":
        crop = [
            T.Resize(input_config["resize"], interpolation=T.InterpolationMode.BILINEAR, antialias=True),
            T.RandomCrop(size),
        ]
    else:
        crop = [T.RandomResizedCrop(size, scale=(0.08, 1.0), antialias=True)]
    return [*crop, T.RandomHorizontalFlip()]


def train_transform(input_config: dict, pca_lighting: bool = False):
    """PIL image -> normalised float tensor (3, size, size): ``train_crop_flip``, then the official
    recipe's PCA lighting on the uint8 image (``pca_lighting``), ToTensor and Normalize. The loaders
    run ``bireal_core.augment.ImageRecipe`` instead (the same draws, torch's resampling) and finish
    after collation; this is their reference."""
    from torchvision import transforms as T

    lighting = [Lighting(0.1)] if pca_lighting else []  # on the uint8 image
    return T.Compose(
        [
            *train_crop_flip(input_config),
            *lighting,
            T.ToTensor(),
            T.Normalize(input_config["mean"], input_config["std"]),
        ]
    )

"""Input geometry and normalisation of a model, by stem: the one place these numbers live.

The data loaders, the exported artifact and ``bireal predict`` all read them from here (or from
the copy a checkpoint / artifact carries), never from a second hard-coded table.
"""
from __future__ import annotations

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# CIFAR-10 training-set statistics; used for every 32x32 data set (the demo data included).
SMALL_MEAN = (0.4914, 0.4822, 0.4465)
SMALL_STD = (0.2470, 0.2435, 0.2616)


def default_input_config(stem: str) -> dict:
    """{"size": crop side, "resize": eval resize of the shorter side, "mean", "std"}."""
    if stem == "imagenet":
        return {"size": 224, "resize": 256, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    if stem == "small":
        return {"size": 32, "resize": 32, "mean": list(SMALL_MEAN), "std": list(SMALL_STD)}
    raise ValueError(f"stem must be 'imagenet' or 'small', got {stem!r}")


def eval_transform(input_config: dict):
    """PIL image -> normalised float tensor (3, size, size): resize the shorter side to
    ``resize``, center-crop ``size`` (for 32x32 data sets both are 32: the image as is)."""
    from torchvision import transforms as T

    return T.Compose([
        T.Resize(input_config["resize"], interpolation=T.InterpolationMode.BILINEAR, antialias=True),
        T.CenterCrop(input_config["size"]),
        T.ToTensor(),
        T.Normalize(input_config["mean"], input_config["std"]),
    ])

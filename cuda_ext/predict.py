"""``bireal predict``: class ids, names and scores of image files under a packed artifact."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from bireal_core.preprocess import eval_transform

from .packed import load_packed


class ImageError(ValueError):
    """An input image that cannot be read (the message names the file)."""


def load_images(paths: list[str | os.PathLike], input_config: dict) -> torch.Tensor:
    """Read and preprocess every image first, so a bad file fails before any model work."""
    from PIL import Image, UnidentifiedImageError

    transform = eval_transform(input_config)
    batch = []
    for p in paths:
        try:
            with Image.open(p) as im:
                batch.append(transform(im.convert("RGB")))
        except (FileNotFoundError, UnidentifiedImageError, OSError) as e:
            raise ImageError(f"{p}: cannot read image ({e.__class__.__name__}: {e})") from e
    return torch.stack(batch)


def predict_files(artifact: str | os.PathLike, paths: list[str | os.PathLike], topk: int = 1) -> list[dict]:
    model, header = load_packed(artifact)
    x = load_images(paths, header["input"])
    with torch.inference_mode():
        probs = model(x).softmax(dim=1)
    scores, ids = probs.topk(min(topk, probs.shape[1]), dim=1)
    names = header["class_names"]
    return [
        {
            "path": str(p),
            "top": [{"class_id": int(i), "label": names[int(i)], "score": float(s)} for s, i in zip(srow, irow)],
        }
        for p, srow, irow in zip(paths, scores, ids)
    ]


def format_predictions(results: list[dict]) -> str:
    lines = []
    for r in results:
        best = ", ".join(f"{t['class_id']} {t['label']} ({t['score']:.3f})" for t in r["top"])
        lines.append(f"{Path(r['path']).name}: {best}")
    return "\n".join(lines)

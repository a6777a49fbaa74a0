"""``bireal predict``: class ids, names and scores of image files under a packed artifact."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from bireal_core.preprocess import eval_transform

from .packed import load_packed

if TYPE_CHECKING:
    from PIL import Image


class ImageError(ValueError):
    """An input image that cannot be read (the message names the file)."""


# Larger images are refused from their header, before a pixel is decoded: 40 MP (e.g. 8000 x 5000)
# decodes to 120 MB of RGB; PIL's own limit (179 MP, ~0.5 GB) is far above what a prediction needs.
MAX_PIXELS = 40_000_000


def open_image(source: str | os.PathLike | bytes, name: str = "") -> "Image.Image":
    """An RGB PIL image from a path or the file's bytes; ``ImageError`` (one line naming the file)
    for anything unreadable, and for an image over ``MAX_PIXELS`` before it is decoded."""
    import io

    from PIL import Image

    name = name or (str(source) if not isinstance(source, bytes) else "<bytes>")
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
            width, height = im.size
            if width * height > MAX_PIXELS:
                raise ImageError(
                    f"{name}: {width} x {height} = {width * height:,} pixels, over the {MAX_PIXELS:,} this reads "
                    "(not decoded)"
                )
            return im.convert("RGB")
    except ImageError:
        raise
    except (Image.DecompressionBombError, OSError, ValueError, SyntaxError) as e:  # FileNotFound, truncated, ...
        raise ImageError(f"{name}: cannot read image ({e.__class__.__name__}: {e})") from e


def load_images(paths: list[str | os.PathLike], input_config: dict) -> torch.Tensor:
    """Read and preprocess every image first, so a bad file fails before any model work."""
    transform = eval_transform(input_config)
    return torch.stack([transform(open_image(p)) for p in paths])


def predict_files(artifact: str | os.PathLike, paths: list[str | os.PathLike], topk: int = 1) -> list[dict]:
    """One result per path, in order: {"path", "top": [{class_id, label, score}]} for an image
    that was read, {"path", "error"} for one that was not (the others are still classified)."""
    model, header = load_packed(artifact)
    transform = eval_transform(header["input"])
    results, images = [], []
    for p in paths:
        try:
            images.append(transform(open_image(p)))
            results.append({"path": str(p)})
        except ImageError as e:
            results.append({"path": str(p), "error": str(e)})
    if images:
        with torch.inference_mode():
            probs = model(torch.stack(images)).softmax(dim=1)
        scores, ids = probs.topk(min(topk, probs.shape[1]), dim=1)
        names = header["class_names"]
        good = iter(zip(scores, ids))
        for r in results:
            if "error" not in r:
                srow, irow = next(good)
                r["top"] = [{"class_id": int(i), "label": names[int(i)], "score": float(s)} for s, i in zip(srow, irow)]
    return results


def format_predictions(results: list[dict]) -> str:
    """One line per classified image (the unreadable ones are the caller's to report)."""
    lines = []
    for r in results:
        if "top" in r:
            best = ", ".join(f"{t['class_id']} {t['label']} ({t['score']:.3f})" for t in r["top"])
            lines.append(f"{Path(r['path']).name}: {best}")
    return "\n".join(lines)

"""``bireal predict``: class ids, names and scores of image files under a packed artifact."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from bireal_core.preprocess import MAX_PIXELS, eval_transform, resize_overflow, rgb_image

from .packed import load_packed

if TYPE_CHECKING:
    from PIL import Image


class ImageError(ValueError):
    """An input image that cannot be read (the message names the file)."""


def check_size(name: str, width: int, height: int, resize: int | None = None) -> None:
    """``ImageError`` for an image over ``MAX_PIXELS``, as it is or once resized for the model
    (``resize``: the shorter side's length), from its header, before a pixel is decoded: PIL's own
    limit (179 MP, ~0.5 GB) is far above what a prediction needs, and a 20000 x 1 strip resized to
    256 ends a model server."""
    if width * height > MAX_PIXELS:
        raise ImageError(f"{name}: {width} x {height} = {width * height:,} pixels, over the {MAX_PIXELS:,} this reads")
    overflow = resize_overflow(width, height, resize) if resize is not None else ""
    if overflow:
        raise ImageError(f"{name}: {overflow} this reads")


def open_image(source: str | os.PathLike | bytes, name: str = "", resize: int | None = None) -> "Image.Image":
    """An RGB PIL image from a path or the file's bytes; ``ImageError`` (one line naming the file)
    for anything unreadable, and for an image over ``MAX_PIXELS`` (as it is, or once its shorter
    side is resized to ``resize``) before it is decoded."""
    import io

    from PIL import Image

    name = name or (str(source) if not isinstance(source, bytes) else "<bytes>")
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
            try:
                check_size(name, *im.size, resize)
            except ImageError as e:
                raise ImageError(f"{e} (not decoded)") from None
            return rgb_image(im)[0]  # as the shard stage converts it for training
    except ImageError:
        raise
    except (Image.DecompressionBombError, OSError, ValueError, SyntaxError) as e:  # FileNotFound, truncated, ...
        raise ImageError(f"{name}: cannot read image ({e.__class__.__name__}: {e})") from e


def image_files(inputs: list[str | os.PathLike]) -> tuple[list[Path], list[str]]:
    """The files to classify: each file as given (whatever its name), and each folder's files that
    PIL reads by their suffix, walked recursively in sorted order, hidden names and symlinked
    folders skipped. -> (files, one error per folder without any)."""
    from PIL import Image

    suffixes = set(Image.registered_extensions())
    files, errors = [], []
    for given in map(Path, inputs):
        if not given.is_dir():
            files.append(given)  # a missing or unreadable file is reported when it is read
            continue
        found = []
        for folder, subfolders, names in os.walk(given):  # symlinked folders are not followed
            subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
            found += [
                Path(folder) / n for n in sorted(names) if not n.startswith(".") and Path(n).suffix.lower() in suffixes
            ]
        if not found:
            errors.append(f"{given}: a folder without image files (none named *.jpg, *.png, ... inside)")
        files += found
    return files, errors


def load_images(paths: list[str | os.PathLike], input_config: dict) -> torch.Tensor:
    """Read and preprocess every image first, so a bad file fails before any model work."""
    transform = eval_transform(input_config)
    return torch.stack([transform(open_image(p, resize=input_config["resize"])) for p in paths])


# Images per forward: memory stays flat however many files are named (1,000 images in one batch
# would hold ~3 GB of Bi-Real-18's first activations on a CPU); 32 keeps the kernels' batch speed.
BATCH_SIZE = 32


def iter_predictions(
    artifact: str | os.PathLike, paths: list[str | os.PathLike], topk: int = 1, batch_size: int = BATCH_SIZE
) -> Iterator[dict]:
    """One result per path, in order, yielded a batch at a time: {"path", "top": [{class_id, label,
    score}]} for an image that was read, {"path", "error"} for one that was not (the others are
    still classified). The artifact is loaded once, before any image is read."""
    model, header = load_packed(artifact)
    transform = eval_transform(header["input"])
    for start in range(0, len(paths), batch_size):
        yield from _predict_batch(model, header, transform, paths[start : start + batch_size], topk)


def _predict_batch(model, header: dict, transform, paths: list, topk: int) -> list[dict]:
    results, images = [], []
    for p in paths:
        try:
            images.append(transform(open_image(p, resize=header["input"]["resize"])))
            results.append({"path": str(p)})
        except ImageError as e:
            results.append({"path": str(p), "error": str(e)})
    if not images:
        return results
    with torch.inference_mode():
        probs = model(torch.stack(images)).softmax(dim=1)  # (n, classes)
    scores, ids = probs.topk(min(topk, probs.shape[1]), dim=1)  # (n, k) each
    names = header["class_names"]
    read = iter(zip(scores, ids))
    for r in results:
        if "error" not in r:
            srow, irow = next(read)
            r["top"] = [{"class_id": int(i), "label": names[int(i)], "score": float(s)} for s, i in zip(srow, irow)]
    return results


def predict_files(
    artifact: str | os.PathLike, paths: list[str | os.PathLike], topk: int = 1, batch_size: int = BATCH_SIZE
) -> list[dict]:
    """``iter_predictions`` as a list."""
    return list(iter_predictions(artifact, paths, topk, batch_size))


def format_prediction(result: dict) -> str:
    """The line of one classified image: ``path: class_id label (score), ...`` (the path as given,
    or as found in a given folder: two folders may hold files of one name)."""
    best = ", ".join(f"{t['class_id']} {t['label']} ({t['score']:.3f})" for t in result["top"])
    return f"{result['path']}: {best}"

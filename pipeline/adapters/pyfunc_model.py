"""The MLflow pyfunc of a packed Bi-Real artifact, logged as code (no pickled object).

``predict`` takes a DataFrame with an ``image`` column of encoded image files' bytes (the logged
signature: a binary column, base64 in the JSON that ``mlflow models serve`` accepts) or, on the
unwrapped model, a uint8 (N, H, W, 3) array or a list of (H, W, 3) ones, and returns ``class_id``,
``label`` and ``score`` per image. It never opens a path named in a request (a model server would
read its own files for any caller), decodes no image over ``cuda_ext.predict.MAX_PIXELS`` as it is
or once resized for the model, and takes at most ``MAX_BATCH`` images per call. Needs the
``bireal`` package installed (its compiled kernels).
"""

from __future__ import annotations

import mlflow.pyfunc
import numpy as np
from mlflow.models import set_model

MAX_BATCH = 256  # images per predict call


def check_batch(n: int) -> None:
    if not 1 <= n <= MAX_BATCH:
        raise ValueError(f"{n} images in one call: send 1..{MAX_BATCH}")


def is_array_batch(model_input) -> bool:
    """Arrays (the unwrapped model's input), not the logged signature's DataFrame of bytes."""
    if isinstance(model_input, np.ndarray):
        return True
    return isinstance(model_input, list) and bool(model_input) and isinstance(model_input[0], np.ndarray)


def image_from_array(array, i: int, resize: int):
    """One (H, W, 3) uint8 RGB array (or (H, W) gray, (H, W, 4) RGBA) -> an RGB PIL image. Anything
    else is refused by name: a float image in [0, 1] cast to uint8 would be all zeros, answered
    with a confident-looking class."""
    from PIL import Image

    from cuda_ext.predict import check_size

    if not isinstance(array, np.ndarray):
        raise ValueError(f"image {i}: expected a uint8 (H, W, 3) array, got {type(array).__name__}")
    if array.dtype != np.uint8:
        raise ValueError(
            f"image {i}: dtype {array.dtype}, expected uint8 RGB in 0..255 "
            "(from floats in [0, 1]: (x * 255).round().astype(np.uint8))"
        )
    if not (array.ndim == 2 or array.ndim == 3 and array.shape[2] in (3, 4)):
        raise ValueError(
            f"image {i}: shape {tuple(array.shape)}, expected (H, W, 3) RGB (or (H, W) gray, (H, W, 4) RGBA)"
        )
    check_size(f"image {i}", array.shape[1], array.shape[0], resize)
    return Image.fromarray(array).convert("RGB")  # as bireal predict reads a gray or RGBA file


def images_from_arrays(model_input, resize: int) -> list:
    """A (N, H, W, 3) uint8 array or a list of (H, W, 3) ones (sizes may differ) -> PIL images. A
    single (H, W, 3) image is refused, not taken as H one-row images."""
    if isinstance(model_input, np.ndarray) and model_input.ndim != 4:
        raise ValueError(
            f"an array of shape {tuple(model_input.shape)}: a batch is (N, H, W, 3) uint8 "
            "(one image: image[None], or a list of (H, W, 3) arrays)"
        )
    check_batch(len(model_input))
    return [image_from_array(a, i, resize) for i, a in enumerate(model_input)]


def images_from_bytes(model_input, resize: int) -> list:
    """The logged signature's input: a DataFrame whose ``image`` column holds the files' bytes (or
    a list of bytes) -> PIL images, each decoded as ``bireal predict`` decodes a file."""
    from cuda_ext.predict import open_image

    if hasattr(model_input, "columns"):
        if "image" not in model_input.columns:
            raise ValueError(
                f"a DataFrame with columns {list(model_input.columns)}: "
                "expected an 'image' column of image files' bytes"
            )
        values = list(model_input["image"])
    else:
        values = list(model_input)
    check_batch(len(values))
    images = []
    for i, value in enumerate(values):
        if not isinstance(value, (bytes, bytearray)):
            raise ValueError(
                f"image {i}: expected the image file's bytes (base64 in JSON), got {type(value).__name__}: "
                "the model reads no file named in a request"
            )
        images.append(open_image(bytes(value), f"image {i}", resize))
    return images


def request_images(model_input, resize: int) -> list:
    """What ``predict`` was given -> RGB PIL images, 1..MAX_BATCH of them, or a ValueError naming
    the image and what is wrong with it (``resize``: the model's shorter side, which bounds the
    pixels an image may become)."""
    if is_array_batch(model_input):
        return images_from_arrays(model_input, resize)
    return images_from_bytes(model_input, resize)


def in_scoring_server() -> bool:
    """Whether this process is MLflow's model server (``mlflow models serve``), which names the model
    it loads in its environment before loading it."""
    import os

    from mlflow.pyfunc.scoring_server import _SERVER_MODEL_PATH

    return bool(os.environ.get(_SERVER_MODEL_PATH))


class BirealPackedModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper of ``PackedBiReal``; needs the ``bireal`` package (its compiled kernels)."""

    def load_context(self, context):
        from cuda_ext.packed import load_packed

        if in_scoring_server():  # the model server's process is ours to tune; a user's is not
            from cuda_ext.memory import keep_freed_memory

            keep_freed_memory()
        self.model, self.header = load_packed(context.artifacts["packed"])

    def _batch(self, model_input):
        import torch

        from bireal_core.preprocess import eval_transform

        transform = eval_transform(self.header["input"])
        images = request_images(model_input, self.header["input"]["resize"])
        return torch.stack([transform(im) for im in images])

    def predict(self, context, model_input, params=None):
        import pandas as pd
        import torch

        with torch.inference_mode():
            probs = self.model(self._batch(model_input)).softmax(dim=1)
        score, ids = probs.max(dim=1)
        names = self.header["class_names"]
        return pd.DataFrame(
            {"class_id": ids.tolist(), "label": [names[i] for i in ids.tolist()], "score": score.tolist()}
        )


set_model(BirealPackedModel())

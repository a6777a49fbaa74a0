"""The MLflow pyfunc of a packed Bi-Real artifact, logged as code (no pickled object).

``predict`` takes a DataFrame with an ``image`` column of encoded image files' bytes (the logged
signature: a binary column, base64 in the JSON that ``mlflow models serve`` accepts) or, on the
unwrapped model, a batch of uint8 (N, H, W, 3) arrays, and returns ``class_id``, ``label`` and
``score`` per image. It never opens a path named in a request (a model server would read its own
files for any caller), decodes no image over ``cuda_ext.predict.MAX_PIXELS`` and takes at most
``MAX_BATCH`` images per call. Needs the ``bireal`` package installed (its compiled kernels).
"""

from __future__ import annotations

import mlflow.pyfunc
import numpy as np
from mlflow.models import set_model

MAX_BATCH = 256  # images per predict call


def check_batch(n: int) -> None:
    if not 1 <= n <= MAX_BATCH:
        raise ValueError(f"{n} images in one call: send 1..{MAX_BATCH}")


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
        from PIL import Image

        from bireal_core.preprocess import eval_transform
        from cuda_ext.predict import MAX_PIXELS, open_image

        transform = eval_transform(self.header["input"])
        if (
            isinstance(model_input, np.ndarray)
            or isinstance(model_input, list)
            and model_input
            and isinstance(model_input[0], np.ndarray)
        ):
            arrays = [np.asarray(a, dtype=np.uint8) for a in model_input]
            check_batch(len(arrays))
            too_large = [i for i, a in enumerate(arrays) if a.shape[0] * a.shape[1] > MAX_PIXELS]
            if too_large:
                raise ValueError(f"image {too_large[0]}: over {MAX_PIXELS:,} pixels")
            images = [Image.fromarray(a).convert("RGB") for a in arrays]
        else:
            values = list(model_input["image"]) if hasattr(model_input, "columns") else list(model_input)
            check_batch(len(values))
            images = []
            for i, value in enumerate(values):
                if not isinstance(value, (bytes, bytearray)):
                    raise ValueError(
                        f"image {i}: expected the image file's bytes (base64 in JSON), got {type(value).__name__}: "
                        "the model reads no file named in a request"
                    )
                images.append(open_image(bytes(value), f"image {i}"))
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

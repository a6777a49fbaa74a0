"""The MLflow pyfunc of a packed Bi-Real artifact, logged as code (no pickled object).

``predict`` takes a DataFrame with an ``image`` column of file paths (the logged signature; what
``mlflow models serve`` accepts) or, on the unwrapped model, a batch of uint8 (N, H, W, 3) arrays,
and returns ``class_id``, ``label`` and ``score`` per image. Needs the ``bireal`` package installed
(its compiled kernels).
"""

from __future__ import annotations

import mlflow.pyfunc
import numpy as np
from mlflow.models import set_model


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

        transform = eval_transform(self.header["input"])
        if (
            isinstance(model_input, np.ndarray)
            or isinstance(model_input, list)
            and model_input
            and isinstance(model_input[0], np.ndarray)
        ):
            images = [Image.fromarray(np.asarray(a, dtype=np.uint8)).convert("RGB") for a in model_input]
        else:
            paths = list(model_input["image"]) if hasattr(model_input, "columns") else list(model_input)
            images = []
            for p in paths:
                with Image.open(p) as im:
                    images.append(im.convert("RGB"))
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

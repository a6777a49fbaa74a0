"""``bireal register``: the packed artifact as an MLflow pyfunc model in the model registry.

- The pyfunc's ``predict`` takes a DataFrame with an ``image`` column of file paths (the logged
  signature; what ``mlflow models serve`` accepts as JSON) or, called on the unwrapped model, a
  batch of uint8 (N, H, W, 3) arrays; it returns ``class_id``, ``label`` and ``score`` per image.
- Aliases, not stages: every new version gets ``candidate``; it becomes ``champion`` only when its
  evaluation accuracy beats the current champion's (both numbers and the decision are logged).
- Registering the same artifact again (same sha256) returns the existing version.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow.pyfunc

from ..env import framework_output_quiet
from ..params import MlflowConfig, RegistryConfig
from .pyfunc_model import BirealPackedModel

# Logged as code ("models from code"), not as a pickled object.
PYFUNC_CODE = str(Path(__file__).with_name("pyfunc_model.py"))
# What serving needs to predict: the core package (kernels, packed format; no pipeline extra) and
# the libraries the pyfunc itself imports.
PYFUNC_REQUIREMENTS = ["bireal", "torch", "torchvision", "safetensors", "pillow", "numpy", "pandas"]

SHA_TAG = "bireal.artifact_sha256"
ACCURACY_TAG = "bireal.eval_top1"


def register_artifact(
    artifact: str,
    evaluation: dict,
    example_image: str,
    cfg: MlflowConfig,
    registry: RegistryConfig,
    group: str,
    cost: dict | None = None,
) -> dict:
    """Log + register ``artifact``; -> {"name", "version", "champion", "duplicate", "gate", "run_id"}.
    The same artifact (sha256) registered before returns that version."""
    from cuda_ext.packed import read_artifact

    from .tracking import PIPELINE_TAG, client, experiment_id

    mlflow.set_tracking_uri(cfg.tracking_uri)
    mlflow.set_registry_uri(cfg.tracking_uri)
    c = client(cfg)
    _, header = read_artifact(artifact)
    sha, accuracy = header["sha256"], float(evaluation["top1"])
    _ensure_registered_model(c, registry.model_name)
    existing = c.search_model_versions(f"name = '{registry.model_name}' and tags.`{SHA_TAG}` = '{sha}'")
    if existing:
        v = int(existing[0].version)
        return {
            "name": registry.model_name,
            "version": v,
            "duplicate": True,
            "champion": _alias_version(c, registry.model_name, "champion") == v,
        }
    tags = {PIPELINE_TAG: group, "bireal.stage": "register"}
    # MLflow's advice on typed pyfunc models, its INFO lines and download bars: behind --verbose
    with (
        framework_output_quiet(),
        mlflow.start_run(experiment_id=experiment_id(cfg), run_name="register", tags=tags) as run,
    ):
        model_uri = log_packed_model(artifact, header, example_image, accuracy, cost)
        version = mlflow.register_model(
            model_uri, registry.model_name, tags={SHA_TAG: sha, ACCURACY_TAG: str(accuracy)}
        )
        v = int(version.version)
        c.set_registered_model_alias(registry.model_name, "candidate", v)
        gate = champion_gate(c, registry.model_name, v, accuracy)
        mlflow.log_dict(gate, "champion_gate.json")
        mlflow.log_params({"gate.promoted": gate["promoted"], "gate.champion_top1": gate["champion_top1"]})
    return {
        "name": registry.model_name,
        "version": v,
        "duplicate": False,
        "champion": gate["promoted"],
        "gate": gate,
        "run_id": run.info.run_id,
    }


def log_packed_model(artifact: str, header: dict, example_image: str, accuracy: float, cost: dict | None) -> str:
    """Log the packed artifact as a pyfunc (from code) in the active run; -> its model URI. The
    signature comes from a real prediction on ``example_image``."""
    import pandas as pd
    from mlflow.models import infer_signature

    from cuda_ext.packed import artifact_size

    example = pd.DataFrame({"image": [str(Path(example_image).resolve())]})
    model = BirealPackedModel()
    model.load_context(mlflow.pyfunc.PythonModelContext(artifacts={"packed": artifact}, model_config={}))
    size = artifact_size(artifact)
    info = mlflow.pyfunc.log_model(
        name="model",
        python_model=PYFUNC_CODE,
        artifacts={"packed": artifact},
        signature=infer_signature(example, model.predict(None, example)),
        input_example=example,
        pip_requirements=PYFUNC_REQUIREMENTS,
        metadata={
            "class_names": header["class_names"],
            "arch": header["model"],
            "packed_bytes": size["bytes"],
            "packed_mbit": size["mbit"],
            "eval_top1": accuracy,
            "cost": cost or {},
            "artifact_sha256": header["sha256"],
        },
    )
    mlflow.log_metrics({"eval_top1": accuracy, "packed_mbit": size["mbit"]})
    return info.model_uri


def champion_gate(c, name: str, version: int, accuracy: float) -> dict:
    """``version`` becomes ``champion`` only when its top-1 beats the current champion's."""
    champion_v = _alias_version(c, name, "champion")
    champion_acc = (
        float(c.get_model_version(name, champion_v).tags.get(ACCURACY_TAG, "-1")) if champion_v is not None else None
    )
    promote = champion_acc is None or accuracy > champion_acc
    if promote:
        c.set_registered_model_alias(name, "champion", version)
    return {
        "candidate_version": version,
        "candidate_top1": accuracy,
        "champion_version": champion_v,
        "champion_top1": champion_acc,
        "promoted": promote,
    }


def _ensure_registered_model(c, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        c.get_registered_model(name)
    except MlflowException:
        c.create_registered_model(name)


def _alias_version(c, name: str, alias: str) -> int | None:
    from mlflow.exceptions import MlflowException

    try:
        return int(c.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def write_registry_summary(result: dict, path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2, default=str))

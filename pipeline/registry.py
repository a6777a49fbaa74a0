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

from .pyfunc_model import BirealPackedModel
from .tracking import RegistryConfig

# Logged as code ("models from code"), not as a pickled object.
PYFUNC_CODE = str(Path(__file__).with_name("pyfunc_model.py"))

SHA_TAG = "bireal.artifact_sha256"
ACCURACY_TAG = "bireal.eval_top1"


def register_stage(artifact: str, evaluation: dict, shards: str, params_path: str | None = None,
                   model_name: str | None = None, out: str | None = None) -> dict:
    """The register stage (``bireal register`` and the Prefect flow's task): the evaluated
    ``artifact`` into the registry named in ``params.yaml``, with a real image of the evaluation
    split of ``shards`` as the signature's example and the cost table of its source checkpoint."""
    from cuda_ext.packed import read_artifact_header

    from .config import load_section
    from .data import eval_split_name, iter_shard, read_manifest, split_shards
    from .tracking import MlflowConfig, pipeline_run_id, resolve

    registry = load_section(RegistryConfig, "registry", params_path,
                            {"model_name": model_name} if model_name else None)
    mlflow_cfg = resolve(load_section(MlflowConfig, "mlflow", params_path))
    header = read_artifact_header(artifact)       # register_artifact verifies the tensors
    manifest = read_manifest(shards)
    url = split_shards(manifest, shards, eval_split_name(manifest))[0][0]
    example = Path(artifact).with_name("example.jpg")
    example.write_bytes(next(iter_shard(url))["jpg"])
    cost = None
    if header.get("source", {}).get("checkpoint"):
        import bireal_core as bc

        cost = bc.summary(bc.load_checkpoint(header["source"]["checkpoint"])[0]).as_dict()
    result = register_artifact(artifact, evaluation, str(example), mlflow_cfg, registry,
                               pipeline_run_id(params_path), cost)
    if out:
        write_registry_summary(result, out)
    return result


def register_artifact(artifact: str, evaluation: dict, example_image: str, cfg, registry: RegistryConfig,
                      group: str, cost: dict | None = None) -> dict:
    """Log + register ``artifact``; -> {"name", "version", "aliases", "champion", "duplicate"}."""
    import pandas as pd
    from mlflow.models import infer_signature

    from cuda_ext.packed import artifact_size, read_artifact

    from .tracking import PIPELINE_TAG, client, experiment_id

    mlflow.set_tracking_uri(cfg.tracking_uri)
    mlflow.set_registry_uri(cfg.tracking_uri)
    c = client(cfg)
    _, header = read_artifact(artifact)
    sha = header["sha256"]
    accuracy = float(evaluation["top1"])
    _ensure_registered_model(c, registry.model_name)
    existing = c.search_model_versions(f"name = '{registry.model_name}' and tags.`{SHA_TAG}` = '{sha}'")
    if existing:
        v = existing[0]
        return {"name": registry.model_name, "version": int(v.version), "duplicate": True,
                "champion": _alias_version(c, registry.model_name, "champion") == int(v.version)}
    example = pd.DataFrame({"image": [str(Path(example_image).resolve())]})
    model = BirealPackedModel()
    size = artifact_size(artifact)
    with mlflow.start_run(experiment_id=experiment_id(cfg), run_name="register",
                          tags={PIPELINE_TAG: group, "bireal.stage": "register"}) as run:
        model.load_context(mlflow.pyfunc.PythonModelContext(artifacts={"packed": artifact}, model_config={}))
        signature = infer_signature(example, model.predict(None, example))
        info = mlflow.pyfunc.log_model(
            name="model", python_model=PYFUNC_CODE, artifacts={"packed": artifact},
            signature=signature, input_example=example,
            pip_requirements=["bireal", "torch", "torchvision", "safetensors", "pillow", "pandas"],
            metadata={"class_names": header["class_names"], "arch": header["model"],
                      "packed_bytes": size["bytes"], "packed_mbit": size["mbit"], "eval_top1": accuracy,
                      "cost": cost or {}, "artifact_sha256": sha})
        mlflow.log_metrics({"eval_top1": accuracy, "packed_mbit": size["mbit"]})
        version = mlflow.register_model(info.model_uri, registry.model_name,
                                        tags={SHA_TAG: sha, ACCURACY_TAG: str(accuracy)})
        v = int(version.version)
        c.set_registered_model_alias(registry.model_name, "candidate", v)
        champion_v = _alias_version(c, registry.model_name, "champion")
        champion_acc = (float(c.get_model_version(registry.model_name, champion_v).tags.get(ACCURACY_TAG, "-1"))
                        if champion_v is not None else None)
        promote = champion_acc is None or accuracy > champion_acc
        if promote:
            c.set_registered_model_alias(registry.model_name, "champion", v)
        gate = {"candidate_version": v, "candidate_top1": accuracy, "champion_version": champion_v,
                "champion_top1": champion_acc, "promoted": promote}
        mlflow.log_dict(gate, "champion_gate.json")
        mlflow.log_params({"gate.promoted": promote, "gate.champion_top1": champion_acc})
    return {"name": registry.model_name, "version": v, "duplicate": False, "champion": promote,
            "gate": gate, "run_id": run.info.run_id}


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


def load_champion(cfg, name: str):
    mlflow.set_tracking_uri(cfg.tracking_uri)
    mlflow.set_registry_uri(cfg.tracking_uri)
    return mlflow.pyfunc.load_model(f"models:/{name}@champion")


def write_registry_summary(result: dict, path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2, default=str))

"""``bireal register``: the packed artifact as an MLflow pyfunc model in the model registry.

- The pyfunc's ``predict`` takes a DataFrame with an ``image`` column of image files' bytes (the
  logged signature: a binary column, base64 in the JSON ``mlflow models serve`` accepts) or, called
  on the unwrapped model, a uint8 (N, H, W, 3) array or a list of (H, W, 3) ones; it returns
  ``class_id``, ``label`` and ``score`` per image. It opens no path named in a request.
- Aliases, not stages: every new version gets ``candidate``; it becomes ``champion`` only when its
  evaluation accuracy beats the current champion's on the same images (both numbers and the
  decision are logged). Each version is tagged with the digest of the images it was scored on
  (``bireal evaluate``'s ``eval_data_sha256``); a top-1 on other images (another split, a
  re-sharded test set) is not compared: the version stays ``candidate``, and the gate says why.
  Concurrent registrations end with the best: after setting the alias each one re-reads the
  versions scored on the champion's images and moves ``champion`` to the argmax of their recorded
  top-1 until the alias names it.
- It fails closed: an evaluation that is not a finite top-1 in [0, 1], or is below
  ``registry.min_top1``, is refused before anything is logged; an MLflow error while reading the
  champion raises (the alias stays where it was) instead of reading as "no champion".
- Registering the same artifact again (same sha256) returns the existing version.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlflow.pyfunc

from .. import storage
from ..env import framework_output_quiet
from ..params import MlflowConfig, RegistryConfig

# Logged as code ("models from code"), not as a pickled object.
PYFUNC_CODE = str(Path(__file__).with_name("pyfunc_model.py"))
# What serving needs to predict: the core package (kernels, packed format; no pipeline extra) and
# the libraries the pyfunc itself imports.
PYFUNC_REQUIREMENTS = ["bireal", "torch", "torchvision", "safetensors", "pillow", "numpy", "pandas"]

SHA_TAG = "bireal.artifact_sha256"
# the digest of the header parts a prediction depends on (cuda_ext.packed.header_digest), which the sha256 omits
HEADER_TAG = "bireal.artifact_header"
ACCURACY_TAG = "bireal.eval_top1"
EVAL_DATA_TAG = "bireal.eval_data_sha256"  # the images the top-1 is of (pipeline.evaluate.eval_data_digest)
UNKNOWN_DATA = "unknown"  # an evaluation written before the digest was recorded (2026-12-07)


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

    accuracy = checked_top1(evaluation, registry.min_top1)
    mlflow.set_tracking_uri(cfg.tracking_uri)
    mlflow.set_registry_uri(cfg.tracking_uri)
    c = client(cfg)
    _, header = read_artifact(artifact)
    sha = header["sha256"]
    check_evaluated(evaluation, artifact, header)
    _ensure_registered_model(c, registry.model_name)
    from cuda_ext.packed import header_digest

    header_tag = header_digest(header)
    existing = c.search_model_versions(
        f"name = '{registry.model_name}' and tags.`{SHA_TAG}` = '{sha}' and tags.`{HEADER_TAG}` = '{header_tag}'"
    )
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
        eval_data = str(evaluation.get("eval_data_sha256") or UNKNOWN_DATA)
        version = mlflow.register_model(
            model_uri,
            registry.model_name,
            tags={SHA_TAG: sha, HEADER_TAG: header_tag, ACCURACY_TAG: str(accuracy), EVAL_DATA_TAG: eval_data},
        )
        v = int(version.version)
        c.set_registered_model_alias(registry.model_name, "candidate", v)
        gate = champion_gate(c, registry.model_name, v, accuracy, eval_data)
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

    # imported here, inside register's framework_output_quiet: defining the class is when MLflow
    # warns that its predict has no type hints (its input is checked by the logged signature)
    from .pyfunc_model import BirealPackedModel

    example = pd.DataFrame({"image": [Path(example_image).read_bytes()]})
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


def checked_top1(evaluation: dict, floor: float) -> float:
    """The evaluation's top-1, refused (ValueError, nothing registered) unless it is a finite
    accuracy in [0, 1] and at least ``floor``."""
    top1 = evaluation.get("top1")
    if isinstance(top1, bool) or not isinstance(top1, (int, float)) or not math.isfinite(top1) or not 0 <= top1 <= 1:
        raise ValueError(f"evaluation top1={top1!r}: not a finite accuracy in [0, 1]; nothing registered")
    if top1 < floor:
        raise ValueError(f"evaluation top1={top1:.4f} is below registry.min_top1={floor}; nothing registered")
    return float(top1)


def check_evaluated(evaluation: dict, artifact: str, header: dict) -> None:
    """The evaluation is of this artifact as it is now, else a ValueError: another artifact's top-1
    would go into the registry under this one. ``bireal evaluate`` records the tensors' sha256 it
    scored and the digest of the header parts a prediction depends on (``header_digest``): a mean
    edited after the evaluation keeps the sha256. An evaluation written before the sha256 was
    recorded (2026-12-06), or before the header's digest (2026-12-07), is taken as it is."""
    from cuda_ext.packed import SCORED_HEADER, header_digest

    sha256 = header["sha256"]
    scored = evaluation.get("artifact_sha256")
    if scored is not None and scored != sha256:
        raise ValueError(
            f"{artifact}: the evaluation is of another artifact (sha256 {str(scored)[:12]}..., this one "
            f"{sha256[:12]}...); run bireal evaluate on this one first; nothing registered"
        )
    scored_header = evaluation.get("artifact_header_sha256")
    if scored_header is not None and scored_header != header_digest(header):
        raise ValueError(
            f"{artifact}: its header ({', '.join(SCORED_HEADER)}) changed after the evaluation (the tensors are "
            "the same): the top-1 is of the artifact as it was; run bireal evaluate on it again; nothing registered"
        )


def champion_gate(c, name: str, version: int, accuracy: float, eval_data: str = UNKNOWN_DATA, pause=None) -> dict:
    """``version`` becomes ``champion`` only when its top-1 beats the current champion's on the same
    images (``eval_data``, their digest); then ``settle_champion`` makes the alias name the best
    version scored on the champion's images, whatever another registration did meanwhile.
    ``pause(point)`` (tests) runs after the read and after the set."""
    champion_v = _alias_version(c, name, "champion")
    champion = c.get_model_version(name, champion_v) if champion_v is not None else None
    champion_acc = recorded_top1(champion) if champion is not None else None
    champion_data = eval_data_of(champion) if champion is not None else None
    comparable = champion is None or champion_data == eval_data
    promote = comparable and (champion_acc is None or accuracy > champion_acc)
    if pause:
        pause("read")
    if promote:
        c.set_registered_model_alias(name, "champion", version)
    if pause:
        pause("set")
    final = settle_champion(c, name)
    gate = {
        "candidate_version": version,
        "candidate_top1": accuracy,
        "candidate_eval_data": eval_data,
        "champion_version": champion_v,
        "champion_top1": champion_acc,
        "champion_eval_data": champion_data,
        "comparable": comparable,
        "promoted": final == version,
        "champion_after": final,
    }
    if not comparable:
        unknown = UNKNOWN_DATA in (champion_data, eval_data)
        gate["reason"] = (
            f"champion version {champion_v} was scored on other images (eval data {str(champion_data)[:12]}, "
            f"this one {eval_data[:12]}{'; unknown: an evaluation from before 2026-12-07' if unknown else ''}): "
            "evaluate both on the same shards, or move the alias by hand"
        )
    return gate


def recorded_top1(version) -> float | None:
    """A version's recorded evaluation top-1 (None: missing or not a finite number)."""
    try:
        value = float(version.tags[ACCURACY_TAG])
    except (KeyError, ValueError):
        return None
    return value if math.isfinite(value) else None


def eval_data_of(version) -> str:
    """The digest of the images a version's top-1 is of (``UNKNOWN_DATA`` before it was tagged)."""
    return version.tags.get(EVAL_DATA_TAG, UNKNOWN_DATA)


def settle_champion(c, name: str, rounds: int = 20) -> int:
    """Move ``champion`` to the version with the best recorded top-1 among those scored on the
    champion's images (a tie keeps the current one, else the earliest), and re-read until the
    alias names it; -> that version. Two registrations that each read before the other set both
    end here, so the last writer cannot leave the worse."""
    for _ in range(rounds):
        current = _alias_version(c, name, "champion")
        versions = c.search_model_versions(f"name = '{name}'")
        if current is not None:
            data = next((eval_data_of(v) for v in versions if int(v.version) == current), None)
            versions = [v for v in versions if eval_data_of(v) == data]
        scores = {int(v.version): recorded_top1(v) for v in versions}
        scores = {v: top1 for v, top1 in scores.items() if top1 is not None}
        if not scores:
            return current
        best = max(scores, key=lambda v: (scores[v], v == current, -v))
        if current == best:
            return best
        c.set_registered_model_alias(name, "champion", best)
    raise RuntimeError(f"{name}: the champion alias did not settle in {rounds} rounds (registrations racing)")


def _ensure_registered_model(c, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        c.get_registered_model(name)
    except MlflowException:
        c.create_registered_model(name)


def _alias_version(c, name: str, alias: str) -> int | None:
    """The version ``alias`` names; None only when the registry says it names none. Any other error
    (a server that is down, a broken store) raises: reading it as "no champion" would promote."""
    from mlflow.exceptions import MlflowException

    try:
        return int(c.get_model_version_by_alias(name, alias).version)
    except MlflowException as e:
        absent = e.error_code == "RESOURCE_DOES_NOT_EXIST" or (
            e.error_code == "INVALID_PARAMETER_VALUE" and "not found" in str(e)
        )
        if absent:
            return None
        raise


def write_registry_summary(result: dict, path: str) -> None:
    storage.write_text(path, json.dumps(result, indent=2, default=str))

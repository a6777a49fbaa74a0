"""What a pipeline run made, for people: ``bireal summary`` in a few lines (the end of ``make
demo``: the packed model's size and top-1 with its agreement to the training graph, its speed
against the training graph run in float, the registry version and alias, and where to look next),
and each training stage's epochs as the CSV that ``dvc plots`` draws (``write_epoch_curve``)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from . import storage
from .params import ARTIFACT, METRICS, Params

# The columns of a stage's epoch curve, in order; an epoch without one (no test split, a history
# written before data_wait_fraction was measured) leaves it empty
EPOCH_COLUMNS = (
    "epoch",
    "segment",
    "lr",
    "train_loss",
    "train_top1",
    "val_loss",
    "val_top1",
    "val_top5",
    "test_top1",
    "flip_ratio",
    "img_s",
    "data_wait_fraction",
    "epoch_s",
)


def write_epoch_curve(history: list[dict], path: str) -> None:
    """A stage's history as CSV, one row per epoch (EPOCH_COLUMNS): the learning curves
    ``dvc plots show`` draws (dvc.yaml names the axes)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, EPOCH_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)


def speed_line(artifact: str, checkpoint: str) -> str:
    import torch

    import bireal_core as bc
    from cuda_ext.benchmarks import time_ms
    from cuda_ext.packed import load_packed

    packed, header = load_packed(artifact)
    float_model = bc.load_checkpoint(checkpoint)[0].eval()
    size = header["input"]["size"]
    x = torch.randn(1, 3, size, size)
    cpu = torch.device("cpu")
    with torch.inference_mode():
        ours, base = time_ms(lambda: packed(x), cpu, 20), time_ms(lambda: float_model(x), cpu, 20)
    return f"packed {ours:.2f} ms vs training graph in float {base:.2f} ms ({base / ours:.1f}x), CPU, batch 1"


def agreement(evaluation: dict) -> str:
    if "float_agreement" not in evaluation:  # bireal evaluate without --checkpoint
        return "no agreement with the training graph measured (evaluate ran without --checkpoint)"
    return f"agreement with the training graph {evaluation['float_agreement']:.2%}"


def read_json(path: Path, fields: dict[str, type | tuple[type, ...]]) -> dict:
    """A stage's metrics file, with the fields the summary prints; a damaged one is named."""
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); rerun the stage that writes it (dvc repro)") from e
    for key, kind in fields.items():
        value = data.get(key) if isinstance(data, dict) else None
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ValueError(f"{path}: {key} is {value!r}, not what the stage writes; rerun it (dvc repro)")
    return data


def pipeline_summary(params: Params) -> str:
    """The summary, from the files the stages wrote (a missing one is named, not guessed)."""
    from cuda_ext.packed import artifact_size

    from .segments import stage_checkpoint

    checkpoint = str(stage_checkpoint(params.train("finetune"), "finetune"))
    metrics = Path(METRICS)
    for path in (ARTIFACT, checkpoint, metrics / "evaluate.json"):
        if not Path(path).is_file():
            return f"no pipeline run to summarize: {path} is missing (run `dvc repro` or `make demo`)"
    evaluation = read_json(metrics / "evaluate.json", {"top1": (int, float), "images": int, "split": str})
    size = artifact_size(ARTIFACT)
    float_bytes = Path(checkpoint).stat().st_size
    rows = [
        (
            "packed model",
            f"{ARTIFACT}: {size['bytes']:,} bytes ({size['mbit']:.2f} Mbit), "
            f"{float_bytes / size['bytes']:.1f}x smaller than the float checkpoint",
        ),
        (
            "top-1",
            f"{evaluation['top1']:.4f} on {evaluation['images']} {evaluation['split']} images; "
            + agreement(evaluation),
        ),
        ("speed", speed_line(ARTIFACT, checkpoint)),
    ]
    registry = metrics / "registry.json"
    if registry.is_file():
        r = read_json(registry, {"name": str, "version": (int, str)})
        alias = "champion" if r.get("champion") else "candidate"
        rows.append(("registry", f"{r['name']} version {r['version']} ({alias}): models:/{r['name']}@{alias}"))
    look = "dvc metrics show; dvc plots show (learning curves, confusion matrix); " + mlflow_ui(params)
    rows.append(("look at", look))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def mlflow_ui(params: Params) -> str:
    """Where the runs and the registry are seen: a tracking server's own page, or ``mlflow ui`` on
    the local store (``mlflow ui --backend-store-uri`` takes a database or folder, not a server)."""
    uri = params.mlflow.tracking_uri or f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    if uri.startswith(("http://", "https://")):
        return f"the MLflow UI at {storage.without_credentials(uri)}"
    return f"mlflow ui --backend-store-uri {storage.without_credentials(uri)}"

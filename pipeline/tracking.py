"""MLflow tracking for the stages: one run per stage, grouped by a pipeline-run tag.

The driver creates the run (so a restarted Ray worker keeps logging into the same one) and
workers log by run id through ``MlflowClient``; only rank 0 logs. Epoch metrics are logged
exactly once even across a worker restart: steps already in the run's history are skipped.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PIPELINE_TAG = "bireal.pipeline_run"
NON_METRIC_KEYS = {"segment"}


@dataclass
class MlflowConfig:
    tracking_uri: str = ""          # default: sqlite:///<current dir>/mlflow.db (made absolute)
    experiment: str = "bireal"
    artifact_location: str = ""     # default: <current dir>/mlartifacts (made absolute)


@dataclass
class RegistryConfig:
    """The ``registry`` section: where ``bireal register`` puts the packed model."""

    model_name: str = "bireal-demo"


def resolve(cfg: MlflowConfig) -> MlflowConfig:
    """Absolute URIs, so Ray workers and Tune trials in other working directories share them."""
    root = Path.cwd()          # the project the stages run in (dvc repro, make demo: the checkout)
    uri = cfg.tracking_uri or f"sqlite:///{root / 'mlflow.db'}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{Path(uri[len('sqlite:///'):]).resolve()}"
    artifacts = cfg.artifact_location or str(root / "mlartifacts")
    if "://" not in artifacts:
        artifacts = Path(artifacts).resolve().as_uri()
    return MlflowConfig(uri, cfg.experiment, artifacts)


def client(cfg: MlflowConfig):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=cfg.tracking_uri)


def experiment_id(cfg: MlflowConfig) -> str:
    c = client(cfg)
    exp = c.get_experiment_by_name(cfg.experiment)
    if exp is not None:
        return exp.experiment_id
    return c.create_experiment(cfg.experiment, artifact_location=cfg.artifact_location)


def pipeline_run_id(params_path: str | os.PathLike | None) -> str:
    """Groups the stage runs of one pipeline run: $BIREAL_PIPELINE_RUN, else a hash of params.yaml."""
    if os.environ.get("BIREAL_PIPELINE_RUN"):
        return os.environ["BIREAL_PIPELINE_RUN"]
    from .config import default_params_path

    p = Path(params_path) if params_path else default_params_path()
    digest = hashlib.sha256(p.read_bytes()).hexdigest()[:12] if p.is_file() else "no-params"
    return f"params-{digest}"


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, tuple)) else v
    return out


def start_stage_run(cfg: MlflowConfig, stage: str, config: dict, group: str, extra_tags: dict | None = None) -> str:
    c = client(cfg)
    run = c.create_run(experiment_id(cfg), run_name=stage,
                       tags={PIPELINE_TAG: group, "bireal.stage": stage, **(extra_tags or {})})
    for key, value in flatten(config).items():
        c.log_param(run.info.run_id, key, str(value)[:6000])
    return run.info.run_id


class EpochLogger:
    """Logs one epoch's metrics at step = epoch, once."""

    def __init__(self, cfg: MlflowConfig, run_id: str):
        self.client, self.run_id = client(cfg), run_id
        self.logged = {m.step for m in self.client.get_metric_history(run_id, "val_top1")}

    def __call__(self, metrics: dict) -> None:
        step = int(metrics["epoch"])
        if step in self.logged:
            return
        for key, value in metrics.items():
            if key not in NON_METRIC_KEYS and isinstance(value, (int, float)):
                self.client.log_metric(self.run_id, key, float(value), step=step)
        self.logged.add(step)

    def backfill(self, history: list[dict]) -> None:
        for metrics in history:
            self(metrics)


def finish_stage_run(cfg: MlflowConfig, run_id: str, result: dict, cost: dict | None = None,
                     status: str = "FINISHED") -> None:
    c = client(cfg)
    if cost:
        for key in ("ops", "memory_mbit", "binary_macs", "real_macs", "params"):
            c.log_metric(run_id, f"cost_{key}", float(cost[key]))
        c.log_dict(run_id, cost, "cost_summary.json")
    checkpoint = result.get("checkpoint")
    if checkpoint and Path(checkpoint).is_file():
        c.log_artifact(run_id, checkpoint, artifact_path="checkpoint")
    c.set_terminated(run_id, status=status)

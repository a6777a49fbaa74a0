"""MLflow tracking, all of it: one run per stage grouped by a pipeline-run tag, and the tune
stage's parent run with one child run per trial. (The registry is ``adapters/registry.py``.)

The driver creates the run (so a restarted Ray worker keeps logging into the same one) and
workers log by run id through ``MlflowClient``; only rank 0 logs. Epoch metrics are logged
exactly once even across a worker restart: steps already in the run's history are skipped.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..params import MlflowConfig, TuneSettings

PIPELINE_TAG = "bireal.pipeline_run"
NON_METRIC_KEYS = {"segment"}


def resolve(cfg: MlflowConfig) -> MlflowConfig:
    """Absolute URIs, so Ray workers and Tune trials in other working directories share them."""
    root = Path.cwd()  # the project the stages run in (dvc repro, make demo: the checkout)
    uri = cfg.tracking_uri or f"sqlite:///{root / 'mlflow.db'}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{Path(uri[len('sqlite:///') :]).resolve()}"
    if uri.startswith(("http://", "https://")):  # a tracking server: it decides where artifacts go
        return MlflowConfig(uri, cfg.experiment, cfg.artifact_location)
    artifacts = cfg.artifact_location or str(root / "mlartifacts")
    if "://" not in artifacts:
        artifacts = Path(artifacts).resolve().as_uri()
    return MlflowConfig(uri, cfg.experiment, artifacts)


def client(cfg: MlflowConfig):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=cfg.tracking_uri, registry_uri=cfg.tracking_uri)  # the registry lives there too


def experiment_id(cfg: MlflowConfig) -> str:
    c = client(cfg)
    exp = c.get_experiment_by_name(cfg.experiment)
    if exp is not None:
        return exp.experiment_id
    return c.create_experiment(cfg.experiment, artifact_location=cfg.artifact_location or None)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, tuple)) else v
    return out


def start_stage_run(cfg: MlflowConfig, stage: str, config: dict, group: str, resume_key: str = "") -> str:
    """A stage's run. With ``resume_key`` (run name and inputs digest), an unfinished run of an
    earlier launch with that key is continued instead (its logged epochs are kept, not repeated)."""
    c = client(cfg)
    tags = {PIPELINE_TAG: group, "bireal.stage": stage}
    if resume_key:
        tags["bireal.resume_key"] = resume_key
        found = c.search_runs(
            [experiment_id(cfg)],
            f"tags.`bireal.resume_key` = '{resume_key}' and attributes.status != 'FINISHED'",
            max_results=1,
        )
        if found:
            c.update_run(found[0].info.run_id, status="RUNNING")
            return found[0].info.run_id
    run = c.create_run(experiment_id(cfg), run_name=stage, tags=tags)
    for key, value in flatten(config).items():
        c.log_param(run.info.run_id, key, str(value)[:6000])
    return run.info.run_id


def log_shards_input(cfg: MlflowConfig, run_id: str, shards: str) -> dict:
    """The shard manifest as the run's input dataset (MLflow lineage, ``MlflowClient.log_inputs``):
    its URI as the source, its sha256 as the digest, and the per-split counts and classes as the
    profile, so a run names exactly the data it trained on and a re-shard shows as a new dataset.
    -> what was logged."""
    import hashlib

    from mlflow.entities import Dataset, DatasetInput, InputTag

    from .. import storage

    location = shards if storage.is_url(shards) else str(Path(shards).resolve())
    url = storage.join(location, "manifest.json")
    text = storage.read_text(url)
    digest = hashlib.sha256(text.encode()).hexdigest()
    manifest = json.loads(text)
    profile = {
        "sha256": digest,
        "splits": {name: split["count"] for name, split in manifest["splits"].items()},
        "classes": len(manifest["classes"]),
    }
    source_type = url.split("://", 1)[0] if "://" in url else "local"
    dataset = Dataset(
        name=Path(shards.rstrip("/")).name or "shards",
        digest=digest[:16],  # MLflow shows a short digest; the whole sha256 is in the profile
        source_type=source_type,
        source=json.dumps({"uri": url}),
        profile=json.dumps(profile),
    )
    client(cfg).log_inputs(run_id, [DatasetInput(dataset, [InputTag("mlflow.data.context", "train")])])
    return {"uri": url, **profile}


def log_metrics(c, run_id: str, values: dict[str, float], step: int = 0) -> None:
    """``values`` at ``step`` in one request (``log_batch``): recorded all together or not at all."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    c.log_batch(run_id, metrics=[Metric(key, float(value), now, step) for key, value in values.items()])


class EpochLogger:
    """Logs one epoch's metrics at step = epoch, once."""

    def __init__(self, cfg: MlflowConfig, run_id: str):
        self.client, self.run_id = client(cfg), run_id
        self.logged = {m.step for m in self.client.get_metric_history(run_id, "val_top1")}

    def __call__(self, metrics: dict) -> None:
        step = int(metrics["epoch"])
        if step in self.logged:
            return
        values = {k: v for k, v in metrics.items() if k not in NON_METRIC_KEYS and isinstance(v, (int, float))}
        log_metrics(self.client, self.run_id, values, step)
        self.logged.add(step)

    def backfill(self, history: list[dict]) -> None:
        for metrics in history:
            self(metrics)


def finish_stage_run(
    cfg: MlflowConfig, run_id: str, result: dict, cost: dict | None = None, status: str = "FINISHED"
) -> None:
    c = client(cfg)
    if cost:
        keys = ("ops", "memory_mbit", "binary_macs", "real_macs", "params")
        log_metrics(c, run_id, {f"cost_{key}": cost[key] for key in keys})
        c.log_dict(run_id, cost, "cost_summary.json")
    checkpoint = result.get("checkpoint")
    if checkpoint and Path(checkpoint).is_file():
        c.log_artifact(run_id, checkpoint, artifact_path="checkpoint")
    c.set_terminated(run_id, status=status)


# ---------------------------------------------------------------------------- the tune stage


def tune_parent_run(cfg: MlflowConfig, group: str, name: str, settings: TuneSettings) -> dict:
    """The search's parent run (the same one when an interrupted search resumes); -> what trials
    need to log under it."""
    c = client(cfg)
    exp = experiment_id(cfg)
    existing = c.search_runs([exp], f"tags.`bireal.tune_name` = '{name}'")
    if existing:
        parent = existing[0].info.run_id
    else:
        parent = c.create_run(
            exp, run_name="tune", tags={"bireal.stage": "tune", "bireal.tune_name": name, PIPELINE_TAG: group}
        ).info.run_id
        for k, v in flatten({"tune": asdict(settings)}).items():
            c.log_param(parent, k, str(v))
    return {"mlflow": asdict(cfg), "experiment_id": exp, "parent_run": parent}


def trial_logger(tracking: dict, trial_id: str, trial_name: str, settings: dict) -> EpochLogger:
    """A trial's child run (found again when a resumed search restarts the trial) and its logger."""
    cfg = MlflowConfig(**tracking["mlflow"])
    c = client(cfg)
    existing = c.search_runs([tracking["experiment_id"]], f"tags.`bireal.trial_id` = '{trial_id}'")
    if existing:  # a trial restarted by a resumed search: same run, live again
        run_id = existing[0].info.run_id
        c.update_run(run_id, status="RUNNING")
    else:
        run_id = c.create_run(
            tracking["experiment_id"],
            run_name=trial_name,
            tags={
                "mlflow.parentRunId": tracking["parent_run"],
                "bireal.trial_id": trial_id,
                "bireal.stage": "tune-trial",
            },
        ).info.run_id
        for k, v in settings.items():
            c.log_param(run_id, k, v)
    return EpochLogger(cfg, run_id)


def close_tune_runs(cfg: MlflowConfig, tracking: dict, summary: dict) -> None:
    """Close the trials' runs (ASHA-stopped ones never close themselves) and log the table."""
    c = client(cfg)
    children = c.search_runs([tracking["experiment_id"]], f"tags.`mlflow.parentRunId` = '{tracking['parent_run']}'")
    for run in children:
        if run.info.status == "RUNNING":
            c.set_terminated(run.info.run_id, "FINISHED" if summary["finished"] else "KILLED")
    if summary["best"]:
        c.log_dict(tracking["parent_run"], summary["best"], "best_config.json")
        c.log_dict(tracking["parent_run"], {"table": summary["table"], "rankings": summary["rankings"]}, "table.json")
        c.log_metric(tracking["parent_run"], "best_val_top1", summary["table"][0]["mean"])
    if summary["finished"]:
        c.set_terminated(tracking["parent_run"], "FINISHED")

"""Prefect flow over the same stage functions the CLI and DVC run (no second implementation).

Tasks are cached on their inputs (the resolved params of the stage and the digests of the files
they read) plus their source, so a re-run skips finished stages; the training and registration
tasks retry (a lost Ray worker group or a locked SQLite file are worth a second try). The flow
ends with a markdown artifact: accuracy, cost and registry version.

Without a Prefect server the flow runs directly (Prefect starts a temporary API); the deployment
(``pipeline/serve_flow.py``) serves it to a server, see docs/orchestration.md.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import INPUTS, TASK_SOURCE

CACHE = INPUTS + TASK_SOURCE


def file_digest(path: str | Path) -> str:
    """sha256 of a file, or of a folder's manifest.json (shard folders), or "" when absent."""
    p = Path(path)
    if p.is_dir():
        p = p / "manifest.json"
    return hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else ""


@task(cache_policy=CACHE, persist_result=True)
def shard_task(source: str, out: str, shard_params: dict) -> dict:
    from .shard import ShardParams, shard_dataset

    manifest = shard_dataset(source, out, ShardParams(**shard_params), progress_bar=False)
    return {"out": out, "counts": {k: v["count"] for k, v in manifest["splits"].items()}}


@task(cache_policy=CACHE, persist_result=True, retries=1, retry_delay_seconds=5)
def train_task(stage: str, params_path: str, stage_config: dict, upstream: str, use_ray: bool) -> dict:
    from .stages import run_train_stage

    result = run_train_stage(stage, params_path, use_ray=use_ray, metrics_out=f"metrics/{stage}.json")
    return {"checkpoint": result["checkpoint"], "final": result["final"], "mlflow_run_id": result["mlflow_run_id"],
            "digest": file_digest(result["checkpoint"])}


@task(cache_policy=CACHE, persist_result=True)
def export_task(checkpoint: str, checkpoint_digest: str, out: str) -> dict:
    from cuda_ext.packed import artifact_size, export_checkpoint

    path = export_checkpoint(checkpoint, out)
    return {"artifact": str(path), "size": artifact_size(path), "digest": file_digest(path)}


@task(cache_policy=CACHE, persist_result=True)
def evaluate_task(artifact: str, artifact_digest: str, shards: str, checkpoint: str) -> dict:
    from .evaluate import evaluate_artifact, write_outputs

    result = evaluate_artifact(artifact, shards, checkpoint)
    write_outputs(result, "metrics/evaluate.json", "plots/confusion.csv")
    return {k: result[k] for k in ("split", "images", "top1", "float_agreement", "float_disagreements")}


@task(retries=2, retry_delay_seconds=3)
def register_task(artifact: str, evaluation: dict, shards: str, params_path: str) -> dict:
    from .registry import register_stage

    Path("metrics").mkdir(exist_ok=True)
    return register_stage(artifact, evaluation, shards, params_path, out="metrics/registry.json")


@flow(name="bireal-pipeline", log_prints=True)
def bireal_pipeline(params_path: str = "params.yaml", use_ray: bool = True, register_model: bool = True) -> dict:
    """shard -> pretrain -> binarize -> finetune -> export -> evaluate -> register."""
    import bireal_core as bc

    from .config import validate_params

    resolved = validate_params(params_path)            # a bad params file fails before any stage
    shards = resolved["pretrain"]["shards"]            # the train section's, as every stage sees it
    sharded = shard_task(resolved["data"]["source"], shards, resolved["shard"])
    upstream = file_digest(sharded["out"])
    runs = {}
    for stage in ("pretrain", "binarize", "finetune"):
        runs[stage] = train_task(stage, params_path, resolved[stage], upstream, use_ray)
        upstream = runs[stage]["digest"]
    checkpoint = runs["finetune"]["checkpoint"]
    exported = export_task(checkpoint, runs["finetune"]["digest"], "artifacts/model.safetensors")
    evaluation = evaluate_task(exported["artifact"], exported["digest"], shards, checkpoint)
    registered = register_task(exported["artifact"], evaluation, shards, params_path) if register_model else {}
    cost = bc.summary(bc.load_checkpoint(checkpoint)[0]).as_dict()
    summary = {"evaluation": evaluation, "cost": cost, "packed_bytes": exported["size"]["bytes"],
               "registry": registered, "stages": {s: r["final"] for s, r in runs.items()}}
    create_markdown_artifact(key="bireal-pipeline-summary", markdown=_markdown(summary),
                             description="accuracy, cost and registry version of this run")
    return summary


def _markdown(s: dict) -> str:
    reg = s["registry"]
    rows = "\n".join(f"| {stage} | {m.get('val_top1', 0):.4f} | {m.get('train_loss', 0):.4f} |"
                     for stage, m in s["stages"].items())
    return (f"# bireal pipeline\n\n"
            f"| stage | val top-1 | train loss |\n|---|---|---|\n{rows}\n\n"
            f"**Packed model** on `{s['evaluation']['split']}`: top-1 {s['evaluation']['top1']:.4f} "
            f"({s['evaluation']['images']} images), {s['packed_bytes']:,} bytes\n\n"
            f"**Cost**: {s['cost']['ops']:.3g} OPs, {s['cost']['memory_mbit']:.2f} Mbit\n\n"
            f"**Registry**: {reg.get('name', '-')} version {reg.get('version', '-')}"
            f"{' (champion)' if reg.get('champion') else ''}\n")

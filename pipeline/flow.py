"""Prefect flow over the stage table (``pipeline/stages.py``): the same functions, in the same
order, that ``bireal run`` and ``dvc repro`` run; no second implementation.

Each stage is one task, cached on its inputs like DVC: the stage's name, the digest of its deps
(files, folders; a shard folder by its manifest) and of its params sections, plus the task's
source, so a re-run skips finished stages. Training and tuning retry once (a lost Ray worker
group), registration twice (a locked SQLite file). The flow ends with a markdown artifact:
accuracy, cost and registry version.

Without a Prefect server the flow runs directly (Prefect starts a temporary API); the deployment
(``pipeline/serve_flow.py``) serves it to a server, see docs/orchestration.md.
With a cluster's job server (``submit_to``, or ``ray.address: http://HEAD:8265``) every stage runs
there as a Ray job through ``bireal submit``'s path (``pipeline/adapters/ray_jobs.py``), export,
evaluate and register as one job; the flow keeps the summaries and pointer files in ``submitted/``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import INPUTS, TASK_SOURCE

from .params import Params, load_params
from .stages import STAGE_TABLE, StageSpec, resolve_path

CACHE = INPUTS + TASK_SOURCE


def path_digest(path: str | Path) -> str:
    """sha256 of a file; of a folder's manifest.json (shard folders) or else of all its files;
    "" when absent."""
    p = Path(path)
    h = hashlib.sha256()
    if p.is_dir() and (p / "manifest.json").is_file():
        p = p / "manifest.json"
    if p.is_file():
        h.update(p.read_bytes())
    elif p.is_dir():
        for f in sorted(q for q in p.rglob("*") if q.is_file() and "__pycache__" not in q.parts):
            h.update(str(f.relative_to(p)).encode())
            h.update(f.read_bytes())
    else:
        return ""
    return h.hexdigest()


def stage_inputs(spec: StageSpec, params: Params) -> str:
    """What decides whether a stage must run again: its deps' contents and its params' values."""
    deps = {d: path_digest(resolve_path(d, params)) for d in spec.deps}
    values = {}
    for key in spec.params:
        section, _, name = key.partition(".")
        value = params.raw.get(section) or {}
        values[key] = value.get(name) if name else value
    return hashlib.sha256(json.dumps([deps, values], sort_keys=True, default=str).encode()).hexdigest()


@task(cache_policy=CACHE, persist_result=True)
def stage_task(name: str, params_path: str, use_ray: bool, inputs: str) -> dict:
    from .stages import run_stage

    result = run_stage(name, load_params(params_path), use_ray=use_ray)
    return json.loads(json.dumps(result, default=str))  # a plain, persistable summary


@task(cache_policy=CACHE, persist_result=True)
def job_task(names: list[str], params_path: str, address: str, inputs: str) -> dict:
    """Stages as one Ray job on the cluster behind ``address``; -> {stage: its summary}."""
    from .adapters.ray_jobs import submit

    result = submit(load_params(params_path), names, address, out=f"submitted/{'-'.join(names)}")
    return json.loads(json.dumps(result["summaries"], default=str))


def submitted_stages(params: Params, params_path: str, address: str, names: list[str]) -> dict:
    from .adapters.ray_jobs import job_groups

    specs = {spec.name: spec for spec in STAGE_TABLE}
    results = {}
    for group in job_groups(names):
        inputs = "".join(stage_inputs(specs[n], params) for n in group)
        options = {"retries": 1, "retry_delay_seconds": 5, "task_run_name": "+".join(group)}
        if "register" in group:  # a registry write is never skipped from cache
            options["cache_policy"] = None
        results.update(job_task.with_options(**options)(group, params_path, address, inputs))
    return results


def local_stages(params: Params, params_path: str, use_ray: bool, names: list[str]) -> dict:
    """Each stage as a task in this process (its training as Ray jobs of ``ray.address``)."""
    results = {}
    for spec in (s for s in STAGE_TABLE if s.name in names):
        retries = 2 if spec.name == "register" else (1 if spec.uses_ray else 0)
        options = {"retries": retries, "retry_delay_seconds": 5, "task_run_name": spec.name}
        if spec.name == "register":  # a registry write is never skipped from cache
            options["cache_policy"] = None
        results[spec.name] = stage_task.with_options(**options)(
            spec.name, params_path, use_ray, stage_inputs(spec, params)
        )
    return results


@flow(name="bireal-pipeline", log_prints=True)
def bireal_pipeline(
    params_path: str = "params.yaml", use_ray: bool = True, register_model: bool = True, submit_to: str = ""
) -> dict:
    """shard -> pretrain -> tune -> binarize -> finetune -> export -> evaluate -> register.
    ``submit_to`` (or an http ``ray.address``): a cluster's job server that runs the stages."""
    from .adapters.ray_jobs import is_job_server

    params = load_params(params_path)  # a bad params file fails before any stage
    names = [spec.name for spec in STAGE_TABLE if register_model or spec.name != "register"]
    address = submit_to or (params.ray.address if is_job_server(params.ray.address) else "")
    if address:
        results = submitted_stages(params, params_path, address, names)
    else:
        results = local_stages(params, params_path, use_ray, names)
    summary = _summary(results)
    create_markdown_artifact(
        key="bireal-pipeline-summary",
        markdown=_markdown(summary),
        description="accuracy, cost and registry version of this run",
    )
    return summary


def _summary(results: dict) -> dict:
    evaluation = {
        k: results["evaluate"].get(k) for k in ("split", "images", "top1", "float_agreement", "float_disagreements")
    }
    return {
        "evaluation": evaluation,
        "cost": results["finetune"]["cost"],
        "packed_bytes": results["export"]["size"]["bytes"],
        "registry": results.get("register", {}),
        "stages": {s: results[s]["final"] for s in ("pretrain", "binarize", "finetune")},
        "tune": results["tune"].get("best"),
        "ran": list(results),
    }


def _markdown(s: dict) -> str:
    reg = s["registry"]
    rows = "\n".join(
        f"| {stage} | {m.get('val_top1', 0):.4f} | {m.get('train_loss', 0):.4f} |" for stage, m in s["stages"].items()
    )
    return (
        f"# bireal pipeline\n\n"
        f"| stage | val top-1 | train loss |\n|---|---|---|\n{rows}\n\n"
        f"**Tune pick**: `{json.dumps(s['tune'])}`\n\n"
        f"**Packed model** on `{s['evaluation']['split']}`: top-1 {s['evaluation']['top1']:.4f} "
        f"({s['evaluation']['images']} images), {s['packed_bytes']:,} bytes\n\n"
        f"**Cost**: {s['cost']['cost_ops']:.3g} OPs, {s['cost']['cost_memory_mbit']:.2f} Mbit\n\n"
        f"**Registry**: {reg.get('name', '-')} version {reg.get('version', '-')}"
        f"{' (champion)' if reg.get('champion') else ''}\n"
    )

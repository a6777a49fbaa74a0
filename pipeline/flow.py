"""Prefect flow over the stage table (``pipeline/stages.py``): the same functions, in the same
order, that ``bireal run`` and ``dvc repro`` run; no second implementation.

Each stage is one task, cached on its inputs like DVC: the stage's name, the digest of its deps
(files, folders; a shard folder, local or in S3, by its manifest) and of its params sections, plus
the task's source, so a re-run skips finished stages. The cached results live in Prefect's result
storage: with the ``bireal-results`` block (``python -m pipeline.adapters.prefect_setup``, S3) two
checkouts or workers share them. Training and tuning retry once (a lost Ray worker group),
registration twice (a locked SQLite file), and carry the tag ``bireal-gpu``, which a Prefect
concurrency limit caps. The flow ends with a markdown artifact: accuracy, cost, registry version,
and links to each stage's MLflow run and Ray job.

Without a Prefect server the flow runs directly (Prefect starts a temporary API); ``prefect.yaml``
deploys it to a work pool, and ``pipeline/serve_flow.py`` serves it from one process; see
docs/orchestration.md.
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

from . import storage
from .params import Params, load_params
from .stages import STAGE_TABLE, STAGES_BY_NAME, StageSpec, resolve_path

CACHE = INPUTS + TASK_SOURCE
GPU_TAG = "bireal-gpu"  # training and tuning: `prefect concurrency-limit create bireal-gpu N` caps them


def path_digest(path: str | Path) -> str:
    """sha256 of a file; of a folder's manifest.json (shard folders, local or in object storage)
    or else of all its files; "" when absent."""
    if storage.is_url(str(path)):
        manifest = storage.join(str(path), "manifest.json")
        found = manifest if storage.exists(manifest) else str(path) if storage.exists(str(path)) else ""
        return hashlib.sha256(storage.read_text(found).encode()).hexdigest() if found else ""
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
    """Stages as one Ray job on the cluster behind ``address``; -> {stage: its summary, with the
    job's id and dashboard link and the checkpoints it published ({name: {uri, sha256}}), so a
    result taken from the cache names objects in shared storage, not files of this checkout}."""
    from .adapters.ray_jobs import dashboard_link, submit

    result = submit(load_params(params_path), names, address, out=f"submitted/{'-'.join(names)}")
    job = {"ray_job": result["id"], "ray_job_url": dashboard_link(address, result["id"])}
    summaries = {
        stage: {**summary, **job, "published": result["published"].get(stage, {})}
        for stage, summary in result["summaries"].items()
    }
    return json.loads(json.dumps(summaries, default=str))


def gpu_tags(names: list[str]) -> list[str]:
    """The concurrency tag for a task that trains or tunes (what holds the cluster's GPUs)."""
    return [GPU_TAG] if any(STAGES_BY_NAME[n].uses_ray for n in names) else []


def submitted_stages(params: Params, params_path: str, address: str, names: list[str]) -> dict:
    from .adapters.ray_jobs import job_groups

    specs = {spec.name: spec for spec in STAGE_TABLE}
    results = {}
    for group in job_groups(names):
        inputs = "".join(stage_inputs(specs[n], params) for n in group)
        options = {"retries": 1, "retry_delay_seconds": 5, "task_run_name": "+".join(group), "tags": gpu_tags(group)}
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
        options["tags"] = gpu_tags([spec.name])
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
    summary["links"] = _links(results, params)
    # where a cluster run's checkpoints are: {stage: {name: {uri, sha256}}} (submitted stages)
    summary["published"] = {stage: r["published"] for stage, r in results.items() if r.get("published")}
    create_markdown_artifact(
        key="bireal-pipeline-summary",
        markdown=_markdown(summary),
        description="accuracy, cost and registry version of this run, with its MLflow runs and Ray jobs",
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


def _links(results: dict, params: Params) -> dict:
    """{stage: {"mlflow_run": id or URL, "ray_job": dashboard URL}} for the stages that have them,
    and the registered model version's page; URLs where MLflow is a server (http), ids otherwise."""
    uri = storage.without_credentials(params.mlflow.tracking_uri)  # a link is written and shown
    served = uri.startswith(("http://", "https://"))
    links: dict[str, dict] = {}
    for stage, result in results.items():
        found = {}
        if result.get("mlflow_run_id"):
            run = result["mlflow_run_id"]
            found["mlflow_run"] = f"{uri.rstrip('/')}/#/runs/{run}" if served else run
        if result.get("ray_job_url"):
            found["ray_job"] = result["ray_job_url"]
        if found:
            links[stage] = found
    reg = results.get("register") or {}
    if served and reg.get("name") and reg.get("version"):
        links.setdefault("register", {})["mlflow_model"] = (
            f"{uri.rstrip('/')}/#/models/{reg['name']}/versions/{reg['version']}"
        )
    return links


def _link(target: str) -> str:
    return f"[{target.rsplit('/', 1)[-1]}]({target})" if target.startswith("http") else f"`{target}`"


def _markdown(s: dict) -> str:
    reg = s["registry"]
    links = "\n".join(
        f"| {stage} | {' '.join(f'{kind}: {_link(t)}' for kind, t in found.items())} |"
        for stage, found in s.get("links", {}).items()
    )
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
        f"{' (champion)' if reg.get('champion') else ''}\n\n"
        f"| stage | MLflow run, Ray job |\n|---|---|\n{links}\n"
    )

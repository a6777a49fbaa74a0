"""Prefect's own conventions on loopback, run as a Prefect user runs them: a server, a process work
pool, `prefect deploy` from prefect.yaml, `prefect worker start` and `prefect deployment run`.

The run submits its stages to a Ray job server (token auth on), with shards, checkpoints and
Prefect's results in S3 (moto; the ``bireal-results`` block of pipeline/adapters/prefect_setup.py),
so a second checkout with its own PREFECT_HOME takes every stage from those results and the
checkpoints they name exist. The training and tuning tasks hold the ``bireal-gpu`` concurrency
limit; the run's artifact links its MLflow runs and Ray jobs; the cluster's Kubernetes work pool
takes the project's base job template and prefect.yaml's cluster deployment."""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from cluster_services import (
    BIN,
    S3,
    Memory,
    MlflowServer,
    TokenRayHead,
    _http_ok,
    free_port,
    run_watched,
    stop,
    terminal_line,
    wait_for,
)

pytestmark = [pytest.mark.services, pytest.mark.e2e]

ROOT = Path(__file__).resolve().parents[1]
TOKEN = secrets.token_hex(16)
GPU_STAGES = ("pretrain", "tune", "binarize", "finetune")


def _api(url: str, path: str, body: dict | None = None):
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"{url}{path}", data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def stack(tmp_path_factory, pytestconfig):
    """moto, an MLflow server, a Ray head with token auth and its job server, a Prefect server;
    the module's wall time and peak memory (PSS of this process and all it starts) are printed."""
    started, memory, say = time.time(), Memory(), terminal_line(pytestconfig, "services")

    root = tmp_path_factory.mktemp("prefect_deploy")
    saved = dict(os.environ)
    s3 = S3(root, bucket="prefect-deploy")  # puts moto's credentials in this process's environment
    mlflow = MlflowServer(root, f"sqlite:///{root / 'mlflow.db'}", str(root / "mlartifacts"), "")
    head = TokenRayHead(root, TOKEN, cpus=2)  # the job server; the jobs inherit moto's credentials
    prefect_port = free_port()
    api = f"http://127.0.0.1:{prefect_port}/api"
    server_env = {**os.environ, "PREFECT_HOME": str(root / "prefect-server"), "PREFECT_API_URL": api}
    prefect = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)],
        env=server_env,
        stdout=(root / "prefect-server.log").open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    wait_for(lambda: _http_ok(f"{api}/health"), 120, "the Prefect server", root / "prefect-server.log")
    yield {"root": root, "s3": s3, "mlflow": mlflow, "job_server": head.url, "api": api, "say": say}
    stop(prefect)
    head.close()
    mlflow.close()
    stop(s3.proc)
    os.environ.clear()
    os.environ.update(saved)
    say(f"test_prefect_deploy: {time.time() - started:.0f} s wall, peak memory {memory.stop():.2f} GiB (PSS)")
    say(f"at the peak, GiB per program: {memory.breakdown()}")


def checkout(stack, name: str) -> Path:
    """The project's tracked files in a folder of their own, with a params.yaml for the stack."""
    dst = stack["root"] / name
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        (dst / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, dst / f)
    bucket = f"s3://{stack['s3'].bucket}"
    params = {
        "data": {"source": "demo"},
        "shard": {"samples_per_shard": 100, "processes": 1},
        "storage": {"artifacts": f"{bucket}/artifacts", "endpoint_url": stack["s3"].url},
        "train": {
            "shards": f"{bucket}/shards",
            "out": "checkpoints",
            "width": 0.25,
            "batch_size": 32,
            "loader_workers": 0,
            "max_steps_per_epoch": 2,
        },
        "pretrain": {"phase_epochs": [1, 0, 1]},
        "binarize": {"epochs": 1, "tuned_config": ""},
        "finetune": {"epochs": 1},
        "tune": {"enabled": False, "out": "tune", "storage_path": f"{bucket}/tune"},
        "ray": {
            "address": stack["job_server"],
            "num_workers": 1,
            "cpus_per_worker": 1,
            "storage_path": f"{bucket}/ray",
        },
        "mlflow": {"tracking_uri": stack["mlflow"].uri, "experiment": "prefect-deploy"},
        "registry": {"model_name": "bireal-prefect-deploy"},
    }
    (dst / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return dst


def env_for(stack, folder: Path) -> dict[str, str]:
    """A user's shell in ``folder``: its own PREFECT_HOME, the server, the shared result block."""
    return {
        **os.environ,
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "PWD": str(folder),  # prefect.yaml's pull step: "{{ $PWD }}"
        "PREFECT_HOME": str(folder / ".prefect"),
        "PREFECT_API_URL": stack["api"],
        "PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK": "remote-file-system/bireal-results",
        "PREFECT_WORKER_QUERY_SECONDS": "2",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": TOKEN,
        "BIREAL_JOB_PYTHON": str(BIN / "python"),
        "BIREAL_PIPELINE_RUN": "prefect-deploy",
    }


def sh(args: list[str], folder: Path, env: dict, watch: tuple[Path, ...] = ()) -> subprocess.CompletedProcess:
    done = run_watched(args, watch=watch, cwd=folder, env=env)
    assert done.returncode == 0, f"{args}\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done


def ray_jobs(stack) -> dict[str, float]:
    request = urllib.request.Request(f"{stack['job_server']}/api/jobs/", headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(request, timeout=10) as r:
        return {j["submission_id"]: j["start_time"] for j in json.loads(r.read()) if j.get("submission_id")}


def test_deploy_worker_run_and_a_second_checkout_reuses_the_results(stack):
    a = checkout(stack, "checkout-a")
    env = env_for(stack, a)
    prefect = str(BIN / "prefect")
    sh([prefect, "work-pool", "create", "bireal-local", "--type", "process"], a, env)
    bucket = f"s3://{stack['s3'].bucket}"
    setup = [str(BIN / "python"), "-m", "pipeline.adapters.prefect_setup", f"{bucket}/prefect-results"]
    assert "remote-file-system/bireal-results" in sh([*setup, "--endpoint-url", stack["s3"].url], a, env).stdout
    sh([prefect, "concurrency-limit", "create", "bireal-gpu", "1"], a, env)
    sh([prefect, "--no-prompt", "deploy", "--name", "checkout"], a, env)
    worker = subprocess.Popen(
        [prefect, "worker", "start", "--pool", "bireal-local"],
        cwd=a,
        env=env,
        stdout=(stack["root"] / "worker.log").open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        run = [prefect, "deployment", "run", "bireal-pipeline/checkout", "--watch"]
        ran = sh(run, a, env, watch=(stack["root"] / "worker.log",))  # the flow's output is the worker's
    finally:
        stop(worker)
    assert "Completed" in ran.stdout, ran.stdout[-3000:]
    stack["say"]("prefect deployment run 'bireal-pipeline/checkout' --watch:\n" + ran.stdout.strip())
    jobs = ray_jobs(stack)
    groups = ("shard", "pretrain", "tune", "binarize", "finetune", "export-evaluate-register")
    assert len(jobs) == len(groups) and all(sid.startswith("prefect-deploy-") for sid in jobs)

    api = stack["api"]
    # the run's artifact: the packed model's accuracy, and links to its MLflow runs and Ray jobs
    (artifact,) = _api(api, "/artifacts/filter", {"artifacts": {"key": {"any_": ["bireal-pipeline-summary"]}}})
    for stage in ("pretrain", "binarize", "finetune"):
        assert f"| {stage} | mlflow_run: [" in artifact["data"] and f"{stack['mlflow'].uri}/#/runs/" in artifact["data"]
    linked = re.findall(rf"{re.escape(stack['job_server'])}/#/jobs/(prefect-deploy-[\w-]+)", artifact["data"])
    assert set(linked) == set(jobs)  # each of the six jobs (export, evaluate and register share one)
    # the GPU stages held the bireal-gpu limit: each acquired a slot and gave it back
    tasks = _api(api, "/task_runs/filter", {})
    tagged = sorted(t["name"] for t in tasks if "bireal-gpu" in t["tags"])
    assert tagged == sorted(GPU_STAGES), [(t["name"], t["tags"]) for t in tasks]

    def acquisitions() -> list[dict]:
        body = {"filter": {"event": {"prefix": ["prefect.concurrency-limit.acquired"]}}, "limit": 50}
        events = _api(api, "/events/filter", body)["events"]
        return [e for e in events if e["resource"].get("prefect.resource.name") == "tag:bireal-gpu"]

    wait_for(lambda: len(acquisitions()) == len(GPU_STAGES), 300, "one bireal-gpu acquisition per GPU task")
    (limit,) = [c for c in _api(api, "/v2/concurrency_limits/filter", {}) if c["name"] == "tag:bireal-gpu"]
    assert limit["limit"] == 1 and limit["active_slots"] == 0
    # the results went to S3, nothing into the checkout's PREFECT_HOME
    s3 = stack["s3"].client()
    stored = s3.list_objects_v2(Bucket=stack["s3"].bucket, Prefix="prefect-results/").get("KeyCount", 0)
    assert stored >= len(groups) and not list((a / ".prefect").glob("storage/*"))

    # a second checkout, its own PREFECT_HOME, the flow run directly: every stage from the results in
    # S3 (the package job, which registers, is fetched from the job server, not run again)
    b = checkout(stack, "checkout-b")
    script = (
        "import json\nfrom pipeline.env import apply_offline_defaults\napply_offline_defaults()\n"
        "from pipeline.flow import bireal_pipeline\n"
        "print('SUMMARY ' + json.dumps(bireal_pipeline('params.yaml'), default=str))\n"
    )
    again = sh([str(BIN / "python"), "-c", script], b, env_for(stack, b))
    summary = json.loads(again.stdout.split("SUMMARY ", 1)[1].splitlines()[0])
    assert ray_jobs(stack) == jobs  # no job submitted or run again
    log = again.stdout + again.stderr
    assert sum("Finished in state Cached" in line for line in log.splitlines()) == len(groups) - 1, log[-4000:]
    first = json.loads((a / "submitted" / "export-evaluate-register" / "evaluate.json").read_text())
    assert summary["evaluation"]["top1"] == first["top1"] and summary["registry"]["version"] == 1
    # the checkpoints the cached results name are in the bucket, with the digests they record
    published = [ref for stage in summary["published"].values() for ref in stage.values()]
    assert len(published) == 5  # pretrain's three phases, binarize, finetune
    for ref in published:
        key = ref["uri"].removeprefix(f"{bucket}/")
        body = s3.get_object(Bucket=stack["s3"].bucket, Key=key)["Body"].read()
        assert hashlib.sha256(body).hexdigest() == ref["sha256"], ref
    assert not (b / "submitted" / "pretrain").exists()  # nothing of the cached stages ran here
    stack["say"](
        f"second checkout, own PREFECT_HOME: {len(groups) - 1} stages Cached from {stored} result objects in S3, "
        f"no job submitted, the package job fetched; {len(published)} checkpoints named, each in the bucket "
        f"under its sha256; top-1 {summary['evaluation']['top1']:.4f}"
    )


def test_the_cluster_pool_takes_the_job_template_and_the_cluster_deployment(stack):
    """The Kubernetes work pool with deploy/prefect/kubernetes-job-template.json, and prefect.yaml's
    cluster deployment registered on it (no Kubernetes here: its worker would run it)."""
    folder = checkout(stack, "checkout-k8s")
    env = env_for(stack, folder)
    prefect = str(BIN / "prefect")
    template = "deploy/prefect/kubernetes-job-template.json"
    sh(
        [prefect, "work-pool", "create", "bireal-k8s", "--type", "kubernetes", "--base-job-template", template],
        folder,
        env,
    )
    pool = _api(stack["api"], "/work_pools/bireal-k8s")
    variables = pool["base_job_template"]["variables"]["properties"]
    assert pool["type"] == "kubernetes" and variables["image"]["default"] == "ghcr.io/bireal/bireal:0.1.0"
    sh([prefect, "--no-prompt", "deploy", "--name", "imagenet-bireal18-official"], folder, env)
    (deployment,) = _api(
        stack["api"], "/deployments/filter", {"deployments": {"name": {"any_": ["imagenet-bireal18-official"]}}}
    )
    assert deployment["work_pool_name"] == "bireal-k8s" and deployment["global_concurrency_limit"]["limit"] == 1
    assert deployment["parameters"]["params_path"] == "deploy/params/imagenet_bireal18_official.yaml"
    assert deployment["pull_steps"] == [
        {"prefect.deployments.steps.set_working_directory": {"directory": "/home/ray/bireal"}}
    ]

"""Driving a multi-node cluster from outside it, as a laptop or CI does: `bireal submit`, `dvc repro
deploy/dvc.yaml` and the Prefect flow submit stages as Ray jobs to the head's job server (Ray's
dashboard on 127.0.0.1), and the jobs' training runs on worker nodes in mount namespaces of their
own, with shards, checkpoints and stage outputs in S3 and tracking on the MLflow server
(tests/cluster_services.py; the `cluster` fixture in tests/conftest.py).

The cluster suite's other module (tests/test_cluster.py) runs its head without the dashboard, which
keeps its peak under the suite's memory budget; this module's cluster is started after that one has
stopped. Marked ``cluster``: `make test` runs both modules in a pytest process of their own.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from cluster_services import BIN, cluster_env, ray_headers, run_watched, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.e2e]

RAY_DASHBOARD = True  # read by the cluster fixture: this module's head hosts the job server
ROOT = Path(__file__).resolve().parents[1]


def _api(cluster, path: str):
    """GET on the job server's REST API, with the cluster's token (it answers 401 without)."""
    request = urllib.request.Request(f"{cluster.ray.dashboard}{path}", headers=ray_headers())
    with urllib.request.urlopen(request, timeout=10) as r:
        return json.loads(r.read())


def job(cluster, sid: str) -> dict:
    """The job's record from the job server's REST API (status, start_time, ...)."""
    return _api(cluster, f"/api/jobs/{sid}")


def jobs(cluster) -> dict[str, dict]:
    return {j["submission_id"]: j for j in _api(cluster, "/api/jobs/") if j.get("submission_id")}


def test_the_job_server_refuses_a_client_without_the_token(cluster):
    """Ray's token authentication is on: the job server answers 401 to a request without it."""
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{cluster.ray.dashboard}/api/jobs/", timeout=10)
    assert refused.value.code == 401
    assert isinstance(jobs(cluster), dict)  # with the token: answered


def submission_of(params: Path, run: str, stages: list[str], monkeypatch) -> str:
    """The job id `bireal submit` gives ``stages`` of pipeline run ``run`` (it carries the params' digest)."""
    from pipeline.adapters.ray_jobs import submission_id
    from pipeline.params import load_params

    monkeypatch.setenv("BIREAL_PIPELINE_RUN", run)
    return submission_id(load_params(params), stages)


def published_matches(cluster, pointer: dict) -> bool:
    """A pointer file's {uri, sha256} names an object in the bucket with that digest."""
    bucket = f"s3://{cluster.s3.bucket}/"
    assert pointer["uri"].startswith(bucket), pointer
    body = cluster.s3.read(pointer["uri"][len(bucket) :])
    return body is not None and hashlib.sha256(body).hexdigest() == pointer["sha256"]


def test_dvc_repro_drives_the_cluster_and_a_second_repro_does_nothing(cluster, monkeypatch):
    """deploy/dvc.yaml in a new git repo: every stage is a job on the cluster (export, evaluate and
    register as one), its training on the worker nodes; what DVC tracks are the summaries (as
    metrics) and the pointers to the checkpoints in S3. A second `dvc repro` submits nothing; an
    experiment with one param changed (`dvc exp run -S`) reruns only the stages that read it and
    `dvc exp show` lists its params and metrics; `dvc push` fills the S3 remote; a re-shard (the
    manifest in the bucket, an external dependency) makes every stage that reads it stale."""
    run = "dvc-run"
    params = cluster.params("dvc", finetune={"lr": 0.001})  # the experiment below sets it
    cluster.bireal("shard", "--params", str(params), run_id=run, log="dvc.log")  # the shards go up first
    repo = cluster.root / "dvc-repo"
    (repo / "deploy").mkdir(parents=True)
    (repo / "deploy" / "dvc.yaml").write_text((ROOT / "deploy" / "dvc.yaml").read_text())
    (repo / "cluster.yaml").write_text(params.read_text())
    (repo / "deploy" / "dvc-run.yaml").write_text(
        f"params: cluster.yaml\naddress: {cluster.ray.dashboard}\nout: submitted\npython: {BIN / 'python'}\n"
        f"shards: s3://{cluster.s3.bucket}/shards\n"
    )
    env = {**cluster_env(), "PATH": f"{BIN}:{os.environ['PATH']}", "BIREAL_PIPELINE_RUN": run}
    env["AWS_ENDPOINT_URL"] = cluster.s3.url  # DVC's S3 client (the external dep, the remote) finds moto

    def dvc(*args: str) -> subprocess.CompletedProcess:
        return run_watched([str(BIN / "dvc"), *args], cwd=repo, env=env)

    for cmd in (["git", "init", "-q"], ["git", "add", "-A"]):
        subprocess.run(cmd, cwd=repo, check=True)
    assert dvc("init", "-q").returncode == 0
    (repo / ".dvc" / "config").write_text((ROOT / ".dvc" / "config").read_text())  # the project's: its remote
    first = dvc("repro", "deploy/dvc.yaml")
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    groups = ("pretrain", "tune", "binarize", "finetune", "export-evaluate-register")
    ids = {g: submission_of(repo / "cluster.yaml", run, g.split("-"), monkeypatch) for g in groups}
    for group, sid in ids.items():
        assert f"submitted {sid} " in first.stdout, group
    assert set(ids.values()) <= set(jobs(cluster))

    submitted = repo / "submitted"
    for stage, names in (("pretrain", ("pretrain-relu", "pretrain-clip", "pretrain")), ("binarize", ("binarize",))):
        for name in names:
            pointer = json.loads((submitted / stage / f"{name}.pointer.json").read_text())
            assert published_matches(cluster, pointer), pointer
    evaluation = json.loads((submitted / "summaries" / "package" / "evaluate.json").read_text())
    assert evaluation["images"] == 360 and 0 <= evaluation["top1"] <= 1
    # the summaries are DVC metrics: what the jobs wrote to storage.artifacts under their ids
    metrics = json.loads(dvc("metrics", "show", "--json").stdout)
    files = next(iter(metrics.values()))["data"]
    assert files["submitted/summaries/package/evaluate.json"]["data"]["top1"] == evaluation["top1"]
    assert files["submitted/summaries/package/register.json"]["data"]["version"] == 1
    assert files["submitted/summaries/binarize/binarize.json"]["data"]["final"]["epoch"] == 0
    stored = f"artifacts/{run}/jobs/{ids['export-evaluate-register']}/evaluate.json"
    assert json.loads(cluster.s3.read(stored)) == evaluation
    # and their epochs are the learning curves of `dvc plots show`, one line per training job
    shown = json.loads(dvc("plots", "show", "--json").stdout)
    assert not shown.get("errors"), shown["errors"]
    (curve,) = shown["data"]["cluster run, validation top-1 per epoch"]
    rows = curve["content"]["data"]["values"]
    for stage, epochs in (("pretrain", [0, 1]), ("binarize", [0]), ("finetune", [0])):
        assert [int(r["epoch"]) for r in rows if r["filename"].endswith(f"{stage}.csv")] == epochs, stage
    final = files["submitted/summaries/binarize/binarize.json"]["data"]["final"]["val_top1"]
    assert [float(r["val_top1"]) for r in rows if r["filename"].endswith("binarize.csv")] == [pytest.approx(final)]
    # the training ran on the worker nodes, tracked once per epoch on the MLflow server
    assert cluster.epochs_logged("dvc", "pretrain") == [[0, 1]]
    assert cluster.epochs_logged("dvc", "binarize") == [[0]]
    assert cluster.epochs_logged("dvc", "finetune") == [[0]]
    assert not (repo / "checkpoints").exists()  # the checkpoints live in the jobs and in S3, not here

    started = {sid: j["start_time"] for sid, j in jobs(cluster).items()}
    second = dvc("repro", "deploy/dvc.yaml")
    assert second.returncode == 0 and "submitted" not in second.stdout, second.stdout[-3000:]
    assert "didn't change" in second.stdout or "up to date" in second.stdout
    assert {sid: j["start_time"] for sid, j in jobs(cluster).items()} == started  # no job ran again

    # an experiment: finetune.lr changed; finetune and the package job rerun, nothing before them
    for cmd in (["git", "add", "-A"], ["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "run"]):
        subprocess.run(cmd, cwd=repo, check=True)
    exp = dvc("exp", "run", "deploy/dvc.yaml", "-S", "cluster.yaml:finetune.lr=0.0005")
    assert exp.returncode == 0, exp.stdout[-4000:] + exp.stderr[-4000:]
    changed = yaml.safe_load((repo / "cluster.yaml").read_text())
    assert changed["finetune"]["lr"] == 0.0005
    for group in ("finetune", "export-evaluate-register"):
        sid = submission_of(repo / "cluster.yaml", run, group.split("-"), monkeypatch)
        assert f"submitted {sid} " in exp.stdout, group
    assert not any(f"submitted {run}-{g}-" in exp.stdout for g in ("pretrain", "tune", "binarize"))
    shown = json.loads(dvc("exp", "show", "--json").stdout)
    experiments = [e for rev in shown for e in (rev.get("experiments") or [])]
    (mine,) = [e["revs"][0]["data"] for e in experiments if e.get("revs")]
    assert mine["params"]["cluster.yaml"]["data"]["finetune"]["lr"] == 0.0005
    assert mine["metrics"]["submitted/summaries/package/evaluate.json"]["data"]["images"] == 360
    table = dvc("exp", "show", "--only-changed", "--md", "--no-pager").stdout  # what a user reads
    assert "finetune.lr" in table and "0.0005" in table
    cluster.say("dvc exp show --only-changed --md:\n" + table.strip())

    # dvc push: the pointer folders into the S3 remote (.dvc/config's, pointed at the test bucket)
    assert dvc("remote", "modify", "--local", "storage", "url", f"s3://{cluster.s3.bucket}/dvc").returncode == 0
    pushed = dvc("push")
    assert pushed.returncode == 0, pushed.stdout[-3000:] + pushed.stderr[-3000:]
    keys = [o["Key"] for o in cluster.s3.client().list_objects_v2(Bucket=cluster.s3.bucket, Prefix="dvc/")["Contents"]]
    assert any(k.startswith("dvc/files/md5/") for k in keys) and "files pushed" in pushed.stdout
    cluster.say(f"dvc push: {pushed.stdout.strip().splitlines()[-1]}")

    # a re-shard: the manifest in the bucket changes, and every stage that reads the shards is stale
    manifest = cluster.s3.read("shards/manifest.json")
    cluster.s3.client().put_object(Bucket=cluster.s3.bucket, Key="shards/manifest.json", Body=manifest + b"\n")
    try:
        stale = json.loads(dvc("status", "--json", "deploy/dvc.yaml").stdout)
    finally:
        cluster.s3.client().put_object(Bucket=cluster.s3.bucket, Key="shards/manifest.json", Body=manifest)
    assert {k.split(":")[-1] for k in stale} == {"pretrain", "tune", "binarize", "finetune", "package"}, stale
    cluster.say(
        f"dvc repro: {len(groups)} jobs on the cluster, evaluate top-1 {evaluation['top1']:.4f}; rerun: none; "
        f"exp run -S finetune.lr: 2 jobs; push: {len(keys)} objects"
    )


def test_a_killed_submitter_reattaches_to_the_same_job(cluster, monkeypatch):
    """SIGKILL `bireal submit` while its job trains on the cluster (the laptop closes); the same
    command attaches to the running job instead of starting another, and writes the pointers."""
    run = "attach-run"
    params = cluster.params("attach", pretrain={"phase_epochs": [8, 0, 1]})
    cluster.bireal("shard", "--params", str(params), run_id=run, log="attach.log")
    cmd = ["submit", "--stage", "pretrain", "--params", str(params), "--address", cluster.ray.dashboard]
    cmd += ["--python", str(BIN / "python"), "--out", "submitted"]
    submitter = cluster.bireal(*cmd, run_id=run, wait=False, log="attach.log")
    sid = submission_of(params, run, ["pretrain"], monkeypatch)
    # mid-stage: the job runs and its first epoch is tracked
    wait_for(lambda: job(cluster, sid)["status"] == "RUNNING", 120, f"job {sid} running")
    wait_for(lambda: any(cluster.epochs_logged("attach", "pretrain")), 300, "the first epoch in MLflow")
    os.killpg(submitter.pid, signal.SIGKILL)
    submitter.wait(timeout=30)
    started = job(cluster, sid)["start_time"]
    assert job(cluster, sid)["status"] == "RUNNING"  # the job runs on without its submitter

    cluster.bireal(*cmd, run_id=run, log="attach.log")
    log = (cluster.root / "attach.log").read_text()
    assert f"submitted {sid}" in log and f"attached {sid}" in log, log[-3000:]
    record = job(cluster, sid)
    assert record["status"] == "SUCCEEDED" and record["start_time"] == started  # the same job, once
    assert [s for s in jobs(cluster) if s.startswith(run)] == [sid]
    assert cluster.epochs_logged("attach", "pretrain") == [list(range(9))]  # each epoch trained once
    out = cluster.work / "submitted"
    pointers = {p.name: json.loads(p.read_text()) for p in out.glob("*.pointer.json")}
    assert set(pointers) == {"pretrain-relu.pointer.json", "pretrain-clip.pointer.json", "pretrain.pointer.json"}
    assert all(published_matches(cluster, ref) for ref in pointers.values())
    assert json.loads((out / "pretrain.json").read_text())["final"]["epoch"] == 8
    cluster.say(f"killed submitter: reattached to {sid}, 9 epochs logged once each")


def test_the_prefect_flow_submits_its_stages_when_ray_address_is_a_job_server(cluster, monkeypatch):
    """The same flow as on one machine, with ``ray.address: http://HEAD:8265`` in the params file:
    each stage is a Ray job on the cluster (shard too), export + evaluate + register as one; the
    flow runs in a process of its own with Prefect's ephemeral API, as a user's script would."""
    run = "flow-run"
    params = cluster.params("flow", ray={"address": cluster.ray.dashboard}, tune={"out": "tune"})
    folder = cluster.root / "flow"
    folder.mkdir()
    env = {
        **cluster_env(),
        "BIREAL_PIPELINE_RUN": run,
        "BIREAL_JOB_PYTHON": str(BIN / "python"),  # the cluster's Python: this venv's
        "PREFECT_HOME": str(folder / ".prefect"),
    }
    script = (
        "import json, sys\n"
        "from pipeline.env import apply_offline_defaults\n"
        "apply_offline_defaults()\n"
        "from pipeline.flow import bireal_pipeline\n"
        "print('SUMMARY ' + json.dumps(bireal_pipeline(sys.argv[1]), default=str))\n"
    )

    def run_flow() -> dict:
        done = run_watched([str(BIN / "python"), "-c", script, str(params)], "the flow", cwd=folder, env=env)
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
        return json.loads(done.stdout.split("SUMMARY ", 1)[1].splitlines()[0])

    summary = run_flow()
    assert summary["evaluation"]["images"] == 360 and summary["registry"]["version"] == 1
    groups = ("shard", "pretrain", "tune", "binarize", "finetune", "export-evaluate-register")
    ids = {submission_of(params, run, g.split("-"), monkeypatch) for g in groups}
    assert {s for s in jobs(cluster) if s.startswith(run)} == ids
    assert all(jobs(cluster)[sid]["status"] == "SUCCEEDED" for sid in ids)
    assert (folder / "submitted" / "binarize" / "binarize.pointer.json").is_file()
    assert not (folder / "checkpoints").exists() and not (folder / "data").exists()  # all of it ran in jobs
    assert cluster.s3.read("shards/manifest.json") is not None  # the shard job wrote to the bucket
    assert cluster.epochs_logged("flow", "binarize") == [[0]]
    # a rerun: the training stages from Prefect's cache; the package job, never cached (it
    # registers), is found finished under its id and fetched, not run again
    started = {s: j["start_time"] for s, j in jobs(cluster).items() if s.startswith(run)}
    again = run_flow()
    assert again["evaluation"] == summary["evaluation"] and again["registry"] == summary["registry"]
    assert {s: j["start_time"] for s, j in jobs(cluster).items() if s.startswith(run)} == started
    cluster.say(f"prefect flow: {len(groups)} jobs on the cluster, top-1 {summary['evaluation']['top1']:.4f}")

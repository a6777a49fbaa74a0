"""`bireal submit` against a real Ray job server (the session's local Ray, dashboard on 127.0.0.1):
a stage submitted as a job, fetched without re-running once it succeeded, attached to after the
submitting process was killed, and a failed job's id refused unless --resubmit."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.params import load_params
from pipeline.storage import sha256_file

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def dashboard(ray_local):
    url = ray_local._private.worker.global_worker.node.address_info["webui_url"]
    return f"http://{url}"


def params_file(tmp_path, demo_shards, name="p.yaml", **stage) -> Path:
    path = tmp_path / name
    path.write_text(
        f"train: {{shards: {demo_shards}, out: {tmp_path / 'ckpt'}, width: 0.25, batch_size: 32, "
        "max_steps_per_epoch: 3}\n"
        "pretrain: {phase_epochs: [2, 0, 1]}\n"
        f"tune: {{enabled: false, out: {tmp_path / 'tune'}}}\n"
        f"storage: {{artifacts: {tmp_path / 'published'}}}\n"
        f"ray: {{num_workers: 1, storage_path: {tmp_path / 'ray_results'}}}\n"
        + "".join(f"{k}: {json.dumps(v)}\n" for k, v in stage.items())
    )
    return path


def job_info(dashboard, sid):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(dashboard).get_job_info(sid)


def test_submit_fetch_and_resubmit(dashboard, demo_shards, tmp_path, monkeypatch):
    from pipeline.adapters.ray_jobs import submit

    monkeypatch.setenv("BIREAL_PIPELINE_RUN", f"submit-{tmp_path.name}")
    params = load_params(params_file(tmp_path, demo_shards))
    out = tmp_path / "submitted"
    first = submit(params, "tune", dashboard, out, python=sys.executable, poll_s=0.5, timeout_s=180)
    assert (first["action"], first["status"]) == ("submitted", "SUCCEEDED")
    assert first["id"] == f"submit-{tmp_path.name}-tune"
    summary = json.loads((out / "tune.json").read_text())
    assert summary["enabled"] is False and Path(summary["files"]["best"]).is_file()
    started = job_info(dashboard, first["id"]).start_time
    again = submit(params, "tune", dashboard, out, python=sys.executable, poll_s=0.5)
    assert again["action"] == "fetched" and job_info(dashboard, first["id"]).start_time == started  # not re-run

    # a stage that fails: its id is not reused silently
    broken = load_params(params_file(tmp_path, demo_shards, "broken.yaml", binarize={"shards": str(tmp_path / "none")}))
    with pytest.raises(RuntimeError, match="ended FAILED"):
        submit(broken, "binarize", dashboard, out, python=sys.executable, poll_s=0.5, timeout_s=180)
    with pytest.raises(RuntimeError, match="--resubmit"):
        submit(broken, "binarize", dashboard, out, python=sys.executable)
    failed_at = job_info(dashboard, f"submit-{tmp_path.name}-binarize").start_time
    with pytest.raises(RuntimeError, match="ended FAILED"):
        submit(broken, "binarize", dashboard, out, resubmit=True, python=sys.executable, poll_s=0.5, timeout_s=180)
    assert job_info(dashboard, f"submit-{tmp_path.name}-binarize").start_time > failed_at  # a new job, same id


def test_a_killed_submitter_reattaches_and_gets_the_pointers(dashboard, demo_shards, tmp_path):
    env = {**os.environ, "BIREAL_PIPELINE_RUN": f"attach-{tmp_path.name}"}
    path = params_file(tmp_path, demo_shards)
    cmd = [sys.executable, "-m", "pipeline.cli", "submit", "--stage", "pretrain", "--params", str(path)]
    cmd += ["--address", dashboard, "--python", sys.executable, "--out", str(tmp_path / "submitted")]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sid = f"attach-{tmp_path.name}-pretrain"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if str(job_info(dashboard, sid).status).endswith("RUNNING"):
                break
        except RuntimeError:
            pass
        time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)  # the laptop closes; the job runs on
    proc.wait(timeout=30)
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert f"attached {sid}" in again.stdout or f"fetched {sid}" in again.stdout
    pointers = {p.name: json.loads(p.read_text()) for p in (tmp_path / "submitted").glob("*.pointer.json")}
    assert set(pointers) == {"pretrain-relu.pointer.json", "pretrain-clip.pointer.json", "pretrain.pointer.json"}
    for ref in pointers.values():  # each names the published file by its digest
        assert sha256_file(ref["uri"]) == ref["sha256"]


def test_submit_needs_a_dashboard_address_and_a_sound_profile(demo_shards, tmp_path, capsys, monkeypatch):
    from pipeline.cli import main

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    path = params_file(tmp_path, demo_shards)
    assert main(["submit", "--stage", "tune", "--params", str(path)]) == 2
    assert "--address http://HEAD:8265" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text((Path(__file__).parents[1] / "pipeline/configs/imagenet_bireal18_official.yaml").read_text())
    bad.write_text(bad.read_text().replace("num_workers: 4", "num_workers: 8"))
    assert main(["submit", "--stage", "binarize", "--params", str(bad), "--address", "http://127.0.0.1:1"]) == 2
    assert "binarize.lr is 0.001" in capsys.readouterr().err
    # a from-scratch recipe has no pretrain stage: recorded as skipped, no job, no cluster needed
    scratch = params_file(tmp_path, demo_shards, "scratch.yaml", pretrain={"phase_epochs": [0, 0, 0]})
    out = tmp_path / "out"
    assert (
        main(
            [
                "submit",
                "--stage",
                "pretrain",
                "--params",
                str(scratch),
                "--address",
                "http://127.0.0.1:1",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert "skipped" in json.loads((out / "pretrain.json").read_text())


def test_dvc_drives_the_cluster_run_and_a_second_repro_does_nothing(dashboard, demo_shards, tmp_path):
    """deploy/dvc.yaml in a new git repo: `dvc repro` submits every stage as a job (export, evaluate
    and register as one, since they hand each other the artifact) and tracks what comes back; a
    second `dvc repro` submits nothing."""
    import shutil

    repo = tmp_path / "repo"
    (repo / "deploy").mkdir(parents=True)
    shutil.copy(ROOT / "deploy" / "dvc.yaml", repo / "deploy" / "dvc.yaml")
    params = params_file(repo, demo_shards, "tiny.yaml")
    (repo / "deploy" / "dvc-run.yaml").write_text(
        f"params: {params.name}\naddress: {dashboard}\nout: submitted\npython: {sys.executable}\n"
    )
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env["BIREAL_PIPELINE_RUN"] = f"dvc-{tmp_path.name}"

    def dvc(*args):
        return subprocess.run(
            [str(Path(sys.executable).parent / "dvc"), *args],
            cwd=repo,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )

    for cmd in (["git", "init", "-q"], ["git", "add", "-A"]):
        subprocess.run(cmd, cwd=repo, check=True)
    assert dvc("init", "-q").returncode == 0
    first = dvc("repro", "deploy/dvc.yaml")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    for job in ("pretrain", "tune", "binarize", "finetune", "export-evaluate-register"):
        assert f"submitted dvc-{tmp_path.name}-{job} " in first.stdout, job
    pointer = json.loads((repo / "submitted" / "binarize" / "binarize.pointer.json").read_text())
    assert sha256_file(pointer["uri"]) == pointer["sha256"]
    evaluation = json.loads((repo / "submitted" / "package" / "evaluate.json").read_text())
    assert evaluation["images"] > 0 and 0 <= evaluation["top1"] <= 1
    assert json.loads((repo / "submitted" / "package" / "register.json").read_text())["version"]
    second = dvc("repro", "deploy/dvc.yaml")
    assert second.returncode == 0 and "submitted" not in second.stdout, second.stdout
    assert "didn't change" in second.stdout or "up to date" in second.stdout

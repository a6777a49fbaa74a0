"""`bireal submit` against a real Ray job server (the session's local Ray, dashboard on 127.0.0.1):
a stage submitted as a job, fetched without re-running once it succeeded, and a failed job's id
refused unless --resubmit; a profile that breaks a cluster rule refused before any submission.
On the multi-node cluster (tests/test_cluster_submit.py): `dvc repro deploy/dvc.yaml`, a killed
submitter attaching again, and the Prefect flow."""

import json
import sys
import threading
from pathlib import Path

import pytest
import yaml

from pipeline.params import load_params

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def dashboard(ray_local):
    url = ray_local._private.worker.global_worker.node.address_info["webui_url"]
    return f"http://{url}"


def params_file(tmp_path, demo_shards, name="p.yaml", **sections) -> Path:
    """The submit tests' params file; a keyword replaces that whole section."""
    params = {
        "train": {
            "shards": str(demo_shards),
            "out": str(tmp_path / "ckpt"),
            "width": 0.25,
            "batch_size": 32,
            "max_steps_per_epoch": 3,
        },
        "pretrain": {"phase_epochs": [2, 0, 1]},
        "tune": {"enabled": False, "out": str(tmp_path / "tune")},
        "storage": {"artifacts": str(tmp_path / "published")},
        "ray": {"num_workers": 1, "storage_path": str(tmp_path / "ray_results")},
    }
    path = tmp_path / name
    path.write_text(yaml.safe_dump({**params, **sections}, sort_keys=False))
    return path


def job_info(dashboard, sid):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(dashboard).get_job_info(sid)


def test_submit_fetch_and_resubmit(dashboard, demo_shards, tmp_path, monkeypatch):
    from pipeline.adapters.ray_jobs import submission_id, submit

    monkeypatch.setenv("BIREAL_PIPELINE_RUN", f"submit-{tmp_path.name}")
    params = load_params(params_file(tmp_path, demo_shards))
    out = tmp_path / "submitted"
    shown: list[str] = []
    first = submit(params, "tune", dashboard, out, python=sys.executable, poll_s=0.5, timeout_s=180, echo=shown.append)
    assert (first["action"], first["status"]) == ("submitted", "SUCCEEDED")
    assert f"({dashboard}/#/jobs/{first['id']})" in shown[0]  # the job's page in the Ray dashboard
    streamed = [line for line in shown[1:] if line.startswith(f"[{first['id']}] ")]
    assert any("tuning disabled" in line for line in streamed)  # the job's own output, streamed as it ran
    assert first["id"].startswith(f"submit-{tmp_path.name}-tune-")
    # the summary comes from shared storage, where the job wrote it under its id, not from its log
    stored = tmp_path / "published" / params.group / "jobs" / first["id"] / "tune.json"
    summary = json.loads((out / "tune.json").read_text())
    assert summary == json.loads(stored.read_text())
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
    broken_id = submission_id(broken, ["binarize"])
    failed_at = job_info(dashboard, broken_id).start_time
    with pytest.raises(RuntimeError, match="ended FAILED"):
        submit(broken, "binarize", dashboard, out, resubmit=True, python=sys.executable, poll_s=0.5, timeout_s=180)
    assert job_info(dashboard, broken_id).start_time > failed_at  # a new job, same id

    # the same pipeline run id with an edited params file: a new job runs, the old one is not fetched
    edited = load_params(params_file(tmp_path, demo_shards, "edited.yaml", binarize={"lr": 5e-4}))
    assert edited.group == params.group and submission_id(edited, ["tune"]) != first["id"]
    third = submit(edited, "tune", dashboard, out, python=sys.executable, poll_s=0.5, timeout_s=180)
    assert third["action"] == "submitted" and third["id"] == submission_id(edited, ["tune"])


def test_two_racing_submitters_end_attached_to_one_job(dashboard, demo_shards, tmp_path, monkeypatch):
    """Both submitters find no job (a barrier holds them after the status check), both submit; the
    job server takes one, and the other attaches to that job instead of failing."""
    from pipeline.adapters import ray_jobs

    monkeypatch.setenv("BIREAL_PIPELINE_RUN", f"race-{tmp_path.name}")
    params = load_params(params_file(tmp_path, demo_shards))
    barrier, first_look = threading.Barrier(2), threading.local()
    real_status = ray_jobs.job_status

    def status_after_both_looked(client, sid):
        status = real_status(client, sid)
        if not getattr(first_look, "done", False):
            first_look.done = True
            barrier.wait(timeout=60)
        return status

    monkeypatch.setattr(ray_jobs, "job_status", status_after_both_looked)
    results = [None, None]

    def run(i):
        results[i] = ray_jobs.submit(
            params, "tune", dashboard, tmp_path / f"out{i}", python=sys.executable, poll_s=0.5, timeout_s=180
        )

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r["action"] for r in results) == ["attached", "submitted"]
    assert results[0]["id"] == results[1]["id"] and all(r["status"] == "SUCCEEDED" for r in results)


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
    # the summaries need shared storage; DVC's shard folder must be the one the params train on
    nowhere = params_file(tmp_path, demo_shards, "nowhere.yaml", storage={"artifacts": ""})
    assert main(["submit", "--stage", "tune", "--params", str(nowhere), "--address", "http://127.0.0.1:1"]) == 2
    assert "storage.artifacts is empty: a submitted job writes its stage summaries there" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)  # no ./params.yaml: the typed defaults, and the error says so
    monkeypatch.delenv("BIREAL_PARAMS", raising=False)
    assert main(["submit", "--stage", "tune", "--address", "http://127.0.0.1:1"]) == 2
    defaults = "params.yaml (no such file: the defaults): storage.artifacts is empty"
    assert defaults in capsys.readouterr().err
    other = ["--shards", "s3://elsewhere/shards", "--address", "http://127.0.0.1:1"]
    assert main(["submit", "--stage", "tune", "--params", str(path), *other]) == 2
    assert f"--shards s3://elsewhere/shards is not {path}'s train.shards {demo_shards}" in capsys.readouterr().err
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
                "--summaries",
                str(tmp_path / "metrics"),
            ]
        )
        == 0
    )
    assert "skipped" in json.loads((tmp_path / "metrics" / "pretrain.json").read_text())
    curve = (tmp_path / "metrics" / "pretrain.csv").read_text().splitlines()  # deploy/dvc.yaml's out, no rows
    assert len(curve) == 1 and curve[0].startswith("epoch,segment,")

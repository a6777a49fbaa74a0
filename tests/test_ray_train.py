"""The stages as Ray Train jobs (2 gloo workers), MLflow read back, and resume after a kill."""

import threading
import time
from pathlib import Path

import mlflow
import psutil
import pytest
import yaml

import bireal_core as bc
from pipeline.params import load_params
from pipeline.stages import train as run_train_stage

pytestmark = pytest.mark.e2e  # starts services (make test-fast leaves it out)


def write_params(tmp: Path, shards: Path, **train) -> Path:
    params = {
        "train": {
            "shards": str(shards),
            "out": str(tmp / "ckpt"),
            "width": 0.25,
            "batch_size": 32,
            "max_steps_per_epoch": 6,
            "lr": 0.003,
            **train,
        },
        "pretrain": {"phase_epochs": [1, 0, 1]},
        "binarize": {"epochs": 2},
        "finetune": {"epochs": 1, "lr": 0.001},
        "ray": {"num_workers": 2, "cpus_per_worker": 1, "storage_path": str(tmp / "ray_results"), "max_failures": 2},
        "mlflow": {
            "tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}",
            "artifact_location": str(tmp / "artifacts"),
            "experiment": "bireal-test",
        },
    }
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


@pytest.fixture(scope="module")
def ray_pipeline(ray_local, demo_shards, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ray_pipeline")
    params = write_params(tmp, demo_shards)
    results = {
        stage: run_train_stage(stage, load_params(params), metrics_out=str(tmp / "metrics" / f"{stage}.json"))
        for stage in ("pretrain", "binarize", "finetune")
    }
    return tmp, results


def test_three_stages_on_two_ray_workers(ray_pipeline):
    tmp, results = ray_pipeline
    assert [h["segment"] for h in results["pretrain"]["history"]] == ["pretrain-relu", "pretrain-clip"]
    assert [h["epoch"] for h in results["binarize"]["history"]] == [0, 1]
    for stage, result in results.items():
        assert Path(result["checkpoint"]).is_file()
        final = result["final"]
        assert final["train_images"] == 6 * 32 * 2  # both ranks' batches, summed
        assert final["val_images"] == 360  # each test sample once over 2 ranks
        assert (tmp / "metrics" / f"{stage}.json").is_file()
    model, header = bc.load_checkpoint(results["finetune"]["checkpoint"])
    assert header["stage"] == "finetune" and len(header["config"]["class_names"]) == 10


def test_mlflow_runs_read_back_from_sqlite(ray_pipeline):
    tmp, results = ray_pipeline
    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}")
    exp = client.get_experiment_by_name("bireal-test")
    runs = client.search_runs([exp.experiment_id])
    assert {r.data.tags["bireal.stage"] for r in runs} == {"pretrain", "binarize", "finetune"}
    assert len({r.data.tags["bireal.pipeline_run"] for r in runs}) == 1  # grouped
    for run in runs:
        stage = run.data.tags["bireal.stage"]
        assert run.info.status == "FINISHED"
        assert run.info.run_id == results[stage]["mlflow_run_id"]
        assert run.data.params["train.stage"] == stage and run.data.params["ray.num_workers"] == "2"
        epochs = len(results[stage]["history"])
        for key in ("val_top1", "val_top5", "train_loss", "lr", "flip_ratio", "img_s"):
            steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
            assert steps == list(range(epochs)), (stage, key, steps)  # every epoch exactly once
        assert run.data.metrics["cost_memory_mbit"] > 0 and run.data.metrics["cost_ops"] > 0
        artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "checkpoint")]
        assert artifacts == [f"checkpoint/{stage}.safetensors"]
        assert "cost_summary.json" in [a.path for a in client.list_artifacts(run.info.run_id)]


def _kill_a_worker_mid_epoch(storage: Path, done: threading.Event, killed: list):
    """After the first epoch's checkpoint is in Ray's storage, SIGKILL one training worker."""
    deadline = time.time() + 120
    while time.time() < deadline and not done.is_set():
        # Two epochs persisted (the first is surely registered with the controller); two remain.
        if len(list(storage.glob("*/checkpoint_*"))) >= 2:
            for p in psutil.process_iter(["pid", "cmdline"]):
                if "RayTrainWorker" in " ".join(p.info["cmdline"] or []):
                    p.kill()
                    killed.append(p.info["pid"])
                    return
        time.sleep(0.05)


def test_resume_after_killed_worker(ray_local, demo_shards, tmp_path):
    params = write_params(tmp_path, demo_shards, max_steps_per_epoch=20, init="scratch")
    done, killed = threading.Event(), []
    watcher = threading.Thread(target=_kill_a_worker_mid_epoch, args=(tmp_path / "ray_results", done, killed))
    watcher.start()
    try:
        result = run_train_stage("binarize", load_params(params), overrides={"epochs": 4})
    finally:
        done.set()
        watcher.join()
    assert killed, "no worker was killed"
    history = result["history"]
    assert [h["epoch"] for h in history] == [0, 1, 2, 3]  # every epoch recorded exactly once
    assert history[0]["restarts"] == 0  # epoch 0 was not re-run ...
    assert history[-1]["restarts"] >= 1  # ... the job resumed after it
    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    steps = [m.step for m in client.get_metric_history(result["mlflow_run_id"], "val_top1")]
    assert steps == [0, 1, 2, 3]

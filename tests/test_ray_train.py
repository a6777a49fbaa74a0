"""A Ray Train stage resumes after a killed worker (the three stages on 2 gloo workers and their
MLflow runs are checked on the DVC end-to-end run, tests/test_dvc.py)."""

import threading
import time
from pathlib import Path

import mlflow
import psutil
import pytest
import yaml

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


def _kill_a_worker_mid_epoch(storage: Path, done: threading.Event, killed: list):
    """After the first epoch's checkpoint is in Ray's storage, SIGKILL one training worker. Waits on
    the training itself (``done``), not on a clock: on a loaded machine the epochs come later."""
    while not done.is_set():
        # Two epochs persisted (the first is surely registered with the controller); two remain.
        if len(list(storage.glob("*/checkpoint_*"))) >= 2:
            for p in psutil.process_iter(["pid", "cmdline"]):
                if "RayTrainWorker" in " ".join(p.info["cmdline"] or []):
                    niceness = p.nice()
                    p.kill()
                    killed.append((p.info["pid"], niceness))
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
    (_, niceness), ours = killed[0], psutil.Process().nice()
    assert niceness == ours, f"a train worker at niceness {niceness}, this process {ours} (pipeline/env.py)"
    history = result["history"]
    assert [h["epoch"] for h in history] == [0, 1, 2, 3]  # every epoch recorded exactly once
    assert history[0]["restarts"] == 0  # epoch 0 was not re-run ...
    assert history[-1]["restarts"] >= 1  # ... the job resumed after it
    assert [h["packed_convs"] for h in history] == [16] * 4  # DDP on the packed kernels, restart included
    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    steps = [m.step for m in client.get_metric_history(result["mlflow_run_id"], "val_top1")]
    assert steps == [0, 1, 2, 3]


def _interrupt_after_the_first_epoch(storage: Path, done: threading.Event, sent: list):
    """Ctrl-C (SIGINT to this process, as a terminal sends it) once two epochs' checkpoints are
    stored (the first is then surely registered with the controller)."""
    import os
    import signal

    while not done.is_set():
        if len(list(storage.glob("*/checkpoint_*"))) >= 2:
            os.kill(os.getpid(), signal.SIGINT)
            sent.append(True)
            return
        time.sleep(0.05)


def test_ctrl_c_aborts_the_stage_as_an_interrupt_and_the_stage_resumes(ray_local, demo_shards, tmp_path):
    """Ray Train's SIGINT handler aborts the run, and its get() then ended the driver with a bare
    SystemExit(1): `bireal train` printed nothing and exited 1. It is a KeyboardInterrupt now (the
    CLI's one line and exit 130), and the same stage run again resumes after the stored epoch."""
    params = write_params(tmp_path, demo_shards, max_steps_per_epoch=6, init="scratch")
    done, sent = threading.Event(), []
    watcher = threading.Thread(target=_interrupt_after_the_first_epoch, args=(tmp_path / "ray_results", done, sent))
    watcher.start()
    try:
        with pytest.raises(KeyboardInterrupt, match="binarize: interrupted; Ray Train aborted the run"):
            run_train_stage("binarize", load_params(params), overrides={"epochs": 4})
    finally:
        done.set()
        watcher.join()
    assert sent
    history = run_train_stage("binarize", load_params(params), overrides={"epochs": 4})["history"]
    assert [h["epoch"] for h in history] == [0, 1, 2, 3]
    assert history[0]["restarts"] == 0 and history[-1]["restarts"] == 1  # resumed after a stored epoch


def test_a_request_the_local_ray_instance_cannot_hold_is_refused(ray_local, demo_shards, tmp_path):
    """GPU workers on a machine without GPUs (or more CPUs than it has) used to wait forever: Ray
    queues a placement it cannot fill, and `bireal train` sat silent until killed. The stage and
    the search now refuse it, naming the keys, before a worker starts or MLflow is written to."""
    from pipeline.adapters.ray_tune import run_tune
    from pipeline.params import TuneSettings

    have = ray_local.cluster_resources()
    gpus, cpus = int(have.get("GPU", 0)), int(have["CPU"])
    params = load_params(write_params(tmp_path, demo_shards))
    params.ray.use_gpu, params.ray.num_workers = True, gpus + 1
    with pytest.raises(RuntimeError, match=rf"needs {gpus + 1} GPU \(the Ray instance has {gpus}\): .*ray.use_gpu"):
        run_train_stage("binarize", params)
    params.ray.use_gpu, params.ray.num_workers = False, cpus + 1
    with pytest.raises(RuntimeError, match=rf"needs {cpus + 1} CPU \(the Ray instance has {cpus}\): lower"):
        run_train_stage("binarize", params)
    assert not (tmp_path / "mlflow.db").exists() and not list((tmp_path / "ray_results").glob("*/"))  # no run
    settings = TuneSettings(cpus_per_trial=1, gpus_per_trial=gpus + 1, storage_path=str(tmp_path / "tune"))
    with pytest.raises(RuntimeError, match=rf"a tune trial .* needs {gpus + 1} GPU"):
        run_tune(settings, params.train("binarize"))


def test_a_ranks_own_error_ends_the_stage_not_rays_wrapper(ray_local, demo_shards, tmp_path):
    """A shard changed after sharding, found by a rank's loader: the stage fails with that rank's
    ShardIntegrityError (what `bireal train` prints as one line), where it raised Ray's
    WorkerGroupError, whose message is every rank's traceback."""
    import shutil

    from pipeline.shard_read import ShardIntegrityError

    shards = tmp_path / "shards"
    shutil.copytree(demo_shards, shards)
    for tar in shards.glob("train-*.tar"):  # every rank reads a damaged shard in its first epoch
        data = bytearray(tar.read_bytes())
        data[5000] ^= 0xFF
        tar.write_bytes(bytes(data))
    params = load_params(write_params(tmp_path, shards, init="scratch", max_steps_per_epoch=2))
    params.ray.max_failures = 0
    with pytest.raises(ShardIntegrityError, match=r"train-\d+\.tar: size/sha256 mismatch") as caught:
        run_train_stage("binarize", params, overrides={"epochs": 1})
    assert type(caught.value.__cause__).__name__ == "WorkerGroupError"  # Ray's, kept as the cause

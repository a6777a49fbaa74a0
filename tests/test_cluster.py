"""The pipeline on a cluster, with real services on loopback (tests/cluster_services.py): shards,
Ray checkpoints and stage outputs in S3 (moto), tracking on an MLflow server with PostgreSQL and
S3 artifacts, and a Ray cluster whose worker nodes see neither the driver's work folder nor each
other's disks. The driver is the `bireal` CLI in a subprocess, as a user runs it.

Marked ``cluster`` (and ``e2e``). Without the privilege to make mount namespaces (``unshare``) or
without PostgreSQL the suite skips with the reason; with BIREAL_REQUIRE_CLUSTER=1 (.ci/run) that
skip is a failure instead.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
import yaml
from cluster_services import wait_for, wait_progressing

pytestmark = [pytest.mark.cluster, pytest.mark.e2e]


def test_the_cluster_runs_in_a_network_namespace_of_its_own(cluster):
    """Ray's worker nodes listen on every interface; here every process of the suite (S3,
    PostgreSQL, MLflow, the head, both worker nodes) is in a network namespace whose only interface
    is loopback, so none of those sockets is reachable from the host's network."""
    import re

    from cluster_services import network_namespace

    assert cluster.netns and cluster.netns != cluster.host_netns
    pids = cluster.memory.pids()
    namespaces = {network_namespace(pid) for pid in pids} - {""}
    assert namespaces == {cluster.netns}, namespaces
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    assert re.findall(r"^\d+: ([^:@]+)", links, re.M) == ["lo"]
    listening = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True, check=True).stdout.split("\n")
    local = [line.split()[3] for line in listening if line.split()]
    wildcard = [address for address in local if address.startswith(("0.0.0.0:", "*:", "[::]:"))]
    assert wildcard  # what the namespace is for: Ray binds these on every interface
    cluster.say(f"network: {len(pids)} processes in {cluster.netns}, only lo; {len(wildcard)} wildcard listeners")


def test_pipeline_across_nodes_with_shared_storage(cluster):
    """shard -> pretrain -> binarize -> finetune -> export -> evaluate -> register, every training
    worker on a node that cannot see the driver's folder: what a later stage needs travels via S3."""
    params = cluster.params("e2e")
    run = "e2e-run"
    cluster.bireal("shard", "--params", str(params), run_id=run)
    for stage in ("pretrain", "binarize", "finetune", "export", "evaluate", "register"):
        cluster.bireal("run", stage, "--params", str(params), run_id=run)

    keys = set(cluster.s3.keys())
    assert "shards/manifest.json" in keys and any(k.startswith("shards/train-") for k in keys)
    for name in ("pretrain-relu", "pretrain-clip", "pretrain", "binarize", "finetune"):
        assert f"artifacts/{run}/{name}.safetensors" in keys and f"artifacts/{run}/{name}.safetensors.sha256" in keys
    for stage in ("pretrain", "binarize", "finetune"):
        assert cluster.ray_checkpoints(f"{run}-{stage}"), f"no Ray checkpoint of {stage} in S3"
    assert any(k.startswith("mlflow/") for k in keys)  # MLflow's artifacts (registered model) in S3

    # the driver's finetune checkpoint is the one the workers published (they wrote theirs to a tmpfs)
    published = cluster.s3.client().get_object(Bucket="bireal", Key=f"artifacts/{run}/finetune.safetensors.sha256")
    from pipeline.storage import sha256_file

    local = cluster.work / "checkpoints" / "finetune.safetensors"
    assert sha256_file(local) == published["Body"].read().decode().strip()

    # MLflow on PostgreSQL: each stage one run, every epoch exactly once
    assert cluster.epochs_logged("e2e", "pretrain") == [[0, 1]]
    assert cluster.epochs_logged("e2e", "binarize") == [[0]]
    assert cluster.epochs_logged("e2e", "finetune") == [[0]]
    evaluation = json.loads((cluster.work / "metrics" / "evaluate.json").read_text())
    assert evaluation["images"] == 360 and 0.0 <= evaluation["top1"] <= 1.0

    # nothing in the driver's folder but the params file, the declared outputs and the driver's
    # copies of the stage checkpoints
    written = {str(p.relative_to(cluster.work)) for p in cluster.work.rglob("*") if p.is_file()}
    # (data/demo_digits: the demo source rendered as JPEGs for `bireal shard`, the pipeline's input)
    allowed_dirs = ("checkpoints/", "metrics/", "artifacts/", "plots/", "data/demo_digits/")
    assert [w for w in sorted(written) if not (w.startswith(allowed_dirs) or w == "e2e.yaml")] == []
    assert not (cluster.work / "mlflow.db").exists() and not (cluster.work / "ray_results").exists()
    cluster.say(
        f"end to end: {len(keys)} objects in S3, stage checkpoints published with sha256, "
        f"epochs per stage run {[cluster.epochs_logged('e2e', s) for s in ('pretrain', 'binarize', 'finetune')]}"
    )
    assert {p.name for p in (cluster.work / "checkpoints").iterdir() if p.is_file()} == {
        f"{n}.safetensors" for n in ("pretrain-relu", "pretrain-clip", "pretrain", "binarize", "finetune")
    }


def test_killed_driver_resumes_from_storage(cluster):
    """SIGKILL the driver once two epochs' checkpoints are in S3; the same command with the same
    pipeline run id continues the Ray run and its MLflow run: no epoch trained or logged twice."""
    # 21 short epochs: the kill lands mid-stage however fast the machine (an idle one trains 6 of
    # these epochs before the checkpoint listing sees two)
    params = cluster.params("resume", pretrain={"phase_epochs": [20, 0, 1]}, train={"max_steps_per_epoch": 4})
    run = "resume-run"
    cluster.bireal("shard", "--params", str(params), run_id=run, log="resume.log")
    driver = cluster.bireal("run", "pretrain", "--params", str(params), run_id=run, wait=False, log="resume.log")
    wait_for(lambda: len(cluster.ray_checkpoints(f"{run}-pretrain")) >= 2, 300, "two checkpoints in S3")
    assert driver.poll() is None  # the fault lands mid-stage: the driver is still training
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait(timeout=30)
    killed = time.time()
    # the job's actors die with their owner, the driver: wait until no train worker is left
    wait_for(lambda: not cluster.ray.processes("ray::RayTrainWo"), 120, "the killed job's train workers to exit")
    cluster.say(f"killed driver: its train workers were gone {time.time() - killed:.1f} s later")
    at_kill = cluster.stage_history(f"{run}-pretrain")  # the newest checkpoint (its controller is gone)
    latest = len(at_kill) - 1
    assert 1 <= latest < 20, latest  # stopped mid-stage, after two checkpoints

    cluster.bireal("run", "pretrain", "--params", str(params), run_id=run, log="resume.log")
    assert cluster.epochs_logged("resume", "pretrain") == [list(range(21))]  # one run, each epoch once
    # what the workers trained, from Ray's results in S3 (MLflow skips steps it has: it cannot tell)
    history = cluster.stage_history(f"{run}-pretrain")
    assert [h["epoch"] for h in history] == list(range(21))
    resumed = [h for h in history if h["restarts"] >= 1]
    assert resumed and resumed[0]["epoch"] == latest + 1  # resumed at the epoch after the latest checkpoint
    assert all(h["restarts"] == 0 for h in history[: latest + 1])  # nothing up to it trained again
    assert {h["resumed_from_epoch"] for h in resumed} == {latest}
    assert resumed[0]["restored_sha256"] == at_kill[-1]["weights_sha256"]  # its weights, not an older one's
    from mlflow.tracking import MlflowClient

    client = MlflowClient(cluster.mlflow.uri)
    (stage_run,) = client.search_runs(
        [client.get_experiment_by_name("resume").experiment_id], "tags.`bireal.stage` = 'pretrain'"
    )
    restarts = {m.step: m.value for m in client.get_metric_history(stage_run.info.run_id, "restarts")}
    assert restarts[0] == 0 and restarts[20] >= 1, restarts  # the last epochs ran after a restore
    log = (cluster.root / "resume.log").read_text()
    cluster.say(f"killed driver after {latest + 1} checkpointed epochs of 21: resumed at {latest + 1} from its weights")
    assert "Traceback" not in log.split("pretrain")[-1]


def test_worker_node_lost_mid_stage(cluster):
    """SIGKILL every process of one worker node once two checkpoints are in S3, then add a fresh
    node: Ray Train restarts the worker group from the last checkpoint and every epoch is logged once."""
    # 13 short epochs: the kill lands mid-stage however fast the machine (asserted below)
    params = cluster.params("nodeloss", pretrain={"phase_epochs": [12, 0, 1]}, train={"max_steps_per_epoch": 4})
    run = "nodeloss-run"
    cluster.bireal("shard", "--params", str(params), run_id=run, log="nodeloss.log")
    driver = cluster.bireal("run", "pretrain", "--params", str(params), run_id=run, wait=False, log="nodeloss.log")
    wait_for(lambda: len(cluster.ray_checkpoints(f"{run}-pretrain")) >= 2, 300, "two checkpoints in S3")
    assert driver.poll() is None  # mid-stage
    victim = sorted(cluster.ray.nodes)[0]
    cluster.ray.kill_node(victim)
    at_kill = len(cluster.stage_history(f"{run}-pretrain"))
    assert 2 <= at_kill < 13, at_kill
    cluster.ray.add_node(cpus=1)
    log = cluster.root / "nodeloss.log"
    assert wait_progressing(driver, [log], "the stage") == 0, log.read_text()[-4000:]
    assert cluster.epochs_logged("nodeloss", "pretrain") == [list(range(13))]
    history = cluster.stage_history(f"{run}-pretrain")  # what the workers trained, from S3
    assert [h["epoch"] for h in history] == list(range(13))
    resumed = [h for h in history if h["restarts"] >= 1]
    assert resumed, "no restart: the node's loss did not reach the worker group"
    restored = resumed[0]["resumed_from_epoch"]
    # from the latest checkpoint registered by the kill (one reported just before it may follow)
    assert restored >= at_kill - 1 and resumed[0]["epoch"] == restored + 1
    assert all(h["restarts"] == 0 for h in history[: restored + 1])  # nothing up to it trained again
    assert resumed[0]["restored_sha256"] == history[restored]["weights_sha256"]
    cluster.say(
        f"node {victim} killed after {at_kill} checkpointed epochs: resumed at epoch {restored + 1} from "
        f"epoch {restored}'s weights, epochs logged once each, {len(cluster.ray.nodes)} nodes started in all"
    )


def test_storage_stall_during_a_stage(cluster):
    """SIGSTOP the S3 server for 15 s, 3x the clients' request timeout (storage.request_timeout_s:
    5 s, a scaled clock), while a stage reads shards and uploads checkpoints: the requests time out
    and are retried with backoff (s3fs and pyarrow), so the stage finishes with no worker restart
    and every epoch once."""
    params = cluster.params(
        "stall",
        pretrain={"phase_epochs": [8, 0, 1]},
        train={"max_steps_per_epoch": 4},
        storage={"request_timeout_s": 5},
    )
    run = "stall-run"
    cluster.bireal("shard", "--params", str(params), run_id=run, log="stall.log")
    driver = cluster.bireal("run", "pretrain", "--params", str(params), run_id=run, wait=False, log="stall.log")
    wait_for(lambda: len(cluster.ray_checkpoints(f"{run}-pretrain")) >= 1, 300, "a checkpoint in S3")
    assert driver.poll() is None  # mid-stage
    os.killpg(cluster.s3.proc.pid, signal.SIGSTOP)
    time.sleep(15)
    os.killpg(cluster.s3.proc.pid, signal.SIGCONT)
    at_stall = len(cluster.stage_history(f"{run}-pretrain"))
    assert at_stall < 9, at_stall  # the stall landed before the stage's end
    log = cluster.root / "stall.log"
    assert wait_progressing(driver, [log], "the stage") == 0, log.read_text()[-4000:]
    assert cluster.epochs_logged("stall", "pretrain") == [list(range(9))]
    history = cluster.stage_history(f"{run}-pretrain")
    assert [h["epoch"] for h in history] == list(range(9))
    assert all(h["restarts"] == 0 for h in history)  # waited out and retried, not restarted
    cluster.say(f"S3 server stopped for 15 s after {at_stall} epochs: the stage finished with no restart")


def test_tune_loses_a_node_and_is_restored(cluster):
    """A search whose trials run on both worker nodes loses one node mid-trial, once each trial has
    a checkpoint; the same command, run again once a fresh node has joined, restores the experiment
    from S3: every trial finishes, none is started twice, no epoch is logged twice."""
    params = cluster.params(
        "tunefault",
        pretrain={"phase_epochs": [1, 0, 1]},
        train={"max_steps_per_epoch": 4},
        tune={
            "enabled": True,
            "activations": ["approx_sign", "ste_sign"],
            "inits": ["clip"],
            "seeds": [0],
            "epochs": 4,
            "asha": False,
            "max_concurrent": 2,
            "cpus_per_trial": 1,
            "out": "tune",
        },
    )
    run = "tune-run"
    cluster.bireal("shard", "--params", str(params), run_id=run, log="tune.log")
    cluster.bireal("run", "pretrain", "--params", str(params), run_id=run, log="tune.log")
    driver = cluster.bireal("run", "tune", "--params", str(params), run_id=run, wait=False, log="tune.log")

    def checkpointed_trials() -> set[str]:  # tune/<experiment>/<trial>/checkpoint_*/train_state.pt
        return {k.split("/")[2] for k in cluster.s3.keys("tune/") if k.endswith("/train_state.pt")}

    # both trials mid-search with a checkpoint each: the lost node's trial resumes from its own
    wait_for(lambda: len(checkpointed_trials()) == 2, 300, "a checkpoint of each trial in S3")
    victim = next(ip for ip, proc in sorted(cluster.ray.nodes.items()) if proc.poll() is None)
    cluster.ray.kill_node(victim)
    wait_progressing(driver, [cluster.root / "tune.log"], "the search")  # it ends with the lost node's trial errored
    cluster.ray.add_node(cpus=1)
    cluster.bireal("run", "tune", "--params", str(params), run_id=run, log="tune.log")

    table = json.loads((cluster.work / "tune" / "table.json").read_text())
    log = (cluster.root / "tune.log").read_text()[-6000:]
    assert len(table["trials"]) == 2 and all(t["status"] == "TERMINATED" for t in table["trials"]), (table, log)
    assert all(t["epochs"] == 4 for t in table["trials"]), (table, log)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(cluster.mlflow.uri)
    exp = client.get_experiment_by_name("tunefault")
    kids = client.search_runs([exp.experiment_id], "tags.`bireal.stage` = 'tune-trial'")
    assert len(kids) == 2  # no trial started twice
    steps = [sorted(m.step for m in client.get_metric_history(k.info.run_id, "val_top1")) for k in kids]
    cluster.say(f"tune: node {victim} killed mid-search; after restore each trial's epochs {steps}")
    assert all(s == [0, 1, 2, 3] for s in steps), steps

    # a second search (another seed: another experiment) loses a node while both trials run and
    # before either has a checkpoint: the lost trial starts over and still finishes every epoch
    first_search = {k.split("/")[1] for k in cluster.s3.keys("tune/")}
    second = cluster.params(
        "tunefault2",
        pretrain={"phase_epochs": [1, 0, 1]},
        train={"max_steps_per_epoch": 16},  # a first epoch long enough to land the kill inside it
        tune={**yaml.safe_load(params.read_text())["tune"], "seeds": [1], "epochs": 3},
    )
    driver = cluster.bireal("run", "tune", "--params", str(second), run_id=run, wait=False, log="tune.log")

    def trial_runs() -> list:
        exp = client.get_experiment_by_name("tunefault2")
        return [] if exp is None else client.search_runs([exp.experiment_id], "tags.`bireal.stage` = 'tune-trial'")

    def second_checkpoints() -> set[str]:
        return {k for k in cluster.s3.keys("tune/") if k.split("/")[1] not in first_search and "/checkpoint_" in k}

    wait_for(lambda: len(trial_runs()) == 2, 300, "both trials of the second search running")
    victim = next(ip for ip, proc in sorted(cluster.ray.nodes.items()) if proc.poll() is None)
    before_kill = second_checkpoints()
    cluster.ray.kill_node(victim)
    assert not before_kill, before_kill  # the fault landed before any trial's first checkpoint
    wait_progressing(driver, [cluster.root / "tune.log"], "the second search")
    cluster.ray.add_node(cpus=1)
    cluster.bireal("run", "tune", "--params", str(second), run_id=run, log="tune.log")
    table = json.loads((cluster.work / "tune" / "table.json").read_text())
    assert [t["seed"] for t in table["trials"]] == [1, 1]  # this search's table
    assert all(t["status"] == "TERMINATED" and t["epochs"] == 3 for t in table["trials"]), table
    kids = trial_runs()
    assert len(kids) == 2  # the lost trial kept its run
    steps = [sorted(m.step for m in client.get_metric_history(k.info.run_id, "val_top1")) for k in kids]
    assert all(s == [0, 1, 2] for s in steps), steps
    cluster.say(f"tune: node {victim} killed before any checkpoint; after restore each trial's epochs {steps}")


def test_gpu_scheduling_without_gpus(cluster):
    """Nodes that advertise 2 logical GPUs each, ray.use_gpu with ray.backend: gloo (training runs
    on the CPU): 4 workers, 2 per node, local ranks 0 and 1 on each, as the stage run records them."""
    for ip in [ip for ip, proc in cluster.ray.nodes.items() if proc.poll() is None]:
        cluster.ray.kill_node(ip)  # (the CPU-only nodes: room for the GPU ones on 2 cores)
    gpu_nodes = {cluster.ray.add_node(cpus=1, gpus=2), cluster.ray.add_node(cpus=1, gpus=2)}
    params = cluster.params(
        "gpus",
        ray={"use_gpu": True, "backend": "gloo", "num_workers": 4, "cpus_per_worker": 0.5},
        pretrain={"phase_epochs": [1, 0, 0]},
        train={"max_steps_per_epoch": 2, "batch_size": 8},  # placement is the point: small activations
    )
    run = "gpus-run"
    cluster.bireal("shard", "--params", str(params), run_id=run, log="gpus.log")
    cluster.bireal("run", "pretrain", "--params", str(params), run_id=run, log="gpus.log")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(cluster.mlflow.uri)
    (stage_run,) = client.search_runs(
        [client.get_experiment_by_name("gpus").experiment_id], "tags.`bireal.stage` = 'pretrain'"
    )
    import mlflow

    mlflow.set_tracking_uri(cluster.mlflow.uri)
    placement = mlflow.artifacts.load_dict(f"runs:/{stage_run.info.run_id}/placement.json")
    cluster.say(f"placement: {placement}")
    assert sorted(p["world_rank"] for p in placement) == [0, 1, 2, 3]
    by_node: dict[str, list[int]] = {}
    for p in placement:
        by_node.setdefault(p["node_ip"], []).append(p["local_rank"])
    assert set(by_node) == gpu_nodes and all(sorted(r) == [0, 1] for r in by_node.values())
    assert {p["device"] for p in placement} == {"cpu"}

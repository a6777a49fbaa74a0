"""`dvc repro` of the whole pipeline in a temp git copy of the project (demo data, tiny settings),
re-run selectivity, and a bad params.yaml rejected before any stage runs."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml
from cluster_services import run_watched

import bireal_core as bc
from pipeline.cli import main

pytestmark = pytest.mark.e2e  # starts services (make test-fast leaves it out)

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run(cmd, cwd, ray_address="", **kw):
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    if ray_address:  # join the test session's cluster instead of booting one per stage
        env["RAY_ADDRESS"] = ray_address
    return run_watched(cmd, cwd=cwd, env=env, **kw)


@pytest.fixture(scope="module")
def dvc_copy(tmp_path_factory, ray_local):
    """The tracked files of this checkout in a new git repo, with tiny params."""
    dst = tmp_path_factory.mktemp("dvc_copy")
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if f != "dvc.lock":
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dst / f)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["train"].update({"max_steps_per_epoch": 3, "batch_size": 32})
    params["pretrain"]["phase_epochs"] = [1, 0, 1]
    params["binarize"]["epochs"] = 1
    params["tune"].update({"max_steps_per_epoch": 2, "inits": ["clip"], "activations": ["approx_sign"]})  # 1 trial
    params["mlflow"] = {
        "tracking_uri": f"sqlite:///{dst / 'mlflow.db'}",
        "artifact_location": str(dst / "mlartifacts"),
        "experiment": "dvc-test",
        "system_metrics_s": 1,  # stages of seconds: sample each second
    }
    params["registry"] = {"model_name": "dvc-test"}
    (dst / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for cmd in (
        ["git", "init", "-q"],
        ["git", "add", "-A"],
        ["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "copy"],
    ):
        subprocess.run(cmd, cwd=dst, check=True)
    address = ray_local.get_runtime_context().gcs_address
    result = run([str(BIN / "dvc"), "repro"], dst, ray_address=address)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    repro_output(dst).write_text(result.stdout + result.stderr)
    return dst


def repro_output(copy: Path) -> Path:
    """What `dvc repro` printed in the copy (kept beside it, out of its git tree)."""
    return copy.with_name(copy.name + ".repro.log")


def test_repro_prints_the_stages_not_the_frameworks_info_lines(dvc_copy):
    """Without --verbose the terminal shows the stages' tables; MLflow's INFO lines (its database
    set-up, its system-metrics monitor starting and stopping, four per training stage) and its
    warnings stay off it."""
    printed = repro_output(dvc_copy).read_text()
    assert "Running stage 'finetune'" in printed and "val_top1" in printed
    for noise in (" INFO mlflow", "UserWarning"):  # the second: MLflow's type-hint advice, at register
        assert noise not in printed, [line for line in printed.splitlines() if noise in line][:5]


def test_repro_runs_every_stage_and_registers(dvc_copy):
    metrics = json.loads(run([str(BIN / "dvc"), "metrics", "show", "--json"], dvc_copy).stdout)
    files = next(iter(metrics.values()))["data"]
    assert {
        "metrics/pretrain.json",
        "metrics/binarize.json",
        "metrics/finetune.json",
        "metrics/evaluate.json",
        "metrics/registry.json",
    } <= set(files)
    registry = files["metrics/registry.json"]["data"]
    assert registry["name"] == "dvc-test" and registry["version"] == 1 and registry["champion"]
    assert files["metrics/evaluate.json"]["data"]["images"] == 360
    assert (dvc_copy / "artifacts" / "model.safetensors").is_file()
    assert json.loads((dvc_copy / "tune" / "best.json").read_text())["config"]["init"] == "clip"
    assert run([str(BIN / "dvc"), "status", "--json", "dvc.yaml"], dvc_copy).stdout.strip() == "{}"


TRAINING = {"pretrain": 2, "binarize": 1, "finetune": 1}  # epochs each stage runs in the copy


def test_training_stages_ran_on_two_ray_workers(dvc_copy):
    for stage in TRAINING:
        final = json.loads((dvc_copy / "metrics" / f"{stage}.json").read_text())
        assert final["train_images"] == 3 * 32 * 2, stage  # both ranks' batches, summed
        assert final["val_images"] == 360, stage  # each test sample once over 2 ranks
    model, header = bc.load_checkpoint(dvc_copy / "checkpoints" / "finetune.safetensors")
    assert header["stage"] == "finetune" and len(header["config"]["class_names"]) == 10


def test_mlflow_runs_read_back_from_sqlite(dvc_copy):
    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{dvc_copy / 'mlflow.db'}")
    exp = client.get_experiment_by_name("dvc-test")
    runs = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("bireal.stage") in TRAINING]
    assert sorted(r.data.tags["bireal.stage"] for r in runs) == sorted(TRAINING)
    assert len({r.data.tags["bireal.pipeline_run"] for r in runs}) == 1  # grouped
    for run in runs:
        stage = run.data.tags["bireal.stage"]
        assert run.info.status == "FINISHED"
        assert run.data.params["train.stage"] == stage and run.data.params["ray.num_workers"] == "2"
        for key in ("val_top1", "val_top5", "train_loss", "lr", "flip_ratio", "img_s", "data_wait_fraction"):
            steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
            assert steps == list(range(TRAINING[stage])), (stage, key, steps)  # every epoch exactly once
        assert all(0 < m.value <= 1 for m in client.get_metric_history(run.info.run_id, "data_wait_fraction"))
        # the node's system metrics, from one of its two Ray workers (one monitor per node)
        system = {key for key in run.data.metrics if key.startswith("system/")}
        assert "system/node0/cpu_utilization_percentage" in system, (stage, sorted(system))
        assert {key.split("/")[1] for key in system} == {"node0"}
        assert run.data.metrics["cost_memory_mbit"] > 0 and run.data.metrics["cost_ops"] > 0
        artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "checkpoint")]
        assert artifacts == [f"checkpoint/{stage}.safetensors"]
        assert "cost_summary.json" in [a.path for a in client.list_artifacts(run.info.run_id)]
        # lineage: the shard manifest it trained on, by URI and sha256, with its counts
        (inp,) = client.get_run(run.info.run_id).inputs.dataset_inputs
        manifest = dvc_copy / "data" / "shards" / "manifest.json"
        digest = hashlib.sha256(manifest.read_bytes()).hexdigest()
        assert (
            inp.dataset.digest == digest[:16] and {t.key: t.value for t in inp.tags}["mlflow.data.context"] == "train"
        )
        assert json.loads(inp.dataset.source)["uri"] == str(manifest)
        profile = json.loads(inp.dataset.profile)
        assert profile["sha256"] == digest and profile["splits"] == {"train": 1437, "test": 360}


def test_dvc_plots_draw_every_training_epoch(dvc_copy):
    """`dvc plots show`: the top-level learning curves hold each training stage's epochs, as its
    metrics JSON ended them; the confusion matrix and the tune table are there too. DVC reads every
    dvc.yaml of the repo: the only files it misses are the cluster pipeline's (deploy/dvc.yaml's,
    under submitted/), which did not run here, as its metrics are missing from `dvc metrics show`."""
    shown = json.loads(run([str(BIN / "dvc"), "plots", "show", "--json"], dvc_copy).stdout)
    missing = {(e["name"], e["source"].split("/")[0]) for e in shown.get("errors", [])}
    cluster_curves = {f"cluster run, {what} per epoch" for what in ("validation top-1", "training loss")}
    assert missing <= {(name, "submitted") for name in cluster_curves}, missing
    plots = shown["data"]
    assert {"validation top-1 per epoch", "training loss per epoch", "plots/confusion.csv", "tune/table.csv"} <= set(
        plots
    )
    (curve,) = plots["validation top-1 per epoch"]
    rows = curve["content"]["data"]["values"]
    for stage, epochs in TRAINING.items():
        mine = [r for r in rows if r["filename"].endswith(f"{stage}.csv")]  # the paths past their common prefix
        assert [int(r["epoch"]) for r in mine] == list(range(epochs)), stage
        final = json.loads((dvc_copy / "metrics" / f"{stage}.json").read_text())
        assert float(mine[-1]["val_top1"]) == pytest.approx(final["val_top1"]), stage


def test_summary_after_the_run(dvc_copy):
    done = run([str(BIN / "bireal"), "summary"], dvc_copy)
    assert done.returncode == 0, done.stderr
    lines = dict(line.split(None, 1) for line in done.stdout.splitlines() if line.strip())
    assert "0.00 Mbit" not in lines["packed"] and "smaller than the float checkpoint" in lines["packed"]
    assert "on 360 test images" in lines["top-1"]
    assert "training graph in float" in lines["speed"]
    assert "dvc-test version 1 (champion): models:/dvc-test@champion" in lines["registry"]


def test_changing_one_param_reruns_only_dependents(dvc_copy):
    params = yaml.safe_load((dvc_copy / "params.yaml").read_text())
    params["finetune"]["lr"] = 0.0005
    (dvc_copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = json.loads(run([str(BIN / "dvc"), "status", "--json", "dvc.yaml"], dvc_copy).stdout)
    assert set(status) == {"finetune"}  # downstream stages follow when its outs change
    dry = run([str(BIN / "dvc"), "repro", "--dry"], dvc_copy).stdout
    assert "Running stage 'finetune'" in dry and "Running stage 'binarize'" not in dry
    assert "Running stage 'pretrain'" not in dry and "Running stage 'shard'" not in dry


def test_an_experiment_records_its_metrics_and_curves(dvc_copy, ray_local):
    """`dvc exp run -S`: the experiment reruns finetune and what follows, and `dvc exp show` and
    `dvc plots diff` read its metrics and its epochs (metrics/ and plots/ are not git-ignored: an
    experiment's commit holds them, as DVC keeps outputs with cache: false in git)."""
    for cmd in (["git", "add", "-A"], ["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "run"]):
        subprocess.run(cmd, cwd=dvc_copy, check=True)
    tracked = subprocess.run(["git", "ls-files"], cwd=dvc_copy, capture_output=True, text=True).stdout.split()
    assert {"metrics/evaluate.json", "plots/epochs/finetune.csv", "tune/best.json", "dvc.lock"} <= set(tracked)
    assert not [f for f in tracked if f.startswith(("checkpoints/", "artifacts/", "data/"))]  # DVC's, not git's
    address = ray_local.get_runtime_context().gcs_address
    done = run([str(BIN / "dvc"), "exp", "run", "-S", "finetune.lr=0.0002"], dvc_copy, ray_address=address)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Running stage 'finetune'" in done.stdout and "Running stage 'binarize'" not in done.stdout
    shown = json.loads(run([str(BIN / "dvc"), "exp", "show", "--json"], dvc_copy).stdout)
    (exp,) = [r for rev in shown for e in (rev.get("experiments") or []) for r in e["revs"]]
    assert exp["data"]["params"]["params.yaml"]["data"]["finetune"]["lr"] == 0.0002
    evaluation = exp["data"]["metrics"]["metrics/evaluate.json"]
    assert "error" not in evaluation and evaluation["data"]["images"] == 360, evaluation
    curves = json.loads(run([str(BIN / "dvc"), "plots", "diff", "HEAD", exp["name"], "--json"], dvc_copy).stdout)
    (curve,) = curves["data"]["validation top-1 per epoch"]
    finetune = [r for r in curve["content"]["data"]["values"] if r["filename"].endswith("finetune.csv")]
    assert sorted(r["rev"] for r in finetune) == sorted(["HEAD", exp["name"]])  # each run's one epoch


def test_bad_params_rejected_before_any_stage(tmp_path, capsys):
    bad = tmp_path / "params.yaml"
    bad.write_text("train:\n  out: " + str(tmp_path / "ckpt") + "\n  batch_size: many\n")
    assert main(["train", "--stage", "binarize", "--params", str(bad)]) == 2
    assert "params.yaml:train.batch_size: expected an integer, got 'many'" in capsys.readouterr().err
    bad.write_text("binarize:\n  init: imagenet\n")
    assert main(["shard", "--source", "demo", "--out", str(tmp_path / "s"), "--params", str(bad)]) == 2
    assert (
        "params.yaml:binarize.init: 'imagenet' is not one of scratch, relu, relu_control, clip"
        in capsys.readouterr().err
    )
    bad.write_text("trian:\n  epochs: 3\n")
    assert main(["check-params", "--params", str(bad)]) == 2
    assert "trian: unknown section" in capsys.readouterr().err
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "s").exists()  # nothing ran

"""The Prefect flow under Prefect's test harness: runs the stage functions, caches, summarizes."""

import mlflow
import pytest
import yaml

from pipeline.stages import STAGE_TABLE

pytestmark = pytest.mark.e2e  # starts services (make test-fast leaves it out)


@pytest.fixture(scope="module")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness():
        yield


def flow_params(tmp_path, shards, experiment: str, **sections) -> dict:
    """Tiny settings for a whole flow run, everything under tmp_path; ``sections`` replace."""
    params = {
        "data": {"source": "demo"},
        "shard": {"samples_per_shard": 100},
        "train": {
            "shards": str(shards),
            "out": str(tmp_path / "ckpt"),
            "width": 0.25,
            "batch_size": 32,
            "max_steps_per_epoch": 3,
        },
        "pretrain": {"phase_epochs": [1, 0, 1]},
        "binarize": {"epochs": 1},
        "finetune": {"epochs": 1},
        "tune": {
            "activations": ["approx_sign"],
            "inits": ["clip"],
            "max_steps_per_epoch": 2,
            "storage_path": str(tmp_path / "ray_results"),
            "out": str(tmp_path / "tune"),
        },
        "mlflow": {
            "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
            "artifact_location": str(tmp_path / "mlartifacts"),
            "experiment": experiment,
            "system_metrics_s": 1,  # stages of seconds: sample each second
        },
        "registry": {"model_name": experiment},
    }
    return {**params, **sections}


def test_flow_runs_caches_and_summarizes(prefect_harness, ray_local, demo_shards, tmp_path, monkeypatch):
    from prefect.artifacts import Artifact

    from pipeline.flow import bireal_pipeline

    params = flow_params(tmp_path, demo_shards, "flow-test")
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)  # metrics/, artifacts/ land in the temp folder
    summary = bireal_pipeline(str(path), use_ray=False)
    assert summary["evaluation"]["images"] == 360 and 0 <= summary["evaluation"]["top1"] <= 1
    assert summary["registry"]["version"] == 1 and summary["registry"]["champion"]
    assert set(summary["stages"]) == {"pretrain", "binarize", "finetune"}
    assert summary["ran"] == [s.name for s in STAGE_TABLE]  # every stage of the table, tune included
    assert (tmp_path / "artifacts" / "model.safetensors").is_file()
    artifact = Artifact.get("bireal-pipeline-summary")
    assert "top-1" in artifact.data and "flow-test version 1" in artifact.data

    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("flow-test")

    def stage_runs():
        training = ("pretrain", "binarize", "finetune")
        return [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("bireal.stage") in training]

    assert len(stage_runs()) == 3
    for run in stage_runs():  # this machine's use, sampled while each stage trained
        assert run.data.metrics["system/node0/cpu_utilization_percentage"] >= 0, run.data.tags["bireal.stage"]
        assert 0 <= run.data.metrics["data_wait_fraction"] <= 1
    again = bireal_pipeline(str(path), use_ray=False)  # cached: no stage trains again
    assert len(stage_runs()) == 3
    assert again["registry"]["duplicate"] and again["registry"]["version"] == 1
    assert again["evaluation"] == summary["evaluation"]

"""Locations (pipeline/storage.py) and the cluster settings, without a cluster: publishing and
fetching with sha256, `pipe:` shard folders, stable run names, the check that a Ray address comes
with shared locations only, and where the loopback-only settings apply. Object storage itself is
exercised by tests/test_cluster.py against a real S3 server."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from dataclasses import asdict

import pytest

from pipeline import storage
from pipeline.params import ConfigError, RayConfig, TrainConfig, load_params


def test_publish_then_fetch_checks_the_digest(tmp_path):
    src = tmp_path / "model.safetensors"
    src.write_bytes(b"weights" * 1000)
    digest = storage.publish(src, str(tmp_path / "store" / "run" / "model.safetensors"))
    assert (tmp_path / "store" / "run" / "model.safetensors.sha256").read_text().strip() == digest
    got = storage.fetch(str(tmp_path / "store" / "run" / "model.safetensors"), tmp_path / "copy" / "m.safetensors")
    assert got.read_bytes() == src.read_bytes()
    (tmp_path / "store" / "run" / "model.safetensors").write_bytes(b"torn")  # a torn or stale object
    with pytest.raises(OSError, match="does not match its published"):
        storage.fetch(str(tmp_path / "store" / "run" / "model.safetensors"), tmp_path / "copy" / "m.safetensors")
    assert got.read_bytes() == src.read_bytes()  # the good local copy is left as it was
    assert not list((tmp_path / "copy").glob(".*partial"))  # nor the torn one's temporary file
    with pytest.raises(FileNotFoundError):
        storage.fetch(str(tmp_path / "store" / "nothing.safetensors"), tmp_path / "x")


def test_fetched_copies_have_the_processs_file_mode(tmp_path):
    """A fetched file, as any file this process writes, is 0666 less the umask: tempfile's 0600
    would keep a fetched artifact from a model server or a user of another uid."""
    src = tmp_path / "model.safetensors"
    src.write_bytes(b"weights")
    storage.publish(src, str(tmp_path / "store" / "model.safetensors"))
    old = os.umask(0o022)
    try:
        got = storage.fetch(str(tmp_path / "store" / "model.safetensors"), tmp_path / "copy" / "m.safetensors")
        assert stat.S_IMODE(got.stat().st_mode) == 0o644
        partial = storage.new_partial(tmp_path / "copy" / "m.safetensors")
        assert partial.name.startswith(".m.safetensors.") and partial.name.endswith(".partial")
        assert stat.S_IMODE(partial.stat().st_mode) == 0o644 and partial.stat().st_size == 0
        assert storage.new_partial(tmp_path / "copy" / "m.safetensors") != partial  # each writer its own
    finally:
        os.umask(old)


def test_locations_and_endpoint_options(monkeypatch):
    assert storage.is_url("s3://b/k") and storage.is_url("gs://b/k")
    assert not storage.is_url("file:///tmp/x") and not storage.is_url("data/shards")
    assert not storage.is_local("pipe:cat x") and storage.is_local("data/shards")
    assert storage.join("s3://b/a/", "/run", "x.safetensors") == "s3://b/a/run/x.safetensors"
    monkeypatch.setenv(storage.ENDPOINT_ENV, "http://127.0.0.1:9000")
    monkeypatch.setenv(storage.TIMEOUT_ENV, "5")  # storage.request_timeout_s: waited, then retried
    assert storage.options("s3://b/k") == {
        "endpoint_url": "http://127.0.0.1:9000",
        "config_kwargs": {
            "connect_timeout": 5.0,
            "read_timeout": 5.0,
            "retries": {"max_attempts": storage.RETRIES, "mode": "standard"},
        },
    }
    assert storage.options("/local/path") == {}
    fs, path = storage.pyarrow_filesystem("s3://bucket/ray")
    assert path == "bucket/ray" and type(fs).__name__ == "S3FileSystem"
    assert storage.pyarrow_filesystem("/tmp/ray") == (None, "/tmp/ray")


def test_s3_without_credentials_is_one_line(tmp_path, capsys, monkeypatch):
    """botocore's NoCredentialsError is not an OSError: it ended `bireal shard` and `evaluate` in a
    traceback. Now one line says where credentials come from."""
    from pipeline.cli import main

    for name in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance role to ask
    assert main(["shard", "--verify", "s3://no-bucket/shards"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bireal shard: error: S3: Unable to locate credentials (credentials come from")
    assert len(err.strip().splitlines()) == 1 and "$AWS_ACCESS_KEY_ID" in err


def test_shards_through_a_pipe_command(demo_shards):
    """A `pipe:` location: the manifest and every shard read through the command's stdout."""
    from pipeline.data import iter_shard, read_manifest, split_shards

    location = f"pipe:cat {demo_shards}"
    manifest = read_manifest(location)
    assert manifest == json.loads((demo_shards / "manifest.json").read_text())
    url, count = split_shards(manifest, location, "test")[0]
    assert url.startswith("pipe:cat ") and sum(1 for _ in iter_shard(url)) == count


def _cluster_params(tmp_path, **sections):
    import yaml

    raw = {
        "ray": {"address": "10.0.0.1:6379", "storage_path": "s3://b/ray"},
        "train": {"shards": "s3://b/shards"},
        "tune": {"storage_path": "s3://b/tune"},
        "storage": {"artifacts": "s3://b/artifacts"},
        "mlflow": {"tracking_uri": "http://mlflow:5000"},
    }
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_a_ray_address_needs_shared_locations(tmp_path):
    params = load_params(_cluster_params(tmp_path))
    assert params.train("binarize").artifacts == f"s3://b/artifacts/{params.group}"  # <artifacts>/<run>
    cases = {
        "binarize.shards": {"binarize": {"shards": "data/shards"}},
        "ray.storage_path": {"ray": {"storage_path": "ray_results"}},
        "tune.storage_path": {"tune": {"storage_path": "/mnt/local"}},
        "storage.artifacts": {"storage": {"artifacts": ""}},
        "mlflow.tracking_uri": {"mlflow": {"tracking_uri": "sqlite:///mlflow.db"}},
        "mlflow.artifact_location": {"mlflow": {"artifact_location": "mlartifacts"}},
    }
    for key, change in cases.items():
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as e:
            load_params(_cluster_params(tmp_path, **change))
        assert "ray.address is '10.0.0.1:6379'" in str(e.value)
    # the same local locations are fine on one machine
    load_params(_cluster_params(tmp_path, ray={"address": ""}, train={"shards": "data/shards"}))


def test_a_password_in_an_address_is_never_a_setting_and_never_shown(tmp_path, monkeypatch):
    """A params file is committed, tracked by DVC and copied to the cluster with every job: a URL
    in it that carries a password is refused, naming the key. From $MLFLOW_TRACKING_URI (the
    environment, as MLflow reads it) the address is used, and what the pipeline writes or says of
    it (links in the run summary, the `bireal summary` hint, the cluster rule) leaves the user out."""
    from pipeline.flow import _links
    from pipeline.summary import mlflow_ui

    assert storage.without_credentials("http://bob:s3cret@mlflow:5000/x?y=1") == "http://mlflow:5000/x?y=1"
    assert storage.without_credentials("postgresql://bob:s3cret@db/mlflow") == "postgresql://db/mlflow"
    assert storage.without_credentials("sqlite:////data/mlflow.db") == "sqlite:////data/mlflow.db"
    assert storage.scrub_credentials("API request to http://bob:s3cret@h/api failed", "http://bob:s3cret@h") == (
        "API request to http://h/api failed"
    )
    assert [storage.has_password(v) for v in ("http://bob:s3cret@h", "ssh://git@h", "http://[::1", 5)] == [
        True, False, False, False,
    ]  # fmt: skip

    said = {}
    for section, key in (("mlflow", "tracking_uri"), ("storage", "endpoint_url"), ("ray", "address")):
        path = _cluster_params(tmp_path, **{section: {key: "http://bob:s3cret@10.0.0.2:5000"}})
        with pytest.raises(ConfigError) as refused:
            load_params(path)
        said[section] = str(refused.value)
        assert said[section].startswith(f"{path}:{section}.{key}: the address 'http://10.0.0.2:5000' carries")
        assert "the password of user 'bob'" in said[section] and "s3cret" not in said[section]
    assert "$MLFLOW_TRACKING_USERNAME and $MLFLOW_TRACKING_PASSWORD" in said["mlflow"]
    assert "MLFLOW" not in said["storage"]

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://bob:s3cret@10.0.0.2:5000")
    params = load_params(_cluster_params(tmp_path, mlflow={"tracking_uri": ""}))
    assert params.mlflow.tracking_uri == "http://bob:s3cret@10.0.0.2:5000"  # what MLflow's client is given
    links = _links({"pretrain": {"mlflow_run_id": "abc"}, "register": {"name": "m", "version": 3}}, params)
    assert links == {
        "pretrain": {"mlflow_run": "http://10.0.0.2:5000/#/runs/abc"},
        "register": {"mlflow_model": "http://10.0.0.2:5000/#/models/m/versions/3"},
    }
    assert mlflow_ui(params) == "the MLflow UI at http://10.0.0.2:5000"


def test_check_params_names_the_local_location(tmp_path):
    path = _cluster_params(tmp_path, ray={"storage_path": "ray_results"})
    out = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "check-params", "--params", str(path)], capture_output=True, text=True
    )
    assert out.returncode != 0 and "ray.storage_path must be shared storage" in out.stderr + out.stdout


def test_run_names_and_claims(tmp_path, demo_shards, monkeypatch):
    """A relaunch resumes its run when only operational settings changed (loader workers, the folder
    it runs from), refuses naming what changed when the math did, and removes the run's
    checkpoints only with --restart."""
    from pipeline.adapters.ray_train import InputsChanged, claim_run, run_name, stage_run

    config = TrainConfig(stage="pretrain", shards=str(demo_shards), out="checkpoints")
    ray_cfg = RayConfig(resume="auto")
    assert run_name(config, ray_cfg, "run-7") == "run-7-pretrain"
    fresh = {run_name(config, RayConfig(resume="never"), "run-7") for _ in range(2)}
    assert len(fresh) == 2 and all(n.startswith("run-7-pretrain-") for n in fresh)

    run = stage_run(config, ray_cfg, "run-7")
    root = str(tmp_path / "ray")
    assert claim_run(root, run) is False  # nothing to resume
    (tmp_path / "ray" / "run-7-pretrain").mkdir()  # Ray's run folder of that launch
    (tmp_path / "ray" / "run-7-pretrain" / "checkpoint_000001").mkdir()
    assert claim_run(root, run) is True  # same inputs: resume it
    # fewer loader workers after an OOM, relaunched from another folder: the same run, resumed
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    operational = stage_run(
        TrainConfig(**{**asdict(config), "loader_workers": 0, "kernels": "float"}), ray_cfg, "run-7"
    )
    assert operational.digest == run.digest and claim_run(root, operational) is True
    # another lr and seed: refused, naming both, and nothing removed
    changed = stage_run(TrainConfig(**{**asdict(config), "lr": 0.5, "seed": 3}), ray_cfg, "run-7")
    with pytest.raises(InputsChanged, match=r"inputs changed .*\(lr, seed\).*pass --restart"):
        claim_run(root, changed)
    assert (tmp_path / "ray" / "run-7-pretrain" / "checkpoint_000001").is_dir()
    assert claim_run(root, changed, restart=True) is False  # --restart: discarded, started over
    assert not (tmp_path / "ray" / "run-7-pretrain").exists()


def test_loopback_settings_only_for_a_local_ray():
    """`ray start --address` aborts under RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: the CLI's defaults
    must not set it; only starting a local Ray instance does."""
    code = (
        "import os; from pipeline.env import apply_offline_defaults, apply_local_ray_defaults\n"
        "apply_offline_defaults(); print(os.environ.get('RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER'))\n"
        "apply_local_ray_defaults(); print(os.environ.get('RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER'))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "GLOO_SOCKET_IFNAME")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split() == ["None", "0"]


def test_runtime_env_carries_the_storage_settings(monkeypatch):
    from pipeline.adapters.ray_train import job_runtime_env

    monkeypatch.setenv(storage.ENDPOINT_ENV, "http://s3.internal:9000")
    monkeypatch.delenv(storage.CACHE_ENV, raising=False)
    monkeypatch.delenv(storage.TIMEOUT_ENV, raising=False)
    cfg = RayConfig(runtime_env={"env_vars": {"NCCL_DEBUG": "INFO"}, "excludes": ["data/"]})
    assert job_runtime_env(cfg) == {
        "env_vars": {storage.ENDPOINT_ENV: "http://s3.internal:9000", "NCCL_DEBUG": "INFO"},
        "excludes": ["data/"],
    }

"""The control planes closed, shown by behaviour on loopback (deploy/kuberay/security.yaml and
mlflow.yaml configure the same on Kubernetes; tests/test_deploy.py checks those files):
- Ray's token authentication: a job server that answers 401 without the token, and `bireal submit`
  that works with the token in its environment and fails clearly without it;
- MLflow's basic-auth app: 401 without a user, and a user with the default READ permission cannot
  move the `champion` alias, while the admin can;
- stage runs log an allow-list of params: a runtime_env's values (tokens) never reach MLflow."""

from __future__ import annotations

import json
import os
import secrets
import sys
import time
import urllib.error
import urllib.request

import pytest
from cluster_services import MlflowServer, TokenRayHead, run_watched

pytestmark = pytest.mark.services


def _status(url: str, headers: dict | None = None) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


# ---------------------------------------------------------------------------- Ray


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A Ray head with token authentication on and its dashboard (the job server) on 127.0.0.1."""
    head = TokenRayHead(tmp_path_factory.mktemp("ray_token"), secrets.token_hex(16))
    yield head.url, head.token
    head.close()


def test_the_job_server_wants_the_token(ray_head):
    url, token = ray_head
    assert _status(f"{url}/api/jobs/") == 401
    assert _status(f"{url}/api/jobs/", {"Authorization": "Bearer not-the-token"}) == 403
    assert _status(f"{url}/api/jobs/", {"Authorization": f"Bearer {token}"}) == 200
    submit = json.dumps({"entrypoint": "echo owned"}).encode()
    request = urllib.request.Request(f"{url}/api/jobs/", data=submit, headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as refused:  # nobody runs code without the token
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 401


def test_bireal_submit_sends_the_token_from_its_environment(ray_head, tmp_path, demo_shards):
    url, token = ray_head
    params = tmp_path / "p.yaml"
    params.write_text(
        f"train: {{shards: {demo_shards}}}\ntune: {{enabled: false, out: {tmp_path / 'tune'}}}\n"
        f"storage: {{artifacts: {tmp_path / 'artifacts'}}}\n"  # where the job writes its summary
    )
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    base.update({"BIREAL_PIPELINE_RUN": f"token-{tmp_path.name}", "HOME": str(tmp_path)})  # no ~/.ray token
    cmd = [sys.executable, "-m", "pipeline.cli", "submit", "--stage", "tune", "--params", str(params)]
    cmd += ["--address", url, "--python", sys.executable, "--out", str(tmp_path / "submitted")]
    refused = run_watched(cmd, env=base, cwd=tmp_path)
    assert refused.returncode == 2 and "token" in refused.stderr.lower(), refused.stderr[-2000:]
    assert not (tmp_path / "submitted").exists()
    with_token = {**base, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    done = run_watched(cmd, env=with_token, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "submitted" in done.stdout and (tmp_path / "submitted" / "tune.json").is_file()


# ---------------------------------------------------------------------------- MLflow


@pytest.fixture(scope="module")
def mlflow_auth(tmp_path_factory):
    """MLflow's basic-auth app: default permission READ, its users in their own database."""
    root = tmp_path_factory.mktemp("mlflow_auth")
    admin = ("admin", secrets.token_hex(12))
    config = root / "basic_auth.ini"
    config.write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = sqlite:///{root / 'auth.db'}\nadmin_username = {admin[0]}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    env = {
        "MLFLOW_AUTH_CONFIG_PATH": str(config),
        "MLFLOW_AUTH_ADMIN_PASSWORD": admin[1],
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
    }
    server = MlflowServer(root, f"sqlite:///{root / 'mlflow.db'}", str(root / "artifacts"), "", "basic-auth", env)
    yield server, admin
    server.close()


def _as(monkeypatch, user: tuple[str, str]) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", user[1])


def test_mlflow_wants_a_user_and_readers_cannot_move_champion(mlflow_auth, monkeypatch):
    from mlflow.exceptions import MlflowException
    from mlflow.server.auth.client import AuthServiceClient
    from mlflow.tracking import MlflowClient

    server, admin = mlflow_auth
    assert _status(f"{server.uri}/api/2.0/mlflow/experiments/search?max_results=1") == 401
    _as(monkeypatch, admin)
    viewer = ("viewer", secrets.token_hex(12))
    AuthServiceClient(server.uri).create_user(*viewer)
    c = MlflowClient(tracking_uri=server.uri, registry_uri=server.uri)
    c.create_registered_model("bireal-secure")
    run = c.create_run(c.create_experiment("secure")).info
    for _ in range(2):
        c.create_model_version("bireal-secure", source=f"{run.artifact_uri}/packed", run_id=run.run_id)
    c.set_registered_model_alias("bireal-secure", "champion", "1")

    _as(monkeypatch, viewer)  # a user with the default permission: READ
    c = MlflowClient(tracking_uri=server.uri, registry_uri=server.uri)
    assert c.get_model_version_by_alias("bireal-secure", "champion").version == "1"  # may read
    with pytest.raises(MlflowException, match="(?i)permission"):
        c.set_registered_model_alias("bireal-secure", "champion", "2")
    _as(monkeypatch, ("viewer", "wrong"))
    with pytest.raises(MlflowException, match="(?i)401|unauthori"):
        MlflowClient(tracking_uri=server.uri).search_experiments()

    _as(monkeypatch, admin)
    c = MlflowClient(tracking_uri=server.uri, registry_uri=server.uri)
    assert c.get_model_version_by_alias("bireal-secure", "champion").version == "1"  # unchanged by the reader
    c.set_registered_model_alias("bireal-secure", "champion", "2")
    assert c.get_model_version_by_alias("bireal-secure", "champion").version == "2"


def test_a_user_and_password_in_the_tracking_address_work_and_are_never_shown(mlflow_auth, monkeypatch, caplog):
    """MLflow's client takes `http://user:password@host` (requests sends it as basic auth), but the
    stage's first contact, a /health probe through urllib, read 'user:password@127.0.0.1' as a host
    name: a server that was up was waited for as an outage, and the address with its password was
    printed in every warning and in the final error. The address is probed without its user now,
    and whatever is said of it (messages, MLflow's own error text inside them) leaves it out."""
    import logging

    from mlflow.tracking import MlflowClient

    from pipeline.adapters.tracking import TrackingUnavailable, start_stage_run, wait_for_tracking
    from pipeline.params import MlflowConfig

    server, (user, password) = mlflow_auth
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    with_user = server.uri.replace("http://", f"http://{user}:{password}@")
    cfg = MlflowConfig(tracking_uri=with_user, experiment="address-user", outage_wait_s=2.5)
    start = time.monotonic()
    wait_for_tracking(cfg, "starting the pretrain stage")  # was: TrackingUnavailable after 2.5 s
    assert time.monotonic() - start < 2
    run_id = start_stage_run(cfg, "pretrain", {"train": {"lr": 0.1}}, "g")  # MLflow took the user
    assert MlflowClient(tracking_uri=with_user).get_run(run_id).data.params["train.lr"] == "0.1"

    down = MlflowConfig(tracking_uri=f"http://{user}:{password}@127.0.0.1:9", outage_wait_s=2.5)
    with caplog.at_level(logging.WARNING), pytest.raises(TrackingUnavailable) as caught:
        wait_for_tracking(down, "starting the pretrain stage")
    said = [str(caught.value), *(r.getMessage() for r in caplog.records)]
    assert "MLflow at http://127.0.0.1:9 unreachable for" in said[0] and len(said) >= 2
    assert not [line for line in said if password in line]
    assert caught.value.__cause__ is None  # a traceback (a Ray worker prints them) shows no chained cause


def test_stage_params_show_no_runtime_env_values(tmp_path):
    from dataclasses import asdict

    from pipeline.adapters.tracking import client, resolve, start_stage_run
    from pipeline.params import MlflowConfig, RayConfig, TrainConfig

    cfg = resolve(MlflowConfig(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="secrets"))
    ray_cfg = RayConfig(runtime_env={"env_vars": {"HF_TOKEN": "hunter2", "NCCL_DEBUG": "INFO"}, "pip": ["x"]})
    run_id = start_stage_run(cfg, "pretrain", {"train": asdict(TrainConfig()), "ray": asdict(ray_cfg)}, "g")
    params = client(cfg).get_run(run_id).data.params
    assert "hunter2" not in json.dumps(params) and "INFO" not in params["ray.runtime_env"]
    assert json.loads(params["ray.runtime_env"]) == {"env_vars": ["HF_TOKEN", "NCCL_DEBUG"], "pip": "<set>"}
    assert params["train.lr"] == str(TrainConfig().lr) and params["ray.num_workers"] == "2"

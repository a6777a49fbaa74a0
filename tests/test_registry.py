"""MLflow model registry: pyfunc of the packed artifact, champion gate, reload in a fresh
process, and `mlflow models serve --env-manager local` answering on 127.0.0.1."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

import bireal_core as bc
from cuda_ext.packed import export_model, load_packed
from pipeline.adapters.registry import register_artifact
from pipeline.adapters.tracking import resolve
from pipeline.data import iter_shard, read_manifest, split_shards
from pipeline.params import MlflowConfig, RegistryConfig

pytestmark = pytest.mark.e2e  # starts services (make test-fast leaves it out)


def make_artifact(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    model = bc.create_model("bireal18", num_classes=10, stem="small", width=0.25).train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(8, 3, 32, 32))
    return export_model(model.eval(), path, class_names=[f"digit{i}" for i in range(10)])


@pytest.fixture(scope="module")
def registry_env(tmp_path_factory, demo_shards):
    tmp = tmp_path_factory.mktemp("registry")
    cfg = resolve(
        MlflowConfig(
            tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}",
            experiment="reg-test",
            artifact_location=str(tmp / "artifacts"),
        )
    )
    manifest = read_manifest(str(demo_shards))
    url = split_shards(manifest, str(demo_shards), "test")[0][0]
    images = []
    for i, sample in zip(range(6), iter_shard(url)):
        p = tmp / f"img{i}.jpg"
        p.write_bytes(sample["jpg"])
        images.append(str(p))
    return tmp, cfg, images


def test_champion_gate_and_duplicates(registry_env):
    tmp, cfg, images = registry_env
    reg = RegistryConfig(model_name="gate-test")
    a, b, c = (make_artifact(tmp / f"{n}.safetensors", seed) for n, seed in (("a", 1), ("b", 2), ("c", 3)))
    first = register_artifact(str(a), {"top1": 0.80}, images[0], cfg, reg, "g")
    assert first["version"] == 1 and first["champion"]
    worse = register_artifact(str(b), {"top1": 0.50}, images[0], cfg, reg, "g")
    assert worse["version"] == 2 and not worse["champion"]  # a worse model does not take champion
    assert worse["gate"]["champion_top1"] == 0.80 and worse["gate"]["promoted"] is False
    again = register_artifact(str(b), {"top1": 0.50}, images[0], cfg, reg, "g")
    assert again["duplicate"] and again["version"] == 2  # same artifact: no new version
    better = register_artifact(str(c), {"top1": 0.90}, images[0], cfg, reg, "g")
    assert better["version"] == 3 and better["champion"]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=cfg.tracking_uri)
    assert int(client.get_model_version_by_alias("gate-test", "champion").version) == 3
    assert int(client.get_model_version_by_alias("gate-test", "candidate").version) == 3
    assert len(client.search_model_versions("name = 'gate-test'")) == 3


def test_reload_in_fresh_process_and_serve(registry_env):
    tmp, cfg, images = registry_env
    artifact = make_artifact(tmp / "served.safetensors", seed=5)
    register_artifact(str(artifact), {"top1": 0.7}, images[0], cfg, RegistryConfig("served"), "g")
    packed, header = load_packed(artifact)  # the in-pipeline prediction
    from cuda_ext.predict import load_images

    with torch.inference_mode():
        expected = packed(load_images(images, header["input"])).argmax(1).tolist()
    script = (
        "import json, sys, mlflow, pandas as pd\n"
        f"mlflow.set_tracking_uri({cfg.tracking_uri!r}); mlflow.set_registry_uri({cfg.tracking_uri!r})\n"
        "m = mlflow.pyfunc.load_model('models:/served@champion')\n"
        "out = m.predict(pd.DataFrame({'image': sys.argv[1:]}))\n"
        "print(json.dumps({'ids': out['class_id'].tolist(), 'labels': out['label'].tolist()}))\n"
    )
    out = subprocess.run([sys.executable, "-c", script, *images], check=True, capture_output=True, text=True)
    fresh = json.loads(out.stdout.strip().splitlines()[-1])
    assert fresh["ids"] == expected
    assert fresh["labels"] == [f"digit{i}" for i in expected]

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    venv_bin = str(Path(sys.executable).parent)  # the server execs uvicorn from PATH
    env = {**os.environ, "MLFLOW_TRACKING_URI": cfg.tracking_uri, "PATH": f"{venv_bin}:{os.environ.get('PATH', '')}"}
    mlflow_bin = str(Path(venv_bin) / "mlflow")
    server = subprocess.Popen(
        [
            mlflow_bin,
            "models",
            "serve",
            "-m",
            "models:/served@champion",
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[p] for p in images]}}).encode()
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", data=body, headers={"Content-Type": "application/json"}
        )
        answer = json.loads(urllib.request.urlopen(req, timeout=30).read())
        predictions = answer["predictions"]
        assert [p["class_id"] for p in predictions] == expected
    finally:
        server.terminate()
        server.wait(timeout=30)

"""MLflow model registry: pyfunc of the packed artifact, champion gate, reload in a fresh
process, and `mlflow models serve --env-manager local` answering on 127.0.0.1."""

import base64
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from imagegen import rewrite_artifact_header

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
    # the same tensors under other class names (the sha256 covers the tensors only): another model
    renamed = tmp / "b-renamed.safetensors"
    rewrite_artifact_header(b, renamed, lambda header: {**header, "class_names": list("abcdefghij")})
    relabelled = register_artifact(str(renamed), {"top1": 0.50}, images[0], cfg, reg, "g")
    assert not relabelled["duplicate"] and relabelled["version"] == 4
    assert (
        client.get_model_version("gate-test", "4").tags["bireal.artifact_header"]
        != (client.get_model_version("gate-test", "2").tags["bireal.artifact_header"])
    )
    assert len(client.search_model_versions("name = 'gate-test'")) == 4


def test_a_top1_on_other_images_is_not_compared(registry_env):
    """A version scored on other images (another split, re-sharded test data) does not take champion
    on a higher number, and the gate says why; versions on the champion's images still compete,
    and an evaluation without the digest (before it was recorded) counts as its own data set."""
    from pipeline.cli import report_register

    tmp, cfg, images = registry_env
    reg = RegistryConfig(model_name="data-test")
    a, b, c, d = (make_artifact(tmp / f"data-{n}.safetensors", 20 + n) for n in range(4))
    first = register_artifact(str(a), {"top1": 0.70, "eval_data_sha256": "aaaa" * 16}, images[0], cfg, reg, "g")
    assert first["champion"] and first["gate"]["comparable"]
    other = register_artifact(str(b), {"top1": 0.99, "eval_data_sha256": "bbbb" * 16}, images[0], cfg, reg, "g")
    assert not other["champion"] and other["gate"]["comparable"] is False
    assert other["gate"]["champion_after"] == first["version"]
    assert "champion version 1 was scored on other images (eval data aaaaaaaaaaaa, this one bbbbbbbbbbbb)" in (
        report_register(other)
    )
    untagged = register_artifact(str(c), {"top1": 0.95}, images[0], cfg, reg, "g")
    assert not untagged["champion"] and untagged["gate"]["candidate_eval_data"] == "unknown"
    same = register_artifact(str(d), {"top1": 0.75, "eval_data_sha256": "aaaa" * 16}, images[0], cfg, reg, "g")
    assert same["champion"] and same["gate"]["comparable"] and same["gate"]["champion_top1"] == 0.70


def test_register_refuses_a_non_finite_or_below_floor_evaluation(registry_env):
    from mlflow.tracking import MlflowClient

    tmp, cfg, images = registry_env
    reg = RegistryConfig(model_name="refuse-test", min_top1=0.2)
    good = register_artifact(str(make_artifact(tmp / "good.safetensors", 7)), {"top1": 0.3}, images[0], cfg, reg, "g")
    assert good["champion"]
    bad = make_artifact(tmp / "bad.safetensors", 8)
    for top1, match in ((float("nan"), "not a finite accuracy"), (float("inf"), "not a finite"), (None, "None"),
                        (1.5, "in \\[0, 1\\]"), (0.1, "below registry.min_top1=0.2")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            register_artifact(str(bad), {"top1": top1}, images[0], cfg, reg, "g")
    client = MlflowClient(tracking_uri=cfg.tracking_uri)
    assert len(client.search_model_versions("name = 'refuse-test'")) == 1  # nothing registered
    assert int(client.get_model_version_by_alias("refuse-test", "champion").version) == good["version"]


def test_concurrent_registrations_end_with_the_best_as_champion(registry_env):
    """The bad interleaving, forced: both registrations read the champion (0.6) before either sets
    it, and the worse (0.7) sets last. The re-read after setting moves the alias to the best (0.8)."""
    import threading

    from mlflow.tracking import MlflowClient

    from pipeline.adapters.registry import ACCURACY_TAG, champion_gate

    tmp, cfg, images = registry_env
    name = "race-test"
    client = MlflowClient(tracking_uri=cfg.tracking_uri)
    client.create_registered_model(name)
    versions = {}
    for top1 in (0.6, 0.8, 0.7):  # real versions with recorded scores; 0.6 is the champion
        run = client.create_run(client.get_experiment_by_name(cfg.experiment).experiment_id)
        v = client.create_model_version(name, f"runs:/{run.info.run_id}/m", tags={ACCURACY_TAG: str(top1)})
        versions[top1] = int(v.version)
    client.set_registered_model_alias(name, "champion", versions[0.6])
    both_read, better_set = threading.Barrier(2), threading.Event()
    results, errors = {}, []

    def register(top1: float, pause) -> None:
        try:
            results[top1] = champion_gate(
                MlflowClient(tracking_uri=cfg.tracking_uri), name, versions[top1], top1, pause=pause
            )
        except Exception as e:  # reported below
            errors.append(e)

    def better(point: str) -> None:
        if point == "read":
            both_read.wait(30)
        else:
            better_set.set()

    def worse(point: str) -> None:
        if point == "read":
            both_read.wait(30)
            better_set.wait(30)  # set after the better one: the last writer

    threads = [threading.Thread(target=register, args=a) for a in ((0.8, better), (0.7, worse))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert results[0.8]["champion_top1"] == results[0.7]["champion_top1"] == 0.6  # both read 0.6
    assert int(client.get_model_version_by_alias(name, "champion").version) == versions[0.8]
    assert results[0.8]["promoted"] and not results[0.7]["promoted"]
    assert results[0.7]["champion_after"] == versions[0.8]


def test_an_mlflow_error_reading_the_champion_fails_closed(registry_env, tmp_path):
    """A broken store (here: the aliases table of a copy of the registry without its columns) is
    an error, not "no champion": the gate raises and promotes nothing."""
    import shutil
    import sqlite3

    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from pipeline.adapters.registry import champion_gate, settle_champion

    tmp, cfg, images = registry_env
    reg = RegistryConfig(model_name="closed-test")
    first = register_artifact(
        str(make_artifact(tmp / "closed.safetensors", 9)), {"top1": 0.5}, images[0], cfg, reg, "g"
    )
    assert settle_champion(MlflowClient(tracking_uri=cfg.tracking_uri), "closed-test") == first["version"]
    broken = tmp_path / "broken.db"
    shutil.copy(tmp / "mlflow.db", broken)
    with sqlite3.connect(broken) as db:
        db.execute("DROP TABLE registered_model_aliases")
        db.execute("CREATE TABLE registered_model_aliases (broken INTEGER)")  # present, unreadable
    with pytest.raises(MlflowException):
        broken_uri = f"sqlite:///{broken}"
        champion_gate(MlflowClient(broken_uri, broken_uri), "closed-test", first["version"], 0.9)


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
        "out = m.predict(pd.DataFrame({'image': [open(p, 'rb').read() for p in sys.argv[1:]]}))\n"
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
        while server.poll() is None:  # until it answers (or dies): no clock, a loaded machine is slower
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                time.sleep(0.5)

        def invoke(rows):
            body = json.dumps({"dataframe_split": {"columns": ["image"], "data": rows}}).encode()
            req = urllib.request.Request(
                f"http://127.0.0.1:{port}/invocations", data=body, headers={"Content-Type": "application/json"}
            )
            return json.loads(urllib.request.urlopen(req, timeout=30).read())

        encoded = [[base64.b64encode(Path(p).read_bytes()).decode()] for p in images]  # the files' bytes
        predictions = invoke(encoded)["predictions"]
        assert [p["class_id"] for p in predictions] == expected
        # a path on the server's disk is refused (the request names no file the server would open)
        with pytest.raises(urllib.error.HTTPError) as refused:
            invoke([["/etc/hostname"]])
        assert refused.value.code == 400
    finally:
        server.terminate()
        server.wait(timeout=30)

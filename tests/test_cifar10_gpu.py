"""`python3 -m bench.cifar10_gpu --window-s S` (the GPU machine's accuracy run), on the CPU at a tiny
size: the timing probe, whole stages per window in order (no epoch cut), and the next window going
on from the stages the first finished."""

import json

import pytest
import yaml
from tiny import tiny_train

import bench.cifar10_gpu as cifar10_gpu
from bench.window import WindowTooShort
from pipeline.params import load_params


@pytest.fixture()
def profile(demo_shards, tmp_path):
    path = tmp_path / "accuracy.yaml"
    train = tiny_train(demo_shards, tmp_path / "ckpt")
    stages = {"pretrain": {"phase_epochs": [1, 0, 1]}, "binarize": {"epochs": 1}, "finetune": {"epochs": 1}}
    path.write_text(yaml.safe_dump({"train": train, **stages}))
    return path


def test_each_window_trains_the_whole_stages_that_fit(profile, tmp_path, monkeypatch):
    params = load_params(profile)
    assert cifar10_gpu.probe(params.train("binarize"), 1)["s_per_epoch"] > 0  # one real epoch, in a folder of its own
    assert not (tmp_path / "ckpt").exists()

    # the probe's answer fixed at 1 s an epoch: the twin (2 epochs) fits 2.5 s, binarize after it does not
    monkeypatch.setattr(cifar10_gpu, "probe", lambda config, n: {"s_per_epoch": 1.0})
    out, results, progress = tmp_path / "run", tmp_path / "results" / "cifar10.json", tmp_path / "progress.jsonl"
    assert cifar10_gpu.run(str(profile), {}, out, results, progress, "cpu", window_s=2.5) is None
    assert (out / "pretrain_history.json").is_file() and not (out / "binarize_history.json").exists()
    plan = json.loads(progress.read_text().splitlines()[0])["plan"]
    assert plan["stages"] == ["pretrain"] and plan["estimate_s"] == {"pretrain": 2, "binarize": 1, "finetune": 1}
    twin_written = (out / "pretrain_history.json").stat().st_mtime_ns

    with pytest.raises(WindowTooShort, match=r"binarize needs 1 epochs x 1.0 s = 1 s.*nothing trained"):
        cifar10_gpu.run(str(profile), {}, out, results, progress, "cpu", window_s=0.5)
    assert not (out / "binarize_history.json").exists()

    # no limit: the stages left, from the twin the first window trained
    monkeypatch.undo()
    summary = cifar10_gpu.run(str(profile), {}, out, results, None, "cpu", window_s=0.0)
    assert (out / "pretrain_history.json").stat().st_mtime_ns == twin_written
    assert [c["stage"] for c in summary["curve"]] == ["pretrain", "pretrain", "binarize", "finetune"]
    assert 0 <= summary["packed_top1"] <= 1 and json.loads(results.read_text())["packed_top1"] == summary["packed_top1"]

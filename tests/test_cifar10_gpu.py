"""`python3 -m bench.cifar10_gpu --window-s S` (the GPU machine's accuracy run), on the CPU at a tiny
size: the timing probe, whole stages per window in order (no epoch cut), and the next window going
on, on a fresh machine, from the stages the first finished and the checkpoints it sent back."""

import dataclasses
import json
import shutil

import pytest
import yaml
from tiny import tiny_train

import bench.cifar10_gpu as cifar10_gpu
from bench.trip import sha256
from bench.window import WindowTooShort
from pipeline.params import load_params


@pytest.fixture()
def profile(demo_shards, tmp_path):
    path = tmp_path / "accuracy.yaml"
    train = tiny_train(demo_shards, tmp_path / "ckpt")
    stages = {"pretrain": {"phase_epochs": [1, 0, 1]}, "binarize": {"epochs": 1}, "finetune": {"epochs": 1}}
    path.write_text(yaml.safe_dump({"train": train, **stages}))
    return path


def test_each_window_trains_the_whole_stages_that_fit(profile, tmp_path, monkeypatch, capsys):
    params = load_params(profile)
    assert cifar10_gpu.probe(params.train("binarize"), 1)["s_per_epoch"] > 0  # one real epoch, in a folder of its own
    assert not (tmp_path / "ckpt").exists()

    # the probe's answer fixed at 1 s an epoch: the twin (2 epochs) fits 2.5 s, binarize after it does not
    monkeypatch.setattr(cifar10_gpu, "probe", lambda config, n: {"s_per_epoch": 1.0})
    monkeypatch.setattr(cifar10_gpu, "CARRY_IN_BYTES", 8 * 2**20)  # as if the shards were 60 MiB
    first, results, progress = tmp_path / "window1", tmp_path / "results" / "cifar10.json", tmp_path / "progress.jsonl"
    assert cifar10_gpu.run(str(profile), {}, first, results, progress, "cpu", window_s=2.5, part_bytes=2**20) is None
    assert (first / "pretrain_history.json").is_file() and not (first / "binarize_history.json").exists()
    plan = json.loads(progress.read_text().splitlines()[0])["plan"]
    assert plan["stages"] == ["pretrain"] and plan["estimate_s"] == {"pretrain": 2, "binarize": 1, "finetune": 1}

    # what binarize reads (the clip twin) comes back in parts of at most 1 MiB, as the only file
    twin = tmp_path / "ckpt" / "pretrain-clip.safetensors"
    trip = json.loads((first / "trip" / "trip.json").read_text())
    assert [entry["name"] for entry in trip["files"]] == [twin.name]
    assert len(trip["files"][0]["parts"]) >= 2 and trip["files"][0]["sha256"] == sha256(twin.read_bytes())
    assert all((first / "trip" / part["name"]).stat().st_size <= 2**20 for part in trip["files"][0]["parts"])
    printed = capsys.readouterr().out
    assert "for the next window: ['pretrain-clip'] packed into" in printed
    assert "warning: the trip" in printed and "the next window cannot start from it" in printed

    with pytest.raises(WindowTooShort, match=r"binarize needs 1 epochs x 1.0 s = 1 s.*nothing trained"):
        cifar10_gpu.run(str(profile), {}, tmp_path / "short", results, progress, "cpu", window_s=0.5, resume_from=first)
    assert not (tmp_path / "short" / "binarize_history.json").exists()

    # the next window on a fresh machine (no checkpoints), from the first window's folder: the
    # stages left, from exactly the twin the first window trained
    twin_sha = sha256(twin.read_bytes())
    shutil.rmtree(tmp_path / "ckpt")
    monkeypatch.undo()
    second = tmp_path / "window2"
    summary = cifar10_gpu.run(str(profile), {}, second, results, None, "cpu", window_s=0.0, resume_from=first)
    assert sha256(twin.read_bytes()) == twin_sha
    assert (second / "pretrain_history.json").read_text() == (first / "pretrain_history.json").read_text()
    assert [c["stage"] for c in summary["curve"]] == ["pretrain", "pretrain", "binarize", "finetune"]
    assert 0 <= summary["packed_top1"] <= 1 and json.loads(results.read_text())["packed_top1"] == summary["packed_top1"]


def test_the_next_window_gets_what_the_stages_left_read(profile):
    """binarize's init and teacher when pretrain is done, finetune's binarized net when binarize is;
    nothing from scratch or before the stage that writes it."""
    configs = {stage: load_params(profile).train(stage) for stage in ("pretrain", "binarize", "finetune")}
    left = cifar10_gpu.inputs_left
    assert left(configs, ["pretrain"], ["binarize", "finetune"]) == ["pretrain-clip"]
    assert left(configs, ["pretrain", "binarize"], ["finetune"]) == ["binarize"]
    assert left(configs, [], ["pretrain", "binarize", "finetune"]) == []
    configs["binarize"] = dataclasses.replace(configs["binarize"], distill_from="pretrain-relu")
    assert left(configs, ["pretrain"], ["binarize", "finetune"]) == ["pretrain-clip", "pretrain-relu"]
    configs["binarize"] = dataclasses.replace(configs["binarize"], init="scratch", distill_from="")
    assert left(configs, ["pretrain"], ["binarize", "finetune"]) == []

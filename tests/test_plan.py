"""`bireal plan` and `bireal bench train`: the planner's arithmetic against a throughput table
written here (so the expected numbers follow from the formula, not from a measurement), its
"estimated, not measured" path, the loader cap, and the bench's rows on a tiny CPU model."""

import json
import math
from pathlib import Path

import pytest

from pipeline.params import load_params
from pipeline.plan import EVAL_SPEEDUP, VAL_IMAGES, format_plan, plan

CONFIGS = Path(__file__).resolve().parents[1] / "pipeline" / "configs"
GPU = "Test H100 80GB"


def table(tmp_path, rows) -> Path:
    path = tmp_path / "throughput.json"
    path.write_text(json.dumps(rows))
    return path


def step_row(arch, batch, img_s, model="binary"):
    return {
        "what": "train_step",
        "arch": arch,
        "model": model,
        "batch": batch,
        "precision": "fp32",
        "img_s": img_s,
        "device_name": GPU,
        "date": "2026-11-27",
    }


def loader_row(img_s, augment="imagenet", lighting=True):
    row = {"what": "loader_per_core", "augment": augment, "pca_lighting": lighting, "img_s": img_s}
    return {**row, "device_name": "Test CPU", "date": "2026-11-27"}


def test_the_plan_follows_from_the_measured_rate(tmp_path):
    params = load_params(CONFIGS / "imagenet_bireal18_official.yaml")
    path = table(tmp_path, [step_row("bireal18", 128, 1000.0), loader_row(500.0)])
    p = plan(params, gpus=16, gpu="h100", upload_gb_s=2.0, efficiency=0.8, table=path)
    (stage,) = p["stages"]
    assert (stage["stage"], stage["global_batch"], p["nodes"]) == ("binarize", 128 * 16, 2)
    assert stage["lr"] == pytest.approx(0.001 * 2048 / 512)  # the recipe's lr scaled linearly
    assert stage["steps_per_epoch"] == math.ceil(1281167 / 2048)
    assert stage["shards"] == 257 and stage["data_readers"] == 16 * 8
    assert not stage["loader_bound"] and stage["effective_img_s"] == 1000.0  # 8 workers x 500 > 1000
    assert stage["gpu_source"].startswith("measured: Test H100")
    rate = 1000.0 * 16 * 0.8
    epoch_s = 1281167 / rate + VAL_IMAGES / (rate * EVAL_SPEEDUP) + stage["checkpoint_mb"] * 1e6 / 2e9
    assert stage["wall_h"] == pytest.approx(256 * epoch_s / 3600)
    assert p["gpu_hours"] == pytest.approx(stage["wall_h"] * 16)
    # Adam's two moments on top of the weights: three times the latent weights, and more than BN's share
    assert 100 < stage["checkpoint_mb"] < 200
    # 16 GPUs x 8 loader workers leave 2 shards per reader: the plan warns, naming the fix
    assert len(p["warnings"]) == 1 and "shard.samples_per_shard" in p["warnings"][0]
    text = format_plan(p)
    assert "measured: Test H100 80GB, 2026-11-27" in text and "WARNING" in text and "GPU-hours" in text


def test_loader_bound_and_estimated_rates_are_said(tmp_path):
    params = load_params(CONFIGS / "imagenet_bireal34_paper.yaml")
    # only Bi-Real-18 measured: the 34-layer rates are estimated from it by the MAC ratio
    rows = [
        step_row("bireal18", 32, 1400.0),
        step_row("bireal18", 64, 3000.0, model="twin"),
        loader_row(1000.0, "caffe", False),  # the binary stages' Caffe crops
        loader_row(100.0, "imagenet", False),  # the twin's random-resized crops, no lighting
    ]
    p = plan(params, gpus=8, gpu="h100", table=table(tmp_path, rows))
    by_stage = {s["stage"]: s for s in p["stages"]}
    assert set(by_stage) == {"pretrain", "binarize", "finetune"}
    binarize = by_stage["binarize"]
    assert binarize["gpu_source"].startswith("estimated, not measured: bireal18 binary at batch 32")
    assert 0.4 < binarize["gpu_img_s"] / 1400.0 < 0.6  # Bi-Real-34 costs about twice Bi-Real-18's MACs
    # the twin's loader: 8 workers x 100 img/s cap its GPU rate (about 1,500 img/s estimated)
    pretrain = by_stage["pretrain"]
    assert pretrain["loader_bound"] and pretrain["effective_img_s"] == pytest.approx(800.0)
    assert pretrain["loader_source"].startswith("measured: Test CPU")
    assert not binarize["loader_bound"]  # 8 x 1,000 img/s of Caffe crops keep up
    assert "loader-bound" in format_plan(p)


def test_an_h100_is_priced_from_h200_rows_with_the_stated_factor_and_the_node_cores_are_counted(tmp_path):
    """No H100 row: the H200's rate times the stated bandwidth factor, said as "not measured on
    h100"; the loader processes per GPU and the cores they take are printed, and a node with too
    few cores for them is a warning."""
    from pipeline.plan import CARD_FACTORS

    params = load_params(CONFIGS / "imagenet_bireal18_official.yaml")
    rows = [{**step_row("bireal18", 128, 5000.0), "device_name": "Test H200 141GB"}, loader_row(1000.0)]
    p = plan(params, gpus=8, gpu="h100", table=table(tmp_path, rows))
    (stage,) = p["stages"]
    factor = CARD_FACTORS["h100"][1]
    assert factor == pytest.approx(3.35 / 4.8) and stage["gpu_img_s"] == pytest.approx(5000.0 * factor)
    assert stage["gpu_source"].startswith("from another card, not measured on h100: H200 rows x 0.70 (stated:")
    assert "measured: Test H200 141GB" in stage["gpu_source"]
    assert stage["loader_processes_per_gpu"] == 8 and stage["node_cores_needed"] == 8 * 9
    said = "1,000 img/s per process x 8 processes per GPU (train.loader_workers; 72 of a node's 96 cores"
    assert said in format_plan(p)
    assert not [w for w in p["warnings"] if "cores" in w]
    small = plan(params, gpus=8, gpu="h200", table=table(tmp_path, rows), cores_per_node=64)
    assert small["stages"][0]["gpu_img_s"] == 5000.0  # its own rows: no factor
    (warning,) = [w for w in small["warnings"] if "cores" in w]
    assert warning.startswith("binarize: 8 GPUs x (8 loader processes + 1 trainer) need 72 cores, the node has 64")


def test_no_measurement_on_that_gpu_leaves_the_time_open(tmp_path):
    params = load_params(CONFIGS / "imagenet_bireal50_official.yaml")
    p = plan(params, gpus=8, gpu="a100", table=table(tmp_path, [step_row("bireal50", 64, 700.0)]))
    assert p["wall_h"] is None and "no measurement on a100 (rows for: h100;" in p["stages"][0]["gpu_source"]
    assert "total: - h wall" in format_plan(p)


def test_plan_command_and_bad_gpu_count(capsys):
    from pipeline.cli import main

    assert main(["plan", "--params", "imagenet_bireal152", "--gpus", "64"]) == 0
    out = capsys.readouterr().out
    assert "on 64 x h100 (8 node(s) of 8)" in out and "bireal152" in out and "throughput assumed" in out
    for flag, value, message in (
        ("--gpus", "0", "argument --gpus: 0: must be >= 1"),
        ("--gpus", "eight", "argument --gpus: 'eight': expected an integer"),
        ("--efficiency", "0", "argument --efficiency: 0: must be in (0, 1]"),
        ("--upload-gb-s", "nan", "argument --upload-gb-s: nan: must be > 0"),
    ):
        argv = ["plan", "--params", "imagenet_bireal152", "--gpus", "64", flag, value]
        with pytest.raises(SystemExit) as e:  # argparse's error, before the params are read
            main(argv)
        assert e.value.code == 2 and f"bireal plan: error: {message}" in capsys.readouterr().err


def test_bench_train_times_each_trained_stage(tmp_path, monkeypatch):
    """Rows for the stages the profile trains, at its batch, on a tiny CPU model; recorded rows
    replace the same measurement's old ones, and a failed write leaves the table as it was."""
    from pipeline.train_bench import record, run

    profile = tmp_path / "tiny.yaml"
    profile.write_text(
        "data: {train_images: 1000}\n"
        "train: {arch: bireal18, stem: imagenet, width: 0.25, batch_size: 2}\n"
        "pretrain: {phase_epochs: [1, 0, 0]}\nbinarize: {epochs: 1}\nfinetune: {epochs: 0}\n"
    )
    rows = run(load_params(profile), "cpu", steps=1, loader=False, on_row=lambda row: None)
    assert [(r["stage"], r["model"], r["batch"]) for r in rows] == [("pretrain", "twin", 2), ("binarize", "binary", 2)]
    assert all(r["img_s"] > 0 and r["device"] == "cpu" for r in rows)
    path = tmp_path / "table.json"
    record(rows, path)
    record([{**rows[0], "img_s": 1.0}], path)
    kept = json.loads(path.read_text())
    assert len(kept) == 2 and [r["img_s"] for r in kept if r["stage"] == "pretrain"] == [1.0]

    # A write that dies half way (disk full, a kill) leaves the recorded rows as they were: the
    # committed table holds every GPU row measured so far, and a torn one would lose them all.
    def half_then_disk_full(self, text, *args, **kwargs):
        real_write_text(self, text[: len(text) // 2])
        raise OSError(28, "No space left on device")

    real_write_text = Path.write_text
    before = path.read_bytes()
    monkeypatch.setattr(Path, "write_text", half_then_disk_full)
    with pytest.raises(OSError, match="No space left"):
        record([{**rows[1], "img_s": 2.0}], path)
    monkeypatch.undo()
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["table.json", "tiny.yaml"]


def test_bench_train_kernels_rows_from_the_cli(tmp_path, capsys):
    """`bireal bench train --kernels float --kernels auto`: one binarize row per setting, the packed
    one with every binary conv on the ops and less saved for backward per image."""
    from pipeline.cli import main

    profile = tmp_path / "tiny.yaml"
    profile.write_text("train: {arch: bireal18, stem: small, width: 0.25, batch_size: 4}\n")
    out = tmp_path / "rows.json"
    argv = ["bench", "train", "--params", str(profile), "--stage", "binarize", "--kernels", "float"]
    argv += ["--kernels", "auto", "--batch", "2", "--steps", "1", "--no-loader", "--json", str(out)]
    assert main(argv) == 0
    rows = {r["kernels"]: r for r in json.loads(out.read_text())}
    assert set(rows) == {"float", "auto"} and all(r["batch"] == 2 and r["size"] == 32 for r in rows.values())
    assert (rows["float"]["packed_convs"], rows["auto"]["packed_convs"]) == (0, 16)
    assert 0 < rows["auto"]["saved_mb_per_image"] < rows["float"]["saved_mb_per_image"]
    printed = capsys.readouterr().out
    assert "kernels auto (16 packed convs)" in printed and "saved for backward" in printed

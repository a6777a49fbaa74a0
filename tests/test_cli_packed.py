"""`bireal export` and `bireal predict` end to end, with the errors a user meets."""

import json

import numpy as np
import pytest
from PIL import Image

import bireal_core as bc
from pipeline.cli import main


@pytest.fixture()
def checkpoint(tmp_path):
    model = bc.create_model("bireal18", num_classes=3, stem="small", width=0.25)
    return bc.save_checkpoint(
        tmp_path / "ckpt.safetensors", model.eval(), stage="finetune", config={"class_names": ["cat", "dog", "fox"]}
    )


def write_image(path, size=(40, 30), mode="RGB"):
    arr = (np.random.default_rng(0).random((size[1], size[0], 3)) * 255).astype("uint8")
    Image.fromarray(arr).convert(mode).save(path)
    return path


def test_export_then_predict(tmp_path, checkpoint, capsys):
    art = tmp_path / "model.safetensors"
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(art)]) == 0
    assert "Mbit" in capsys.readouterr().out
    images = [write_image(tmp_path / "a.jpg"), write_image(tmp_path / "b.png", mode="L")]
    assert main(["predict", "--artifact", str(art), "--topk", "2", "--json", *map(str, images)]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [len(r["top"]) for r in results] == [2, 2]
    for r in results:
        assert r["top"][0]["label"] in {"cat", "dog", "fox"}
        assert r["top"][0]["score"] >= r["top"][1]["score"]


def test_predict_errors_name_the_file(tmp_path, checkpoint, capsys):
    art = tmp_path / "model.safetensors"
    main(["export", "--checkpoint", str(checkpoint), "--out", str(art)])
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 definitely not a jpeg")
    good = write_image(tmp_path / "ok.jpg")
    assert main(["predict", "--artifact", str(art), str(good), str(bad)]) == 2
    assert "broken.jpg" in capsys.readouterr().err
    assert main(["predict", "--artifact", str(good), str(good)]) == 2
    assert "ok.jpg" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(tmp_path / "nope.safetensors"), "--out", str(art)]) == 2
    assert "nope.safetensors" in capsys.readouterr().err


def test_bench_kernel_rows_and_table():
    """The benchmark code the CLI runs: every row has both sides and the derived columns (timings
    are printed, never asserted)."""
    from cuda_ext.benchmarks import BIREAL18_SHAPES, bench_kernels, format_table

    rows = bench_kernels("cpu", batches=(1,), repeats=1)
    assert [r["shape"] for r in rows] == [f"{c}x{s}x{s}" for c, s in BIREAL18_SHAPES]
    for r, (channels, side) in zip(rows, BIREAL18_SHAPES):
        assert r["ours_ms"] > 0 and r["baseline_ms"] > 0 and r["block_ms"] > 0
        assert r["speedup"] == r["baseline_ms"] / r["ours_ms"]
        # bytes: one int64 word per 64 input channels in, one float32 per output channel out
        moved = side * side * (8 * (channels // 64) + 4 * channels)
        assert r["ours_gb_s"] == pytest.approx(moved / r["ours_ms"] / 1e6)
    table = format_table(rows, "title")
    assert "64x56x56" in table and "block_speedup" in table and "baseline: F.conv2d float32" in table

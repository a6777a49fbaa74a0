"""bench/gpu_train.py, issue 26's GPU run, on the CPU at toy size: every row it writes on a GPU
is written here by the same code (loader paths, step rows per kernels and precision, loader + step
with its data-wait fraction, the targets as ratios), one JSON line each as it is measured."""

import json

from bench import gpu_train


def test_the_gpu_training_run_writes_every_row_on_a_cpu(tmp_path):
    argv = ["--out", str(tmp_path), "--device", "cpu", "--images", "60", "--batch", "4", "--deep-batch", "2"]
    argv += ["--steps", "1", "--width", "0.25", "--models", "bireal18,resnet18", "--no-compile"]
    assert gpu_train.main(argv) == 0
    rows = [json.loads(line) for line in (tmp_path / "gpu_train.jsonl").read_text().splitlines()]
    what = [r["what"] for r in rows]
    assert what[:3] == ["build", "machine", "photos"] and rows[2]["images"] == 60 and rows[2]["mean_kb"] > 30
    loaders = [r for r in rows if r["what"].startswith("loader: ")]
    assert [r["what"] for r in loaders] == [
        "loader: float, 1 process (1 thread)",
        "loader: uint8, 1 process (1 thread, finished on cpu)",
        "loader: uint8, 2 workers, finished on cpu",
        "loader: decode on cpu, 2 workers",
        "loader: decode on cpu, no workers",
    ]
    # the CPU rows read at most 32 batches of 32; 50 train photos (every class's first to val) make one
    assert loaders[0]["images"] == loaders[1]["images"] == 32 and loaders[3]["images"] == 48
    steps = {(r["kernels"], r["precision"]) for r in rows if r["what"].startswith("step: bireal18 binarize")}
    assert steps == {("float", "fp32"), ("auto", "fp32"), ("float", "bf16"), ("auto", "bf16")}
    assert all(r["img_s"] > 0 for r in rows if "img_s" in r)
    (both,) = [r for r in rows if r["what"].startswith("loader + step")]
    assert both["steps"] == 1 and 0 < both["data_wait_fraction"] <= 1
    targets = {r["what"]: r for r in rows if r["what"].startswith("target: ")}
    assert set(targets) == {
        "target: loader: uint8 / float, 1 process",
        "target: decode on the device, 2 workers / Bi-Real-18 bf16 step",
        "target: decode on the device, 2 workers / 4,000 img/s",
        "target: Bi-Real-18 bf16 step / ResNet-18 bf16 step",
        "target: loader + step / Bi-Real-18 bf16 step",
    }
    uint8 = targets["target: loader: uint8 / float, 1 process"]
    assert uint8["ratio"] == round(loaders[1]["img_s"] / loaders[0]["img_s"], 3) and uint8["target"] == 2.0

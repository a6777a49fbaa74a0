"""The GPU machine's scripts on the CPU at toy size: every row they write on a GPU is written here
by the same code. bench/gpu_train.py (issue 26: loader paths, step rows per kernels and precision,
loader + step with its data-wait fraction, the targets as ratios) and bench/gpu_profile.py (issue
25: a forward's time by kernel and group), one JSON line each as it is measured."""

import json
import re
import subprocess
from pathlib import Path

from bench import gpu_profile, gpu_train


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


def test_the_lean_step_row_on_a_cpu():
    """The GPU-only step row of kernels auto on the bmma_lean CUDA path (on a CPU its convs run the
    CPU kernels): written as the other step rows, marked with its path, and never the setting the
    end-to-end row picks."""
    from dataclasses import replace

    import torch

    from pipeline.params import load_params

    config = load_params(gpu_train.OFFICIAL).train("binarize", {"width": 0.25, "batch_size": 2}, tuned=False)
    row = gpu_train.lean_step_row(replace(config, precision="bf16", kernels="auto"), torch.device("cpu"), 1)
    assert row["what"] == "step: bireal18 binarize, kernels auto on bmma_lean, bf16" and row["cuda_path"] == "bmma_lean"
    assert row["img_s"] > 0 and row["packed_convs"] > 0
    plain = {**row, "what": "step: bireal18 binarize, kernels float, bf16", "img_s": row["img_s"] / 2}
    plain.pop("cuda_path")
    assert gpu_train.fastest_bf16([row, plain], "bireal18") is plain
    assert list(gpu_train.lean_step_rows(2, 1, torch.device("cpu"), 0.25)) == []  # the run's are GPU-only


def test_the_profile_groups_a_forwards_time_by_kernel(tmp_path):
    argv = ["--out", str(tmp_path), "--device", "cpu", "--batches", "1", "--iters", "1", "--width", "0.25"]
    assert gpu_profile.main(argv) == 0
    rows = [json.loads(line) for line in (tmp_path / "profile.jsonl").read_text().splitlines()]
    assert [(r["model"], r["batch"]) for r in rows] == [
        ("bireal18 packed fp32", 1), ("bireal18 packed fp32 s2d stem, fused shortcuts", 1), ("resnet18 fp32", 1)
    ]  # fmt: skip
    packed, fused, resnet = rows
    assert all(r["kernels"] is None for r in rows)  # counted on a GPU only
    # fused shortcuts: no average pool left (the stem's max-pool is max_pool_signs, in "binary")
    assert packed["groups_ms"]["pool"] > 0 and "pool" not in fused["groups_ms"]
    # the packed model's 16 binary blocks run in our ops; ResNet-18 has none, and its convs are conv
    assert packed["groups_ms"]["binary"] > 0 and "binary" not in resnet["groups_ms"]
    assert any(t["name"] == "bireal::binary_block" for t in packed["top"]) and resnet["groups_ms"]["conv"] > 0
    for row in rows:
        assert abs(sum(row["groups_ms"].values()) - row["total_ms"]) < 1e-3
    assert gpu_profile.group_of("void cudnn::cnn::implicit_convolve_sgemm<...>") == "conv"
    assert gpu_profile.group_of("void bireal::(anonymous)::binary_conv2d_bmma_kernel(...)") == "binary"
    assert gpu_profile.group_of("void at::native::vectorized_elementwise_kernel<...>") == "elementwise"


def test_the_bf16_model_rows_on_a_cpu(tmp_path, monkeypatch):
    """The model table's bf16 rows (run on a GPU by ``bireal bench model --device cuda``), here on the
    CPU kernels: one time per tensor-core path, one per float-part switch (the stem padded to 8 input
    channels or run space to depth, the shortcuts fused) and one with the faster stem (if either is)
    and the fused shortcuts, each binary conv on its fastest path, the benchmarked model left as it
    was; a path named in BIREAL_SKIP_CUDA_PATHS gets no column."""
    import torch

    import bireal_core as bc
    from cuda_ext import ops
    from cuda_ext.benchmarks import bf16_model_rows
    from cuda_ext.packed import export_model, load_packed

    packed, _ = load_packed(export_model(bc.create_model("bireal18", width=0.25).eval(), tmp_path / "b.safetensors"))
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    row = bf16_model_rows(packed, x, torch.device("cpu"), 1)
    tuned, tuned_paths = row.pop("tuned"), row.pop("tuned_paths")
    assert set(row) == {"bf16_ms", "async_bf16_ms", "lean_bf16_ms", "lean1_bf16_ms", "split_bf16_ms", "halo_bf16_ms",
                        "halo_w_bf16_ms", "halo_p_bf16_ms", "stem8_bf16_ms", "stem_s2d_bf16_ms", "shortcut2x2_bf16_ms",
                        "tuned_bf16_ms", "tuned_pdl_bf16_ms"}  # fmt: skip
    assert min(row.values()) > 0
    per_layer, *stems, shortcuts = tuned.split(" + ")
    assert len(tuned_paths) == 16 and set(tuned_paths.values()) <= set(ops.cpu_paths())  # on this CPU
    assert per_layer.startswith("per-layer paths (") and per_layer.endswith(")")
    assert sum(int(n) for n in re.findall(r" x(\d+)", per_layer)) == 16  # e.g. "(avx512 x12, avx2 x4)"
    assert shortcuts == "shortcut2x2"
    assert stems in ([], ["stem8"], ["stem_s2d"])
    assert packed.stem[0].in_channels == 3 and not packed.stem_space_to_depth
    assert packed.activation_dtype == torch.float32
    assert all(b.downsample is None or isinstance(b.downsample[0], torch.nn.AvgPool2d) for b in packed.blocks)

    # a path that lost the CUDA context on the machine (the GPU scripts name it) gets no column
    monkeypatch.setenv("BIREAL_SKIP_CUDA_PATHS", "bmma_halo_p")
    skipped = bf16_model_rows(packed, x, torch.device("cpu"), 1)
    assert "halo_p_bf16_ms" not in skipped and "halo_w_bf16_ms" in skipped and "tuned_bf16_ms" in skipped


def test_the_kernel_sweep_on_a_cpu(tmp_path, capsys, monkeypatch):
    """bench/kernel_sweep.py (issue 25's sweep) on the CPU paths: variant by variant, a row per
    (shape, batch) with both baselines (measured once, the same in every variant's rows), written as
    measured between the variant's started and done lines, every variant's outputs equal to the
    cross-check's; after a crash, --unfinished names what to skip and --append --skip goes on with
    the rest in the same file."""
    import torch

    from bench import kernel_sweep

    # the bookkeeping needs two variants, and a CPU without AVX-512 has one besides the portable
    # cross-check (avx2): the cross-check is timed as a variant too, on any x86 CPU
    simd, check = kernel_sweep.variants(torch.device("cpu"))
    variants = [*simd, check] if check not in simd else simd
    monkeypatch.setattr(kernel_sweep, "variants", lambda device: (variants, check))
    assert len(variants) >= 2 and check == "portable"

    argv = ["--out", str(tmp_path), "--device", "cpu", "--batches", "1", "--repeats", "1", "--shapes", "3,6"]
    assert kernel_sweep.main(argv) == 0
    path = tmp_path / "kernel_sweep.jsonl"
    head, *lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert head["what"] == "machine" and head["copy_gb_s"] is None
    shapes = ("512->512x7", "256->512x14/s2")
    expected = []
    for v in variants:
        expected += [("started", v), *((s, v) for s in shapes), ("done", v)]
    assert [(line.get("state") or line["shape"], line["variant"]) for line in lines] == expected
    rows = [line for line in lines if "shape" in line]
    for row in rows:
        assert row["exact"] and row["batch"] == 1
        assert row["conv_x_cudnn"] == row["cudnn_ms"] / row["conv_ms"] and row["block_ms"] > 0
    for s in shapes:  # one baseline per (shape, batch), shared by the variants
        assert len({(r["cudnn_ms"], r["float_block_ms"]) for r in rows if r["shape"] == s}) == 1

    # as if the process had died inside the first variant, after its first row: that row kept,
    # --unfinished names it as crashed (none done), and the rerun appends the other variants
    cut = 2  # the first variant's started line and first row
    path.write_text("\n".join(map(json.dumps, [head, *lines[:cut]])) + "\n")
    capsys.readouterr()
    assert kernel_sweep.main(["--unfinished", str(path)]) == 0
    assert capsys.readouterr().out.splitlines() == ["", variants[0]]
    assert kernel_sweep.main([*argv, "--append", "--skip", variants[0]]) == 0
    again = [json.loads(line) for line in path.read_text().splitlines()]
    assert again[: 1 + cut] == [head, *lines[:cut]]  # nothing written before is lost
    rerun = [(x.get("state") or x["shape"], x["variant"]) for x in again[1 + cut :]]
    assert rerun == expected[expected.index(("started", variants[1])) :]


FAKE_PYTEST = r"""#!/usr/bin/env bash
# Stands in for `python3 -m pytest ...` on a GPU machine: each run appends its arguments and
# BIREAL_SKIP_CUDA_PATHS to $CALLS, then does what the next line of $SCRIPT says.
echo "skip=${BIREAL_SKIP_CUDA_PATHS:-} args=$*" >> "$CALLS"
n=$(wc -l < "$CALLS")
case "$(sed -n "${n}p" "$SCRIPT")" in
  lost) echo "CUDA context lost in test_halo_rows path=bmma_halo_p" >&2; kill -ABRT $$ ;;
  segv) echo '  File "tests/test_cuda.py", line 77 in test_pool_words' >&2; kill -SEGV $$ ;;
  fail) exit 1 ;;
  *) exit 0 ;;
esac
"""


def run_with_stand_in(tmp_path, stand_in: str, script: list[str], runner: str, env: dict | None = None):
    """``runner`` (a bench/gpu_lib.sh function call) with ``stand_in`` as $PY, playing ``script``
    one line a run -> (rc, stdout, the calls the stand-in recorded)."""
    fake = tmp_path / "fake_python"
    fake.write_text(stand_in)
    fake.chmod(0o755)
    (tmp_path / "script").write_text("\n".join(script) + "\n")
    calls = tmp_path / "calls"
    calls.unlink(missing_ok=True)
    done = subprocess.run(
        ["bash", "-c", f"source bench/gpu_lib.sh; deadline=$((SECONDS + 60)); {runner}"],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "PY": str(fake), "CALLS": str(calls), "SCRIPT": str(tmp_path / "script")}
        | (env or {}),
    )
    return done.returncode, done.stdout, calls.read_text().splitlines()


def run_gpu_tests(tmp_path, script: list[str], kexpr: str) -> tuple[int, str, list[str]]:
    """bench/gpu_lib.sh's gpu_tests with a stand-in for pytest that plays ``script``, one line a run."""
    return run_with_stand_in(
        tmp_path, FAKE_PYTEST, script, f'gpu_tests "{tmp_path}/log" 30 "{kexpr}" tests/test_cuda.py'
    )


def test_gpu_tests_rerun_the_rest_after_a_kernel_loses_the_context(tmp_path):
    """The GPU scripts' test runner (bench/gpu_lib.sh): a run that died naming a test and its kernel
    path is run again with that path skipped (BIREAL_SKIP_CUDA_PATHS); one that crashed inside a
    test without a path (faulthandler's trace) again without that test; the death counts as a
    failure; a run that ends normally is not repeated; 3 runs at most."""
    rc, out, calls = run_gpu_tests(tmp_path, ["lost", "segv", "ok"], "halo or split")
    assert rc == 1 and "died in test_halo_rows (bmma_halo_p), test_pool_words" in out
    run = "-m pytest -q -p no:cacheprovider -o addopts= tests/test_cuda.py -k"
    assert calls == [
        f"skip= args={run} halo or split",
        f"skip=bmma_halo_p args={run} halo or split",
        f"skip=bmma_halo_p args={run} (halo or split) and not test_pool_words",
    ]
    rc, out, calls = run_gpu_tests(tmp_path, ["ok"], "")
    assert rc == 0 and out == "" and len(calls) == 1 and "-k" not in calls[0]
    rc, out, calls = run_gpu_tests(tmp_path, ["fail"], "")
    assert rc == 1 and "died" not in out and len(calls) == 1
    rc, out, calls = run_gpu_tests(tmp_path, ["lost", "lost", "lost", "ok"], "")
    assert rc == 1 and len(calls) == 3


FAKE_SMOKE = r"""#!/usr/bin/env bash
# Stands in for `python3 -m cuda_ext.smoke --json FILE` on a GPU machine: each run appends
# BIREAL_SKIP_CUDA_PATHS to $CALLS, writes FILE, then does what the next line of $SCRIPT says.
echo "skip=${BIREAL_SKIP_CUDA_PATHS:-}" >> "$CALLS"
n=$(wc -l < "$CALLS")
echo "[{\"run\": $n}]" > "$4"
line=$(sed -n "${n}p" "$SCRIPT")
case "$line" in
  lost*) echo "smoke: CUDA context lost on path=${line#lost }: the run ends here"; exit 1 ;;
  wrong) echo "smoke: 9 of 10 checks exact; WRONG: 1"; exit 1 ;;
  *) echo "smoke: 10 of 10 checks exact"; exit 0 ;;
esac
"""


def run_gpu_smoke(tmp_path, script: list[str], skip: str = "") -> tuple[int, str, list[str]]:
    """bench/gpu_lib.sh's gpu_smoke with a stand-in for the smoke that plays ``script``, one line a
    run; prints smoke_lost last."""
    runner = f'gpu_smoke "{tmp_path}/smoke" 30; rc=$?; echo "lost=$smoke_lost"; exit $rc'
    return run_with_stand_in(tmp_path, FAKE_SMOKE, script, runner, {"BIREAL_SKIP_CUDA_PATHS": skip} if skip else {})


def test_gpu_smoke_runs_again_without_a_path_that_lost_the_context(tmp_path):
    """The GPU scripts' smoke (bench/gpu_lib.sh): a run that lost the CUDA context on a path is run
    again with that path in BIREAL_SKIP_CUDA_PATHS, each run's log and rows kept; the lost paths
    are handed to the steps after it and fail the step; a wrong result is not rerun; 3 runs at most."""
    rc, out, calls = run_gpu_smoke(tmp_path, ["lost bmma_split", "lost bmma_halo_p", "ok"])
    assert rc == 1 and calls == ["skip=", "skip=bmma_split", "skip=bmma_split,bmma_halo_p"]
    assert "lost the CUDA context on bmma_split,bmma_halo_p (" in out and out.endswith("lost=bmma_split,bmma_halo_p\n")
    rows = [json.loads((tmp_path / f"smoke_{n}.json").read_text()) for n in (1, 2, 3)]
    assert rows == [[{"run": n}] for n in (1, 2, 3)]
    assert "context lost on path=bmma_split" in (tmp_path / "smoke_1.log").read_text()

    rc, out, calls = run_gpu_smoke(tmp_path, ["ok"], skip="bmma_halo_w")  # lost earlier in the window
    assert rc == 0 and calls == ["skip=bmma_halo_w"] and out.endswith("lost=bmma_halo_w\n")
    rc, out, calls = run_gpu_smoke(tmp_path, ["lost bmma_lean1", "ok"], skip="bmma_halo_w")
    assert rc == 1 and calls == ["skip=bmma_halo_w", "skip=bmma_halo_w,bmma_lean1"]
    assert "context on bmma_lean1 (" in out and out.endswith("lost=bmma_halo_w,bmma_lean1\n")
    rc, out, calls = run_gpu_smoke(tmp_path, ["wrong"])
    assert rc == 1 and len(calls) == 1 and out.endswith("lost=\n")
    rc, out, calls = run_gpu_smoke(tmp_path, ["lost a", "lost b", "lost c", "ok"])
    assert rc == 1 and len(calls) == 3 and out.endswith("lost=a,b,c\n")

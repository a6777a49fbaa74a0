"""Training at the GPU's pace, measured: every row issue 26 asks for, in one run of a few minutes.

    python3 -m bench.gpu_train --out DIR [--images 6000] [--batch 256] [--steps 20]

On a bare GPU machine (python3, torch, torchvision, nvcc; no registry): the extension is built
first where it is not (``setup.py build_ext --inplace`` for this GPU), then
1. photos: ``--images`` synthetic ImageNet-sized JPEGs (``pipeline.data_bench.make_synthetic_photos``:
   1/f-spectrum content, q90, 4:2:0, every fifth progressive, ~100 KB) on every core, sharded at full
   size as the RandomResizedCrop profiles shard;
2. the loader alone, the official recipe with lighting: one loader process (one torch thread) on
   the float path and on the uint8 path, its batches finished on the GPU (the target: uint8 >= 2x
   float), the uint8 path with 2 workers, and the device-decode path (nvJPEG) with 2 worker
   processes and with none, over the whole train split;
3. the step alone on synthetic batches already on the GPU (``pipeline.train_bench.step_rate``:
   ``train_one_epoch``'s forward, loss, backward and optimizer step, median of 3 runs): Bi-Real-18
   binarize with kernels float and auto in fp32 and bf16, Bi-Real-152 binarize the same, float
   ResNet-18 and ResNet-152 (torchvision) in bf16, all channels_last, and Bi-Real-18 under
   ``torch.compile`` in bf16 with the faster kernels setting (its compile time apart);
4. loader + step: Bi-Real-18 binarize in bf16 with the faster kernels setting, fed by the
   device-decode loader, with its data-wait fraction and the GPU's utilization (nvidia-ml-py where
   installed, else ``nvidia-smi``) sampled while it runs;
5. last, Bi-Real-18's kernels-auto step on the bmma_lean CUDA path (not yet run on a GPU: a fault
   there costs only these rows);
6. the targets, each as a measured ratio.
Each row is appended to DIR/gpu_train.jsonl as it is measured (a run cut off keeps its rows) and
printed. ``--device cpu`` with tiny settings runs the same code on a CPU (tests/test_gpu_scripts.py).
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
OFFICIAL, DEEP = "imagenet_bireal18_official", "imagenet_bireal152"


class Rows:
    """Rows written as measured: one JSON line each, and a printed line."""

    def __init__(self, out: Path):
        out.mkdir(parents=True, exist_ok=True)
        self.path, self.rows = out / "gpu_train.jsonl", []

    def add(self, row: dict) -> dict:
        self.rows.append(row)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(format_row(row), flush=True)
        return row


def format_row(row: dict) -> str:
    what = row["what"]
    if "img_s" in row:
        extra = "".join(f"  {k} {row[k]}" for k in ("data_wait_fraction", "gpu_util_pct", "compile_s") if k in row)
        return f"{what:<58}{row['img_s']:>10,.0f} img/s{extra}"
    if "ratio" in row:
        verdict = f"  (target >= {row['target']}: {'met' if row['met'] else 'NOT met'})"
        return f"{what:<58}{row['ratio']:>10.2f}x{verdict}"
    return f"{what:<58}{json.dumps({k: v for k, v in row.items() if k != 'what'})}"


def machine(device: torch.device) -> dict:
    import torchvision

    from pipeline.train_bench import device_name

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return {
        "what": "machine",
        "device_name": device_name(device),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cpu_cores": os.cpu_count(),
        "date": datetime.date.today().isoformat(),
        "commit": commit.stdout.strip() or os.environ.get("BIREAL_COMMIT", "unknown"),
    }


def build_extension(device: torch.device) -> dict:
    """cuda_ext._C with its CUDA kernels, built here for this GPU unless it already is."""
    from cuda_ext import ops

    if device.type != "cuda" or ops.cuda_built():
        return {"what": "build", "built": False, "cuda_built": device.type == "cuda" and ops.cuda_built()}
    major, minor = torch.cuda.get_device_capability(device)
    env = {**os.environ, "BIREAL_CUDA": "1", "MAX_JOBS": str(os.cpu_count() or 8)}
    env["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}" + ("a" if major == 9 else "")
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    if done.returncode:
        raise RuntimeError(f"the extension did not build:\n{done.stderr[-3000:]}")
    # this process imported the CPU-only build: the rows below run in a fresh one
    return {"what": "build", "built": True, "build_s": round(time.perf_counter() - start, 1)}


def make_shards(tmp: Path, images: int) -> dict:
    from pipeline.data_bench import make_synthetic_photos
    from pipeline.shard import ShardParams, shard_dataset

    cores = os.cpu_count() or 1
    start = time.perf_counter()
    source = make_synthetic_photos(tmp / "photos", images, processes=cores)
    made = time.perf_counter() - start
    shard_dataset(str(source), str(tmp / "shards"), ShardParams(resize=0, processes=cores, samples_per_shard=100),
                  progress_bar=False)  # fmt: skip
    sizes = [p.stat().st_size for p in (tmp / "photos").rglob("*.jpg")]
    return {
        "what": "photos",
        "images": images,
        "mean_kb": round(statistics.mean(sizes) / 1e3, 1),
        "make_s": round(made, 1),
        "shard_s": round(time.perf_counter() - start - made, 1),
    }


def loader_rows(shards: str, config, batch: int, device: torch.device, runs: int = 2) -> list[dict]:
    """img/s of each loader, the median of ``runs`` passes: one CPU process over 1,024 images
    (batches of 32), the device-decode path over the whole train split at ``batch``."""
    from pipeline.data import make_loader
    from pipeline.data_bench import _time_loader, torch_threads
    from pipeline.segments import stage_input_config

    input_config = stage_input_config(config)

    def timed(what: str, batch: int, limit: int = 0, **kw) -> dict:
        results = []
        for run in range(runs):
            batches, _ = make_loader(shards, "train", input_config, batch, train=True, epoch=run,
                                     pca_lighting=config.pca_lighting, **kw)  # fmt: skip
            results.append(_time_loader(itertools.islice(batches, limit or None), kw.get("device")))
        seconds, images = statistics.median(s for s, _ in results), results[0][1]
        return {"what": f"loader: {what}", "img_s": round(images / seconds, 1), "images": images, "batch": batch}

    with torch_threads(1):  # "one loader process": one core, as in a DataLoader worker
        rows = [
            timed("float, 1 process (1 thread)", 32, 32, workers=0, uint8=False),
            # the uint8 batches finished where they train, as in a training run
            timed(f"uint8, 1 process (1 thread, finished on {device.type})", 32, 32, workers=0, device=device),
        ]
    rows.append(timed(f"uint8, 2 workers, finished on {device.type}", batch, workers=2, device=device))
    rows.append(timed(f"decode on {device.type}, 2 workers", batch, workers=2, decode="device", device=device))
    rows.append(timed(f"decode on {device.type}, no workers", batch, workers=0, decode="device", device=device))
    return rows


def binarize_config(profile: str, batch: int, width: float | None):
    """A profile's binarize stage at ``batch`` (and ``width``, for the CPU tests' tiny models)."""
    from pipeline.params import load_params

    changes = {"width": width} if width else {}
    return load_params(profile).train("binarize", {**changes, "batch_size": batch}, tuned=False)


def step_rows(batch: int, deep_batch: int, steps: int, device: torch.device, width: float | None, models: set[str]):
    """The step alone: each (model, kernels, precision) the issue names, at the stated batches."""
    from pipeline.train_bench import routed_model, step_rate

    pairs = ((OFFICIAL, batch, "bireal18", "resnet18"), (DEEP, deep_batch, "bireal152", "resnet152"))
    for profile, arch_batch, binary, resnet in pairs:
        base = binarize_config(profile, arch_batch, width)
        for precision in ("fp32", "bf16") if binary in models else ():
            for kernels in ("float", "auto"):
                config = replace(base, precision=precision, kernels=kernels)
                model, packed = routed_model(config, device)
                rate = step_rate(config, model, device, steps)
                yield _step_row(config, f"step: {binary} binarize, kernels {kernels}, {precision}", rate, packed)
        if resnet in models:  # the float baseline at the same batch, in bf16
            config = replace(base, precision="bf16", kernels="float")
            model = float_resnet(resnet, device, config)
            rate = step_rate(config, model, device, steps)
            yield _step_row(config, f"step: {resnet} (float, torchvision), bf16", rate)


def lean_step_rows(batch: int, steps: int, device: torch.device, width: float | None):
    """Bi-Real-18's kernels-auto step on the bmma_lean CUDA path (issue 25's lean epilogue), fp32 and
    bf16: run last, since bmma_lean has not run on a GPU yet and a fault ends the process (none
    where it is left out: ops.skipped_cuda_paths)."""
    from cuda_ext import ops

    if device.type != "cuda" or "bmma_lean" not in ops.kernel_paths(device):
        return
    base = binarize_config(OFFICIAL, batch, width)
    for precision in ("fp32", "bf16"):
        yield lean_step_row(replace(base, precision=precision, kernels="auto"), device, steps)


def lean_step_row(config, device: torch.device, steps: int) -> dict:
    """kernels auto with its convs on the bmma_lean CUDA path (the default path is bmma)."""
    from cuda_ext import ops
    from pipeline.train_bench import routed_model, step_rate

    model, packed = routed_model(config, device)
    with ops.forced_cuda_path("bmma_lean"):
        rate = step_rate(config, model, device, steps)
    what = f"step: {config.arch} binarize, kernels auto on bmma_lean, {config.precision}"
    return {**_step_row(config, what, rate, packed), "cuda_path": "bmma_lean"}


def _step_row(config, what: str, rate: float, packed: int = 0) -> dict:
    return {
        "what": what,
        "arch": config.arch,
        "batch": config.batch_size,
        "precision": config.precision,
        "kernels": config.kernels,
        "packed_convs": packed,
        "img_s": round(rate, 1),
    }


def float_resnet(name: str, device: torch.device, config) -> torch.nn.Module:
    """torchvision's float ResNet, channels_last on a GPU, as the baselines are run."""
    import torchvision

    from pipeline.train import memory_format

    return getattr(torchvision.models, name)(num_classes=1000).to(device, memory_format=memory_format(config, device))


def compiled_rows(batch: int, steps: int, device: torch.device, width: float | None, settings) -> list[dict]:
    """Bi-Real-18 binarize in bf16 under torch.compile, each kernels setting of ``settings``;
    compile time apart."""
    from pipeline.train_bench import routed_model, step_rate

    base = binarize_config(OFFICIAL, batch, width)
    rows = []
    for kernels in settings:
        config = replace(base, precision="bf16", kernels=kernels)
        model, packed = routed_model(config, device)
        compiled = torch.compile(model)
        start = time.perf_counter()
        step_rate(config, compiled, device, steps=1, warmup=1, runs=1)  # compiles forward and backward
        compile_s = time.perf_counter() - start
        row = _step_row(config, f"step: bireal18 binarize, kernels {kernels}, bf16, torch.compile",
                        step_rate(config, compiled, device, steps), packed)  # fmt: skip
        rows.append({**row, "compile_s": round(compile_s, 1)})
    return rows


class GpuUtilization:
    """The GPU's utilization sampled every 0.1 s while the block runs (nvidia-ml-py, else nvidia-smi)."""

    def __init__(self, device: torch.device):
        self.device, self.samples, self.source = device, [], "none"
        self._stop = threading.Event()

    def __enter__(self) -> GpuUtilization:
        if self.device.type == "cuda":
            threading.Thread(target=self._sample, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        time.sleep(0.15)

    def _sample(self) -> None:
        index = self.device.index or 0
        try:
            import pynvml

            pynvml.nvmlInit()
            handle, self.source = pynvml.nvmlDeviceGetHandleByIndex(index), "nvidia-ml-py"
            while not self._stop.wait(0.1):
                self.samples.append(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
            return
        except Exception:  # not installed, or NVML not answering: ask nvidia-smi instead
            pass
        query = ["nvidia-smi", "-i", str(index), "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"]
        self.source = "nvidia-smi"
        while not self._stop.wait(0.1):
            done = subprocess.run(query, capture_output=True, text=True)
            if done.returncode == 0 and done.stdout.strip().isdigit():
                self.samples.append(int(done.stdout.strip()))

    @property
    def mean(self) -> float | None:
        return round(statistics.mean(self.samples), 1) if self.samples else None


def end_to_end_row(shards: str, batch: int, steps: int, device: torch.device, width: float | None, kernels: str):
    """Bi-Real-18 binarize in bf16 fed by the device-decode loader (2 workers): img/s over the
    epoch, the share of it the step waited for data, and the GPU's mean utilization."""
    from pipeline.data import make_loader
    from pipeline.segments import stage_input_config
    from pipeline.train import make_optimizer, memory_format, train_one_epoch
    from pipeline.train_bench import routed_model

    config = replace(binarize_config(OFFICIAL, batch, width), precision="bf16", kernels=kernels)
    model, _ = routed_model(config, device)
    optimizer = make_optimizer(model, config)
    amp, layout = device.type == "cuda", memory_format(config, device)
    metrics = {}
    loader = {"workers": 2, "pca_lighting": config.pca_lighting, "decode": "device", "device": device}
    for epoch in range(2):  # the first warms up (cuDNN, nvJPEG, the workers' start)
        batches, _ = make_loader(shards, "train", stage_input_config(config), batch, train=True, epoch=epoch, **loader)
        with GpuUtilization(device) as util:
            metrics = train_one_epoch(model, batches, optimizer, lambda s: config.lr, 0, device, max_steps=steps,
                                      amp=amp, layout=layout)  # fmt: skip
    return {
        "what": f"loader + step: bireal18 binarize, kernels {kernels}, bf16, decode on {device.type}, 2 workers",
        "img_s": round(metrics["img_s"], 1),
        "steps": metrics["steps"],
        "data_wait_fraction": round(metrics["data_wait_fraction"], 3),
        "gpu_util_pct": util.mean,
        "gpu_util_source": util.source,
    }


def targets(rows: list[dict], device: str) -> list[dict]:
    """Issue 26's targets as ratios of this run's rows (a missing row: no verdict)."""
    rate = {r["what"]: r["img_s"] for r in rows if "img_s" in r}

    def find(prefix: str) -> float | None:
        return next((v for k, v in rate.items() if k.startswith(prefix)), None)

    decode, step18 = find(f"loader: decode on {device}, 2 workers"), fastest_bf16(rows, "bireal18")
    step18 = step18 and step18["img_s"]
    step152 = fastest_bf16(rows, "bireal152")
    checks = [
        ("loader: uint8 / float, 1 process", find("loader: uint8, 1 proc"), find("loader: float, 1 proc"), 2.0),
        ("decode on the device, 2 workers / Bi-Real-18 bf16 step", decode, step18, 1.1),
        ("decode on the device, 2 workers / 4,000 img/s", decode, 4000.0, 1.0),
        ("Bi-Real-18 bf16 step / ResNet-18 bf16 step", step18, find("step: resnet18"), 0.6),
        ("Bi-Real-152 bf16 step / ResNet-152 bf16 step", step152 and step152["img_s"], find("step: resnet152"), 0.6),
        ("loader + step / Bi-Real-18 bf16 step", find("loader + step"), step18, 0.9),
    ]  # fmt: skip
    out = []
    for what, ours, baseline, target in checks:
        if ours and baseline:
            out.append({"what": f"target: {what}", "ratio": round(ours / baseline, 3), "target": target,
                        "met": ours / baseline >= target})  # fmt: skip
    return out


def fastest_bf16(rows: list[dict], arch: str) -> dict | None:
    """The faster kernels setting's bf16 step row of ``arch`` (eager, not compiled)."""
    found = [
        r
        for r in rows
        if r["what"].startswith(f"step: {arch} binarize")
        and r.get("precision") == "bf16"
        and "compile" not in r["what"]
        and "cuda_path" not in r  # a setting a user can choose: the default CUDA path
    ]
    return max(found, key=lambda r: r["img_s"]) if found else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench_results")))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, default=6000, help="synthetic photos to shard and load")
    parser.add_argument("--batch", type=int, default=256, help="Bi-Real-18 / ResNet-18 per-GPU batch")
    parser.add_argument("--deep-batch", type=int, default=64, help="Bi-Real-152 / ResNet-152 per-GPU batch")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per run (3 runs, median)")
    parser.add_argument("--width", type=float, default=None, help="another width (CPU tests: tiny models)")
    parser.add_argument("--models", default="bireal18,resnet18,bireal152,resnet152", help="which step rows")
    parser.add_argument("--no-compile", action="store_true", help="no torch.compile rows")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    rows = Rows(args.out)
    built = rows.add(build_extension(device))
    if built["built"]:  # measure with the new build: the same command in a fresh process
        return subprocess.run([sys.executable, "-m", "bench.gpu_train", *(argv or sys.argv[1:])], cwd=ROOT).returncode
    rows.add(machine(device))
    models = set(args.models.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        rows.add(make_shards(Path(tmp), args.images))
        shards = f"{tmp}/shards"
        from pipeline.params import load_params

        official = load_params(OFFICIAL).train("binarize", tuned=False)
        for row in loader_rows(shards, official, min(args.batch, 256), device):
            rows.add(row)
        for row in step_rows(args.batch, args.deep_batch, args.steps, device, args.width, models):
            rows.add(row)
        faster = (fastest_bf16(rows.rows, "bireal18") or {"kernels": "auto"})["kernels"]
        rows.add(end_to_end_row(shards, args.batch, args.steps, device, args.width, faster))
        if not args.no_compile:
            for row in compiled_rows(args.batch, args.steps, device, args.width, [faster]):
                rows.add(row)
        if "bireal18" in models:
            for row in lean_step_rows(args.batch, args.steps, device, args.width):
                rows.add(row)
    for row in targets(rows.rows, device.type):
        rows.add(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())

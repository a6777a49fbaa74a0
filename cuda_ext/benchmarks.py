"""``bireal bench kernels|model``: our 1-bit ops and the packed model against float baselines.

Both sides run in the same process on the same inputs, so the printed ratios are comparable even
on a noisy machine. CPU: F.conv2d fp32 (oneDNN) and torchvision ResNet-18 fp32; CUDA: cuDNN bf16,
channels_last. Times are medians of ``repeats`` runs after warm-up.
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

# Bi-Real-18's 3x3 binary convs at 224x224: (channels, spatial side); stride 1, C_in = C_out.
BIREAL18_SHAPES = ((64, 56), (128, 28), (256, 14), (512, 7))


def time_ms(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 3) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def _setup(device: str, threads: int) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA device visible to torch")
    if dev.type == "cpu":
        torch.set_num_threads(threads)
    return dev


def bench_kernels(device: str = "cpu", batches=(1, 16), threads: int = 2, repeats: int = 20) -> list[dict]:
    """Binary 3x3 conv (pre-packed input) vs the float conv on Bi-Real-18's shapes."""
    from . import ops
    from .reference import pack_weight_ref

    dev = _setup(device, threads)
    float_dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16
    rows = []
    for channels, side in BIREAL18_SHAPES:
        for batch in batches:
            x = torch.randn(batch, channels, side, side, device=dev)
            w = torch.randn(channels, channels, 3, 3, device=dev)
            xf = x.to(float_dtype).contiguous(memory_format=torch.channels_last)
            wf = w.to(float_dtype).contiguous(memory_format=torch.channels_last)
            px, pw = ops.pack_signs(x), pack_weight_ref(w)
            with torch.inference_mode():
                ours = time_ms(lambda: ops.binary_conv2d(px, pw, channels, 1, 1, 0.0), dev, repeats)
                packed = time_ms(lambda: ops.binary_conv2d(ops.pack_signs(x), pw, channels, 1, 1, 0.0),
                                 dev, repeats)
                base = time_ms(lambda: F.conv2d(xf, wf, padding=1), dev, repeats)
            rows.append({"shape": f"{channels}x{side}x{side}", "batch": batch, "ours_ms": ours,
                         "ours_with_pack_ms": packed, "baseline_ms": base, "speedup": base / ours,
                         "baseline": f"F.conv2d {str(float_dtype).split('.')[-1]}"})
    return rows


def bench_model(device: str = "cpu", batches=(1, 16), threads: int = 2, repeats: int = 10) -> list[dict]:
    """PackedBiReal-18 vs torchvision ResNet-18 (float), 224x224, 1000 classes."""
    import tempfile

    import torchvision

    import bireal_core as bc

    from .packed import export_model, load_packed

    dev = _setup(device, threads)
    with tempfile.TemporaryDirectory() as tmp:
        packed, _ = load_packed(export_model(bc.create_model("bireal18").eval(), Path(tmp) / "b18.safetensors"),
                                device=dev)
    resnet = torchvision.models.resnet18().eval().to(dev).to(memory_format=torch.channels_last)
    autocast = torch.autocast("cuda", torch.bfloat16) if dev.type == "cuda" else torch.autocast("cpu", enabled=False)
    rows = []
    for batch in batches:
        x = torch.randn(batch, 3, 224, 224, device=dev).contiguous(memory_format=torch.channels_last)
        n = repeats if batch <= 16 else max(3, repeats // 2)
        with torch.inference_mode():
            ours = time_ms(lambda: packed(x), dev, n)
            with autocast:
                base = time_ms(lambda: resnet(x), dev, n)
        rows.append({"shape": "bireal18 vs resnet18 @224", "batch": batch, "ours_ms": ours,
                     "baseline_ms": base, "speedup": base / ours,
                     "ours_img_s": batch / ours * 1e3, "baseline_img_s": batch / base * 1e3,
                     "baseline": "torchvision resnet18 " + ("fp32" if dev.type == "cpu" else "bf16")})
    return rows


def format_table(rows: list[dict], title: str) -> str:
    cols = [("shape", 26, "{}"), ("batch", 6, "{}"), ("ours_ms", 10, "{:.3f}"),
            ("ours_with_pack_ms", 18, "{:.3f}"), ("baseline_ms", 12, "{:.3f}"), ("speedup", 8, "{:.1f}x")]
    cols = [c for c in cols if any(c[0] in r for r in rows)]
    lines = [title, "".join(f"{name:>{w}}" for name, w, _ in cols)]
    for r in rows:
        lines.append("".join(f"{fmt.format(r[name]) if name in r else '-':>{w}}" for name, w, fmt in cols))
    lines.append(f"baseline: {rows[0]['baseline']}")
    return "\n".join(lines)


def machine_description(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    from . import ops

    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads, kernel path {ops.cpu_path()}"


def run(what: str, device: str, json_path: str | None = None, threads: int = 2) -> list[dict]:
    rows = (bench_kernels if what == "kernels" else bench_model)(device=device, threads=threads)
    title = f"bireal bench {what} --device {device}  [{machine_description(device)}, torch {torch.__version__}]"
    print(format_table(rows, title))
    if json_path:
        Path(json_path).write_text(json.dumps({"what": what, "device": device,
                                               "machine": machine_description(device),
                                               "torch": torch.__version__, "rows": rows}, indent=2))
    return rows

"""Where the packed Bi-Real-18's time goes, kernel by kernel, against float ResNet-18: the profile
that orders issue 25's work (the binary blocks, the float stem, the shortcuts, the casts).

    python3 -m bench.gpu_profile [--out DIR] [--batches 256,1] [--iters 10]

For each model (the packed Bi-Real-18 with bfloat16 activations, as loaded and with its float-part
switches on: the stem space to depth, the shortcuts fused; torchvision's ResNet-18 in bf16,
channels_last), batch and ``cudnn.benchmark`` setting (off, on), ``torch.profiler`` records
``--iters`` forwards after a warm-up. Each kernel's device time per forward is summed by name and
put in a group (binary: our kernels; conv: cuDNN's; batchnorm; pool; elementwise and casts; other),
so the rows say what a forward costs and which part is not the binary convs; ``kernels`` is the
number of kernels a forward launches (at batch 1, the nodes of its CUDA graph: issue 25 budgets
~25). One JSON line per (model, batch, setting) in DIR/profile.jsonl as it is measured; a table is
printed. On a CPU (``--device cpu``) the same code reads the CPU operators' self time instead (CI
runs it so).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import torch

GROUPS = (  # first match wins; names of CUDA kernels and of aten operators (the CPU profile)
    ("binary", r"bireal|binary_conv|pack_signs|tap_sums|border_classes|max_pool_signs"),
    ("conv", r"conv|cudnn|implicit_gemm|xmma|sm\d+_.*gemm|wgrad|dgrad|fprop"),
    ("batchnorm", r"batch_norm|bn_|batchnorm"),
    ("pool", r"pool"),
    ("linear", r"gemm|matmul|addmm|linear|cutlass"),
    ("elementwise", r"elementwise|vectorized|copy|add|mul|cast|to_copy|fill|clamp|relu|where|sign"),
)


def group_of(name: str) -> str:
    lowered = name.lower()
    return next((group for group, pattern in GROUPS if re.search(pattern, lowered)), "other")


def models(device: torch.device, width: float):
    """(name, forward) pairs: the packed Bi-Real-18 in bf16 activations, as loaded and with
    ``space_to_depth_stem`` and ``fuse_shortcuts``, and ResNet-18 with bf16 weights (on a GPU; float32 on a CPU), all
    channels_last, each casting its float32 input once."""
    import torchvision

    import bireal_core as bc
    from cuda_ext.packed import export_model, load_packed

    with tempfile.TemporaryDirectory() as tmp:
        path = export_model(bc.create_model("bireal18", width=width).eval(), Path(tmp) / "b18.safetensors")
        packed, _ = load_packed(path, device=device)
        fused, _ = load_packed(path, device=device)
    fused.space_to_depth_stem().fuse_shortcuts()
    if device.type == "cuda":
        packed.set_activation_dtype(torch.bfloat16)
        fused.set_activation_dtype(torch.bfloat16)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    resnet = torchvision.models.resnet18().eval().to(device, dtype).to(memory_format=torch.channels_last)

    def resnet_forward(x):
        return resnet(x.to(dtype))

    precision = "bf16" if device.type == "cuda" else "fp32"
    return [
        (f"bireal18 packed {precision}", packed),
        (f"bireal18 packed {precision} s2d stem, fused shortcuts", fused),
        (f"resnet18 {precision}", resnet_forward),
    ]


def profile_forward(forward, x: torch.Tensor, iters: int) -> tuple[dict[str, float], float | None]:
    """Device (CUDA) or self CPU time per forward, ms, summed by kernel / operator name; and on a GPU
    the kernels launched per forward (None on a CPU, whose operators are not kernels)."""
    from torch.profiler import ProfilerActivity, profile

    on_gpu = x.is_cuda
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with torch.inference_mode():
        for _ in range(3):
            forward(x)
        if on_gpu:
            torch.cuda.synchronize()
        with profile(activities=activities) as prof:
            for _ in range(iters):
                forward(x)
            if on_gpu:
                torch.cuda.synchronize()
    times: dict[str, float] = defaultdict(float)
    kernels = 0
    for event in prof.events():
        if on_gpu and event.device_type == torch.autograd.DeviceType.CUDA:
            times[event.name] += event.device_time / 1e3 / iters  # us -> ms
            kernels += 1
        elif not on_gpu and event.name.startswith(("aten::", "bireal::")):
            times[event.name] += event.self_cpu_time_total / 1e3 / iters
    return dict(times), (kernels / iters if on_gpu else None)


def row_of(
    model: str, batch: int, benchmark: bool, times: dict[str, float], kernels: float | None, top: int = 12
) -> dict:
    groups: dict[str, float] = defaultdict(float)
    for name, ms in times.items():
        groups[group_of(name)] += ms
    total = sum(times.values())
    ranked = sorted(times.items(), key=lambda kv: -kv[1])[:top]
    return {
        "model": model,
        "batch": batch,
        "cudnn_benchmark": benchmark,
        "total_ms": round(total, 4),
        "kernels": kernels,
        "groups_ms": {k: round(v, 4) for k, v in sorted(groups.items(), key=lambda kv: -kv[1])},
        "top": [{"name": name[:120], "group": group_of(name), "ms": round(ms, 4)} for name, ms in ranked],
    }


def format_row(row: dict) -> str:
    groups = ", ".join(f"{k} {v:.3f}" for k, v in row["groups_ms"].items())
    kernels = "" if row["kernels"] is None else f" in {row['kernels']:.0f} kernels"
    lines = [f"{row['model']:<18} batch {row['batch']:<4} cudnn.benchmark {str(row['cudnn_benchmark']):<5} "
             f"{row['total_ms']:.3f} ms per forward{kernels}: {groups}"]  # fmt: skip
    lines += [f"    {t['ms']:>9.4f} ms  {t['group']:<11} {t['name']}" for t in row["top"][:8]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench_results")))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batches", default="256,1")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--width", type=float, default=1.0, help="Bi-Real-18's width (CPU tests: smaller)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "profile.jsonl"
    settings = (False, True) if device.type == "cuda" else (False,)
    for name, forward in models(device, args.width):
        for batch in (int(b) for b in args.batches.split(",")):
            x = torch.randn(batch, 3, 224, 224, device=device).contiguous(memory_format=torch.channels_last)
            for benchmark in settings:
                torch.backends.cudnn.benchmark = benchmark
                row = row_of(name, batch, benchmark, *profile_forward(forward, x, args.iters))
                with path.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(format_row(row), flush=True)
    torch.backends.cudnn.benchmark = False
    return 0


if __name__ == "__main__":
    sys.exit(main())

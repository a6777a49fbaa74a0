"""``bireal bench kernels|model``: our 1-bit ops and the packed model against float baselines.

Both sides run in the same process on the same inputs, so the printed ratios are comparable even
on a noisy machine. CPU: F.conv2d fp32 (oneDNN) and torchvision ResNet-18 fp32; CUDA: cuDNN bf16,
channels_last, with ``cudnn.benchmark`` on (each shape gets cuDNN's fastest algorithm), and each
kernel row's floor (``gpu_floors``) and how close the best variant comes to it. Times are medians
of ``repeats`` runs after warm-up (CUDA: device events around each call; batch 1 of the model also
replayed from a CUDA graph, which removes launch gaps).
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

OnRow = Callable[[dict], None]  # gets each row of a table as it is measured

# Bi-Real-18's 3x3 binary convs at 224x224: (channels, spatial side); stride 1, C_in = C_out.
BIREAL18_SHAPES = ((64, 56), (128, 28), (256, 14), (512, 7))
# binary MACs per second of mma.sync m16n8k256 AND-popc, measured on an H200 (2026-11-27); the H100
# has the same tensor-core peak. The floors below take it as the MMA limit.
BMMA_MACS_PER_S = 5.1e15


def gpu_floors(
    channels: int, side: int, batch: int, copy_gb_s: float, stride: int = 1, out_channels: int | None = None
) -> dict:
    """The fastest a 3x3 binary conv (``channels`` in, ``out_channels`` out: ``channels`` unless
    given) and its fused block can run on this GPU: the larger of the MMA time (the K bits padded to
    256-bit steps, one AND-popc MMA per step, at ``BMMA_MACS_PER_S``) and the memory time of the
    bytes each must move, at the copy rate measured in the same run (``copy_gb_s``: bytes read +
    written per s). The conv reads packed x and W and writes bf16 out; the block also reads the bf16
    residual and writes the packed signs of its out.
    -> {"mma_ms", "conv_bytes", "block_bytes", "conv_floor_ms", "block_floor_ms"}."""
    out_channels = out_channels or channels
    words, out_words = (channels + 63) // 64, (out_channels + 63) // 64
    out_side = (side + 2 - 3) // stride + 1
    pixels_out = batch * out_side * out_side
    k_bits = -(-9 * words // 4) * 256  # 9 taps of `words` words, in steps of 4 words
    mma_ms = pixels_out * out_channels * k_bits / BMMA_MACS_PER_S * 1e3
    packed_x, packed_w = batch * side * side * words * 8, out_channels * 9 * words * 8
    out_bf16, packed_out = pixels_out * out_channels * 2, pixels_out * out_words * 8
    conv_bytes = packed_x + packed_w + out_bf16
    block_bytes = conv_bytes + out_bf16 + packed_out  # + the residual read, + the output's signs
    per_ms = copy_gb_s * 1e9 / 1e3
    return {
        "mma_ms": mma_ms,
        "conv_bytes": conv_bytes,
        "block_bytes": block_bytes,
        "conv_floor_ms": max(mma_ms, conv_bytes / per_ms),
        "block_floor_ms": max(mma_ms, block_bytes / per_ms),
    }


def time_ms(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 3) -> float:
    if device.type == "cuda":
        return _time_cuda_ms(fn, repeats, warmup)
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def _time_cuda_ms(fn: Callable[[], object], repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def cuda_graph(fn: Callable[[], torch.Tensor]) -> torch.cuda.CUDAGraph:
    """``fn`` captured as a CUDA graph (warmed up on a side stream first, as capture requires)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def forward_ms(fn: Callable[[], object], device: torch.device, batch: int, repeats: int, graph_repeats: int = 20):
    """Median ms of ``fn``; at batch 1 on a GPU, of its CUDA graph's replay (no launch gaps), at
    least ``graph_repeats`` times."""
    if device.type == "cuda" and batch == 1:
        with torch.no_grad():
            graph = cuda_graph(fn)
        return time_ms(graph.replay, device, max(repeats, graph_repeats))
    return time_ms(fn, device, repeats)


def _setup(device: str, threads: int) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA device visible to torch")
    if dev.type == "cpu":
        torch.set_num_threads(threads)
    else:  # the baselines get cuDNN's own pick of algorithm per shape, as a user would run them
        torch.backends.cudnn.benchmark = True
    return dev


def default_batches(device: str) -> tuple[int, ...]:
    return (1, 16) if torch.device(device).type == "cpu" else (1, 256)


def bench_kernels(
    device: str = "cpu", batches=None, threads: int = 2, repeats: int = 20, on_row: OnRow | None = None
) -> list[dict]:
    """Binary 3x3 conv (pre-packed input) vs the float conv on Bi-Real-18's shapes, and the fused
    block (conv, scale/bias, residual add, sign + pack of the output) vs the float block (conv, BN,
    add, sign). ``on_row`` gets each row as it is measured."""
    from . import ops

    dev = _setup(device, threads)
    float_dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16
    copy_gb_s = copy_bandwidth_gb_s(dev, gib=0.25 if dev.type == "cpu" else 1.0)  # once per run
    rows = []
    for channels, side in BIREAL18_SHAPES:
        for batch in batches or default_batches(device):
            x = torch.randn(batch, channels, side, side, device=dev).contiguous(memory_format=torch.channels_last)
            w = torch.randn(channels, channels, 3, 3, device=dev)
            scale, bias = torch.rand(channels, device=dev) + 0.5, torch.randn(channels, device=dev)
            xf = x.to(float_dtype)
            wf = w.to(float_dtype).contiguous(memory_format=torch.channels_last)
            mean, var = torch.randn(channels, device=dev), torch.rand(channels, device=dev) + 0.5

            def float_block():
                y = F.batch_norm(F.conv2d(xf, wf, padding=1), mean, var, scale, bias, False, 0.0, 1e-5) + xf
                return y, torch.sign(y)

            px, pw = ops.pack_signs(x), ops.pack_signs(w)
            with torch.inference_mode():
                ours = time_ms(lambda: ops.binary_conv2d(px, pw, channels, 1, 1, 0.0), dev, repeats)
                packed = time_ms(lambda: ops.binary_conv2d(ops.pack_signs(x), pw, channels, 1, 1, 0.0), dev, repeats)
                base = time_ms(lambda: F.conv2d(xf, wf, padding=1), dev, repeats)
                block = time_ms(lambda: ops.binary_block(px, pw, channels, 1, 1, 0.0, scale, bias, x), dev, repeats)
                base_block = time_ms(float_block, dev, repeats)
            moved = px.numel() * 8 + batch * channels * side * side * 4  # packed in, float32 out
            row = {
                "shape": f"{channels}x{side}x{side}",
                "batch": batch,
                "ours_ms": ours,
                "ours_gb_s": moved / ours / 1e6,
                "copy_gb_s": copy_gb_s,
                "ours_with_pack_ms": packed,
                "baseline_ms": base,
                "speedup": base / ours,
                "block_ms": block,
                "float_block_ms": base_block,
                "block_speedup": base_block / block,
                "baseline": f"F.conv2d {str(float_dtype).split('.')[-1]}; block: conv + BN + add + sign",
            }
            if dev.type == "cuda":
                with torch.inference_mode():
                    row.update(cuda_variants(ops, px, pw, channels, scale, bias, xf, base, repeats))
                row.update(of_floor(row, gpu_floors(channels, side, batch, copy_gb_s)))
            else:
                row.update(cpu_bound(channels, side, batch, ours, copy_gb_s))
            rows.append(row)
            if on_row:
                on_row(row)
    return rows


# The bfloat16-output rows, one per tensor-core path, of the kernel table (cuda_variants) and the
# model table (bf16_model_rows)
BF16_PATH_KEYS = {
    "bmma": "bf16_ms", "bmma_async": "async_bf16_ms", "bmma_lean": "lean_bf16_ms", "bmma_lean1": "lean1_bf16_ms",
    "bmma_split": "split_bf16_ms", "bmma_halo": "halo_bf16_ms", "bmma_halo_w": "halo_w_bf16_ms",
    "bmma_halo_p": "halo_p_bf16_ms",
}  # fmt: skip
# The kernel table's fused-block rows with bf16 in and out: the best of bmma and bmma_async, then one
# per lean and halo path
BF16_BLOCK_KEYS = {
    ("bmma", "bmma_async"): "block_bf16_ms", ("bmma_lean",): "lean_block_bf16_ms",
    ("bmma_lean1",): "lean1_block_bf16_ms", ("bmma_split",): "split_block_bf16_ms",
    ("bmma_halo",): "halo_block_bf16_ms", ("bmma_halo_w",): "halo_w_block_bf16_ms",
    ("bmma_halo_p",): "halo_p_block_bf16_ms",
}  # fmt: skip


def of_floor(row: dict, floors: dict) -> dict:
    """The row's best bf16 conv and its bf16 block against their floors (``gpu_floors``), and the
    ratio to cuDNN that each floor allows (the ceiling of ``bf16_speedup``)."""
    best_conv = min(row.get(key, float("inf")) for key in BF16_PATH_KEYS.values())
    best_block = min(row.get(key, float("inf")) for key in BF16_BLOCK_KEYS.values())
    return {
        "conv_floor_ms": floors["conv_floor_ms"],
        "conv_of_floor": floors["conv_floor_ms"] / best_conv,
        "floor_x_cudnn": row["baseline_ms"] / floors["conv_floor_ms"],
        "block_floor_ms": floors["block_floor_ms"],
        "block_of_floor": floors["block_floor_ms"] / best_block,
        "block_floor_x_float_block": row["float_block_ms"] / floors["block_floor_ms"],
    }


def cpu_bound(channels: int, side: int, batch: int, ours_ms: float, copy_gb_s: float) -> dict:
    """The row's ceiling on this CPU, measured in the same run: its binary MACs at the micro-kernel's
    rate (data in L1, all threads running it at once) plus its float32 output bytes at the copy rate,
    i.e. the time this machine takes to copy that many bytes (``copy_gb_s`` counts bytes read +
    written, twice the bytes copied). ``of_bound``: bound / measured; above 100% where the output
    beats memory speed (it stays in cache at batch 1; large ones are streamed, with no read of the
    lines they overwrite)."""
    from . import _C

    macs = batch * side * side * channels * channels * 9
    rate = _C.cpu_micro_kernel_rate((channels + 63) // 64, 0.05)  # all threads at once
    out_bytes = batch * channels * side * side * 4
    copied_per_s = copy_gb_s * 1e9 / 2
    bound = macs / rate * 1e3 + out_bytes / copied_per_s * 1e3
    return {"micro_tmac_s": rate / 1e12, "bound_ms": bound, "of_bound": bound / ours_ms}


def cuda_variants(ops, px, pw, channels, scale, bias, residual_bf16, base_ms, repeats) -> dict:
    """The switched CUDA variants on one shape: the cp.async kernel (float32 out), the six
    tensor-core kernels with a bfloat16 output, and the fused block with bfloat16 in and out (the
    best of bmma and bmma_async, then each of the lean and halo kernels'); the best bf16 conv
    against cuDNN."""

    def conv(path, out_dtype=None):
        with ops.forced_cuda_path(path):
            return time_ms(
                lambda: ops.binary_conv2d(px, pw, channels, 1, 1, 0.0, out_dtype=out_dtype), px.device, repeats
            )

    def block(path):
        with ops.forced_cuda_path(path):
            return time_ms(
                lambda: ops.binary_block(
                    px, pw, channels, 1, 1, 0.0, scale, bias, residual_bf16, out_dtype=torch.bfloat16
                ),
                px.device,
                repeats,
            )

    runnable = ops.kernel_paths(px.device)  # less any path that lost the CUDA context (skipped_cuda_paths)
    bf16 = {path: conv(path, torch.bfloat16) for path in BF16_PATH_KEYS if path in runnable}
    return {
        **({"async_ms": conv("bmma_async")} if "bmma_async" in runnable else {}),
        **{BF16_PATH_KEYS[path]: ms for path, ms in bf16.items()},
        "bf16_speedup": base_ms / min(bf16.values()),
        **{
            key: min(block(path) for path in paths if path in runnable)
            for paths, key in BF16_BLOCK_KEYS.items()
            if any(path in runnable for path in paths)
        },
    }


def bench_model(
    device: str = "cpu", batches=None, threads: int = 2, repeats: int = 10, on_row: OnRow | None = None
) -> list[dict]:
    """PackedBiReal-18 vs torchvision ResNet-18 (float), 224x224, 1000 classes. ``on_row`` gets each
    row as it is measured (on a CPU, before the user-default timings below are added). On a GPU the
    baseline gets the care ours gets: bf16 weights (no per-call casts), channels_last,
    ``cudnn.benchmark`` on, and at batch 1 a CUDA graph too."""
    import tempfile

    import torchvision

    import bireal_core as bc

    from .packed import export_model, load_packed

    dev = _setup(device, threads)
    with tempfile.TemporaryDirectory() as tmp:
        packed, _ = load_packed(
            export_model(bc.create_model("bireal18").eval(), Path(tmp) / "b18.safetensors"), device=dev
        )
    resnet = torchvision.models.resnet18().eval().to(dev).to(memory_format=torch.channels_last)
    baseline_dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    resnet = resnet.to(baseline_dtype)
    rows = []
    for batch in batches or default_batches(device):
        x = torch.randn(batch, 3, 224, 224, device=dev).contiguous(memory_format=torch.channels_last)
        n = repeats if batch <= 16 else max(3, repeats // 2)
        row = {"shape": "bireal18 vs resnet18 @224", "batch": batch}
        with torch.inference_mode():
            row["ours_ms"] = time_ms(lambda: packed(x), dev, n)
            x_base = x.to(baseline_dtype)
            row["baseline_ms"] = base = time_ms(lambda: resnet(x_base), dev, n)
        if dev.type == "cuda" and batch == 1:  # replayed as CUDA graphs
            row["ours_graph_ms"] = forward_ms(lambda: packed(x), dev, batch, n)
            row["baseline_graph_ms"] = forward_ms(lambda: resnet(x_base), dev, batch, n)
            base = min(base, row["baseline_graph_ms"])
        if dev.type == "cuda":
            row.update(bf16_model_rows(packed, x, dev, n))
        best = min(row["ours_ms"], row.get("ours_graph_ms", float("inf")))
        if "bf16_ms" in row:
            tuned_keys = ("tuned_bf16_ms", "tuned_pdl_bf16_ms")
            best_bf16 = min(row[key] for key in (*BF16_PATH_KEYS.values(), *FLOAT_PART_SWITCHES, *tuned_keys))
            row.update(bf16_img_s=batch / best_bf16 * 1e3, bf16_vs_baseline=base / best_bf16)
        rows.append(
            {
                **row,
                "speedup": base / best,
                "ours_img_s": batch / best * 1e3,
                "baseline_img_s": batch / base * 1e3,
                "baseline": "torchvision resnet18 "
                + ("fp32" if dev.type == "cpu" else "bf16 weights, channels_last, cudnn.benchmark")
                + ("; speedups use each side's best of eager and graph" if dev.type == "cuda" else ""),
            }
        )
        if on_row:
            on_row(rows[-1])
    if dev.type == "cpu":
        user_default_rows(rows, packed, resnet, repeats)
    return rows


def user_default_rows(rows: list[dict], packed, resnet, repeats: int) -> None:
    """The CPU rows as a user runs the models: ``bireal predict``, ``bireal evaluate`` and the model
    server keep freed memory in the process (``memory.keep_freed_memory``). The rows timed so far
    (glibc's defaults: every forward faults in fresh pages for its activations) move to
    ``*_glibc_ms`` and ``speedup_glibc``; then, the switch being process-wide and one-way, both
    models are timed again with freed memory kept, into ``ours_ms``, ``baseline_ms`` and
    ``speedup``. Where the C library is not glibc nothing changes, as for a user there."""
    from .memory import keep_freed_memory

    if not keep_freed_memory():
        return
    for row in rows:
        row["ours_glibc_ms"], row["baseline_glibc_ms"] = row["ours_ms"], row["baseline_ms"]
        row["speedup_glibc"] = row["speedup"]
        batch = row["batch"]
        x = torch.randn(batch, 3, 224, 224).contiguous(memory_format=torch.channels_last)
        n = repeats if batch <= 16 else max(3, repeats // 2)
        with torch.inference_mode():
            row["ours_ms"] = time_ms(lambda: packed(x), torch.device("cpu"), n)
            row["baseline_ms"] = time_ms(lambda: resnet(x), torch.device("cpu"), n)
        row["speedup"] = row["baseline_ms"] / row["ours_ms"]
        row["ours_img_s"], row["baseline_img_s"] = batch / row["ours_ms"] * 1e3, batch / row["baseline_ms"] * 1e3
        row["baseline"] += (
            "; both as bireal predict/evaluate run them (freed memory kept in the process); "
            "*_glibc: with glibc's allocator defaults"
        )


def bench_memory(device: str = "cpu", threads: int = 2, repeats: int = 10, on_row: OnRow | None = None) -> list[dict]:
    """Where the packed net meets memory rather than compute, each pair timed in one process:
    - the ImageNet stem's pool: ``max_pool_signs`` against ``max_pool2d`` + ``pack_signs``;
    - a layer-1 binary block (64x56x56, batch 16) with a fresh residual each call (8 rotating, as
      in the network, where it is the previous block's output, streamed to memory) against one
      residual that stays in cache (the kernels table's setting);
    - the packed Bi-Real-18 with its stem pool fused (``run_stem``) against the pool and the first
      block's pack run separately."""
    import itertools
    import tempfile

    import torch.nn.functional as F

    import bireal_core as bc

    from . import ops
    from .packed import export_model, load_packed
    from .reference import pack_weight_ref

    dev = _setup(device, threads)
    rows = []
    for batch in (1, 16):
        x = torch.randn(batch, 64, 112, 112, device=dev).contiguous(memory_format=torch.channels_last)
        fused = time_ms(lambda: ops.max_pool_signs(x, 3, 2, 1), dev, repeats)
        apart = time_ms(lambda: ops.pack_signs(F.max_pool2d(x, 3, 2, 1)), dev, repeats)
        rows.append({"shape": "stem pool 64x112x112", "batch": batch, "ours_ms": fused, "baseline_ms": apart})
    w = pack_weight_ref(torch.randn(64, 64, 3, 3)).to(dev)
    scale, bias = torch.randn(64, device=dev), torch.randn(64, device=dev)
    residuals = [torch.randn(16, 64, 56, 56, device=dev) for _ in range(8)]
    residuals = [r.contiguous(memory_format=torch.channels_last) for r in residuals]  # 12.8 MB each
    px, calls = ops.pack_signs(residuals[0]), itertools.count()

    def block(fresh: bool):
        r = residuals[next(calls) % 8] if fresh else residuals[0]
        return ops.binary_block(px, w, 64, 1, 1, 0.0, scale, bias, r)

    rows.append(
        {
            "shape": "layer-1 block 64x56x56",
            "batch": 16,
            "ours_ms": time_ms(lambda: block(True), dev, repeats),
            "block_ms": time_ms(lambda: block(False), dev, repeats),
        }
    )
    with tempfile.TemporaryDirectory() as tmp:
        packed, _ = load_packed(
            export_model(bc.create_model("bireal18").eval(), Path(tmp) / "b18.safetensors"), device=dev
        )
    fused_stem = packed.run_stem
    for batch in (1, 16):
        x = torch.randn(batch, 3, 224, 224, device=dev).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            packed.run_stem = fused_stem
            ours = time_ms(lambda: packed(x), dev, repeats if batch == 1 else 6)
            packed.run_stem = lambda x: (packed.stem(x), None)  # pool, then the first block packs
            base = time_ms(lambda: packed(x), dev, repeats if batch == 1 else 6)
        rows.append({"shape": "bireal18 stem fused @224", "batch": batch, "ours_ms": ours, "baseline_ms": base})
    packed.run_stem = fused_stem
    for row in rows:
        if "baseline_ms" in row:
            row["speedup"] = row["baseline_ms"] / row["ours_ms"]
    rows[0]["baseline"] = (
        "pool rows: max_pool2d + pack_signs; block row: ours_ms with a fresh residual each call (8 rotating), "
        "block_ms with one residual in cache; model rows: the stem pool and the first block's pack apart"
    )
    for row in rows if on_row else ():  # at the end: a few quick rows, their ratios set last
        on_row(row)
    return rows


# The float parts' switches the model table times (PackedBiReal's, off by default): column -> how.
# The stem's two exclude each other (tuned_bf16_ms takes the faster, if either beats the plain stem).
STEM_SWITCHES = {
    "stem8_bf16_ms": lambda net: net.pad_stem_input(8),  # 5 zero input channels: a shape tensor cores take
    "stem_s2d_bf16_ms": lambda net: net.space_to_depth_stem(),  # 4x4 conv on 16 channels of 2x2 blocks
}
OTHER_SWITCHES = {"shortcut2x2_bf16_ms": lambda net: net.fuse_shortcuts()}  # pool + 1x1 + bias as one 2x2 conv
FLOAT_PART_SWITCHES = {**STEM_SWITCHES, **OTHER_SWITCHES}


def bf16_model_rows(packed, x: torch.Tensor, dev: torch.device, repeats: int) -> dict:
    """The packed model with bfloat16 activations (batch 1: CUDA graphs): on each tensor-core kernel;
    with each float-part switch on the default kernel; and ``tuned_bf16_ms``, the faster stem switch
    (if one beats the plain stem) and the other switches on, each binary conv on its fastest path
    for this input (``PackedBiReal.tune_kernel_paths``; the paths in ``tuned_paths``), summed up in
    ``tuned``: the configuration to compare with the target."""
    from . import ops

    def with_switches(*columns):  # a copy made from the float32 weights, then put in bfloat16
        net = copy.deepcopy(packed)
        for column in columns:
            FLOAT_PART_SWITCHES[column](net)
        return net.set_activation_dtype(torch.bfloat16)

    row = {}
    switched = {column: with_switches(column) for column in FLOAT_PART_SWITCHES}
    packed.set_activation_dtype(torch.bfloat16)
    try:
        with torch.inference_mode():
            # the CUDA paths (forced also on a CPU, where they change nothing), less any that lost
            # the CUDA context on this machine (skipped_cuda_paths)
            runnable = ops.kernel_paths("cuda")
            for path, key in BF16_PATH_KEYS.items():
                if path not in runnable:
                    continue
                with ops.forced_cuda_path(path):
                    row[key] = forward_ms(lambda: packed(x), dev, x.shape[0], repeats)
            for column, net in switched.items():
                row[column] = forward_ms(lambda: net(x), dev, x.shape[0], repeats)
            stem = min(STEM_SWITCHES, key=row.get)
            columns = [*([stem] if row[stem] < row["bf16_ms"] else []), *OTHER_SWITCHES]
            packed.set_activation_dtype(torch.float32)  # (the switches are made from float32 weights)
            tuned = with_switches(*columns)
            row["tuned_paths"] = tuned.tune_kernel_paths(x)
            row["tuned_bf16_ms"] = forward_ms(lambda: tuned(x), dev, x.shape[0], repeats)
            with ops.programmatic_launch():  # the same, each kernel's launch overlapping the one before
                row["tuned_pdl_bf16_ms"] = forward_ms(lambda: tuned(x), dev, x.shape[0], repeats)
            paths = Counter(row["tuned_paths"].values()).most_common()
            per_layer = "per-layer paths (" + ", ".join(f"{path} x{n}" for path, n in paths) + ")"
            row["tuned"] = " + ".join([per_layer, *(c.removesuffix("_bf16_ms") for c in columns)])
    finally:
        packed.set_activation_dtype(torch.float32)
    return row


def format_table(rows: list[dict], title: str) -> str:
    cols = [
        ("shape", 26, "{}"),
        ("batch", 6, "{}"),
        ("ours_ms", 10, "{:.4f}"),
        ("ours_with_pack_ms", 18, "{:.4f}"),
        ("ours_graph_ms", 14, "{:.4f}"),
        ("baseline_ms", 12, "{:.4f}"),
        ("baseline_graph_ms", 18, "{:.4f}"),
        ("speedup", 8, "{:.1f}x"),
        ("ours_gb_s", 10, "{:,.0f}"),
        ("block_ms", 10, "{:.4f}"),
        ("float_block_ms", 15, "{:.4f}"),
        ("block_speedup", 14, "{:.1f}x"),
        ("async_ms", 10, "{:.4f}"),
        ("bf16_ms", 10, "{:.4f}"),
        ("async_bf16_ms", 14, "{:.4f}"),
        ("lean_bf16_ms", 13, "{:.4f}"),
        ("lean1_bf16_ms", 14, "{:.4f}"),
        ("split_bf16_ms", 14, "{:.4f}"),
        ("halo_bf16_ms", 13, "{:.4f}"),
        ("halo_w_bf16_ms", 15, "{:.4f}"),
        ("halo_p_bf16_ms", 15, "{:.4f}"),
        ("stem8_bf16_ms", 14, "{:.4f}"),
        ("stem_s2d_bf16_ms", 17, "{:.4f}"),
        ("shortcut2x2_bf16_ms", 20, "{:.4f}"),
        ("tuned_bf16_ms", 14, "{:.4f}"),
        ("tuned_pdl_bf16_ms", 18, "{:.4f}"),
        ("bf16_speedup", 13, "{:.1f}x"),
        ("block_bf16_ms", 14, "{:.4f}"),
        ("lean_block_bf16_ms", 19, "{:.4f}"),
        ("lean1_block_bf16_ms", 20, "{:.4f}"),
        ("split_block_bf16_ms", 20, "{:.4f}"),
        ("halo_block_bf16_ms", 19, "{:.4f}"),
        ("halo_w_block_bf16_ms", 21, "{:.4f}"),
        ("halo_p_block_bf16_ms", 21, "{:.4f}"),
        ("conv_floor_ms", 14, "{:.4f}"),
        ("conv_of_floor", 14, "{:.0%}"),
        ("floor_x_cudnn", 14, "{:.1f}x"),
        ("block_floor_ms", 15, "{:.4f}"),
        ("block_of_floor", 15, "{:.0%}"),
        ("block_floor_x_float_block", 26, "{:.1f}x"),
        ("micro_tmac_s", 13, "{:.2f}"),
        ("bound_ms", 10, "{:.4f}"),
        ("of_bound", 9, "{:.0%}"),
        ("ours_img_s", 11, "{:,.0f}"),
        ("baseline_img_s", 15, "{:,.0f}"),
        ("bf16_img_s", 11, "{:,.0f}"),
        ("bf16_vs_baseline", 17, "{:.1f}x"),
        ("ours_glibc_ms", 14, "{:.4f}"),
        ("baseline_glibc_ms", 18, "{:.4f}"),
        ("speedup_glibc", 14, "{:.1f}x"),
    ]
    cols = [c for c in cols if any(c[0] in r for r in rows)]
    lines = [title, "".join(f"{name:>{w}}" for name, w, _ in cols)]
    for r in rows:
        lines.append("".join(f"{fmt.format(r[name]) if name in r else '-':>{w}}" for name, w, fmt in cols))
    lines.append(f"baseline: {rows[0]['baseline']}")
    return "\n".join(lines)


def copy_bandwidth_gb_s(device: torch.device, gib: float = 1.0) -> float:
    """Device-to-device copy rate, bytes read + written (the memory ceiling of docs/cuda.md)."""
    src = torch.empty(int(gib * 2**30), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, repeats=10)
    return 2 * src.numel() / ms / 1e6


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else "unknown CPU"."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def machine_description(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    from . import ops

    return f"{cpu_model()}, {torch.get_num_threads()} threads, kernel path {ops.cpu_path()}"


def run(
    what: str, device: str, json_path: str | None = None, threads: int = 2, jsonl_path: str | None = None
) -> list[dict]:
    """One table: printed, written whole to ``json_path``, and row by row, as measured, to
    ``jsonl_path`` (a run cut short keeps its rows there)."""
    bench = {"kernels": bench_kernels, "model": bench_model, "memory": bench_memory}[what]
    on_row = None
    for path in (json_path, jsonl_path):  # the folders first: a row measured is never lost to a missing one
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
    if jsonl_path:
        Path(jsonl_path).write_text("")

        def on_row(row: dict) -> None:
            with open(jsonl_path, "a") as f:
                f.write(json.dumps({"what": what, "device": device, **row}) + "\n")

    rows = bench(device=device, threads=threads, on_row=on_row)
    title = f"bireal bench {what} --device {device}  [{machine_description(device)}, torch {torch.__version__}]"
    print(format_table(rows, title))
    if what == "kernels":
        copy = rows[0]["copy_gb_s"]  # the rate the rows' bounds used
        print(
            "ours_gb_s: bytes of the packed input + the float32 output over ours_ms, GB/s"
            + (
                f"; this card's copy rate (read + write): {copy:,.0f} GB/s"
                if device.startswith("cuda")
                else f"; this machine's copy rate (read + write, {threads} threads): {copy:,.1f} GB/s\n"
                "bound_ms: the row's binary MACs at micro_tmac_s (the micro-kernel with its data in L1, all "
                "threads) + its float32 output bytes at the copy rate (the time to copy that many bytes); "
                "of_bound: bound_ms / ours_ms"
            )
        )
    if json_path:
        Path(json_path).write_text(
            json.dumps(
                {
                    "what": what,
                    "device": device,
                    "machine": machine_description(device),
                    "torch": torch.__version__,
                    "rows": rows,
                },
                indent=2,
            )
        )
    return rows

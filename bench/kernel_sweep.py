"""Issue 25's kernel sweep: every tensor-core variant's bf16 conv and fused block on each Bi-Real-18
shape, the stride-2 downsample convs too, at batch 256 and at batch 1 (replayed as a CUDA graph),
against cuDNN's bf16 conv and the float block (conv + BN + add + sign, bf16, channels_last,
``cudnn.benchmark`` on), with the floor and the share of it each reaches, and whether each
variant's outputs equal the ``simt`` cross-check's bit for bit.

    python3 -m bench.kernel_sweep [--out DIR] [--batches 256,1] [--repeats 20]

One JSON line per (shape, batch, variant) in DIR/kernel_sweep.jsonl as it is measured (a run cut
short keeps its rows), variant by variant, each variant's rows between a "started" and a "done"
line, and a table; exit status 3 when a row is not exact (1 is a crash). A fault on the GPU leaves
the process unable to run anything, so a rerun with ``--append --skip`` (the done variants and the
one that crashed, which ``--unfinished FILE`` prints) goes on with the rest. ``--device cpu`` runs
the same code on the CPU paths with the ``portable`` path as the cross-check and no floors
(tests/test_gpu_scripts.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Shape:
    channels: int
    out_channels: int
    side: int
    stride: int = 1

    @property
    def name(self) -> str:
        return f"{self.channels}->{self.out_channels}x{self.side}" + (f"/s{self.stride}" if self.stride > 1 else "")

    @property
    def out_side(self) -> int:
        return (self.side + 2 - 3) // self.stride + 1


GRAPH_REPEATS = 50  # at least this many replays of a batch-1 CUDA graph: each takes microseconds

# Bi-Real-18's binary 3x3 convs at 224 px: the stride-1 stages and the first conv of stages 2-4
SHAPES = (
    Shape(64, 64, 56),
    Shape(128, 128, 28),
    Shape(256, 256, 14),
    Shape(512, 512, 7),
    Shape(64, 128, 56, 2),
    Shape(128, 256, 28, 2),
    Shape(256, 512, 14, 2),
)


def variants(device: torch.device) -> tuple[list[str], str]:
    """(the variants timed, the cross-check whose outputs each must equal) on ``device``."""
    from cuda_ext import ops

    check = "simt" if device.type == "cuda" else "portable"
    return [p for p in ops.kernel_paths(device) if p != check] or [check], check


class Operands:
    """One shape's tensors at one batch: bf16 x and its signs, the packed weights, the block's folded
    BN and bf16 residual, and the float baseline's weights and BN statistics."""

    def __init__(self, shape: Shape, batch: int, device: torch.device):
        from cuda_ext import ops

        g = torch.Generator(device="cpu").manual_seed(shape.channels * 7 + shape.stride)
        c, o, s = shape.channels, shape.out_channels, shape.side
        self.shape, self.batch = shape, batch
        x = torch.randn(batch, c, s, s, generator=g).to(device, torch.bfloat16)
        self.x = x.contiguous(memory_format=torch.channels_last)
        w = torch.randn(o, c, 3, 3, generator=g).to(device)
        self.px, self.pw = ops.pack_signs(self.x), ops.pack_signs(w)
        self.scale = (torch.rand(o, generator=g) + 0.5).to(device)
        self.bias = torch.randn(o, generator=g).to(device)
        residual = torch.randn(batch, o, shape.out_side, shape.out_side, generator=g).to(device, torch.bfloat16)
        self.residual = residual.contiguous(memory_format=torch.channels_last)
        self.w_bf16 = w.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
        self.mean, self.var = torch.randn(o, generator=g).to(device), (torch.rand(o, generator=g) + 0.5).to(device)

    def conv(self):
        from cuda_ext import ops

        sh = self.shape
        return ops.binary_conv2d(self.px, self.pw, sh.channels, sh.stride, 1, 0.0, out_dtype=torch.bfloat16)

    def block(self):
        from cuda_ext import ops

        sh = self.shape
        return ops.binary_block(
            self.px, self.pw, sh.channels, sh.stride, 1, 0.0, self.scale, self.bias, self.residual,
            out_dtype=torch.bfloat16,
        )  # fmt: skip

    def cudnn_conv(self):
        return F.conv2d(self.x, self.w_bf16, stride=self.shape.stride, padding=1)

    def float_block(self):
        y = F.conv2d(self.x, self.w_bf16, stride=self.shape.stride, padding=1)
        y = F.batch_norm(y, self.mean, self.var, self.scale, self.bias, False, 0.0, 1e-5) + self.residual
        return y, torch.sign(y)


class Baselines:
    """Each (shape, batch)'s operands, the cross-check's outputs and both baselines' times, made at
    first use and kept for every variant after it."""

    def __init__(self, device: torch.device, repeats: int, copy_gb_s: float | None):
        self.device, self.repeats, self.copy_gb_s, self.cache = device, repeats, copy_gb_s, {}

    def of(self, shape: Shape, batch: int) -> dict:
        from cuda_ext import ops
        from cuda_ext.benchmarks import forward_ms, gpu_floors

        if (shape, batch) not in self.cache:
            t = Operands(shape, batch, self.device)
            with torch.inference_mode():
                with ops.forced_kernel_path(self.device, variants(self.device)[1]):
                    want = t.conv(), *t.block()
                times = {
                    "cudnn_ms": forward_ms(t.cudnn_conv, self.device, batch, self.repeats, GRAPH_REPEATS),
                    "float_block_ms": forward_ms(t.float_block, self.device, batch, self.repeats, GRAPH_REPEATS),
                }
            floors = (
                gpu_floors(shape.channels, shape.side, batch, self.copy_gb_s, shape.stride, shape.out_channels)
                if self.copy_gb_s
                else {}
            )
            self.cache[(shape, batch)] = {"operands": t, "want": want, "times": times, "floors": floors}
        return self.cache[(shape, batch)]


def variant_row(name: str, shape: Shape, batch: int, base: dict, device: torch.device, repeats: int) -> dict:
    """One variant's bf16 conv and block on one (shape, batch): times, exactness, both baselines."""
    from cuda_ext import ops
    from cuda_ext.benchmarks import forward_ms

    t, want, times, floors = base["operands"], base["want"], base["times"], base["floors"]
    with torch.inference_mode(), ops.forced_kernel_path(device, name):
        conv, (out, signs) = t.conv(), t.block()
        exact = all(torch.equal(a, b) for a, b in zip((conv, out, signs), want))
        conv_ms = forward_ms(t.conv, device, batch, repeats, GRAPH_REPEATS)
        block_ms = forward_ms(t.block, device, batch, repeats, GRAPH_REPEATS)
    cudnn_ms, float_block_ms = times["cudnn_ms"], times["float_block_ms"]
    row = {
        "shape": shape.name, "batch": batch, "variant": name, "exact": exact,
        "conv_ms": conv_ms, "block_ms": block_ms, "cudnn_ms": cudnn_ms, "float_block_ms": float_block_ms,
        "conv_x_cudnn": cudnn_ms / conv_ms, "block_x_float_block": float_block_ms / block_ms,
    }  # fmt: skip
    if floors:
        row.update(
            conv_gb_s=floors["conv_bytes"] / conv_ms / 1e6,
            block_gb_s=floors["block_bytes"] / block_ms / 1e6,
            conv_floor_ms=floors["conv_floor_ms"],
            conv_of_floor=floors["conv_floor_ms"] / conv_ms,
            block_floor_ms=floors["block_floor_ms"],
            block_of_floor=floors["block_floor_ms"] / block_ms,
        )
    return row


def unfinished_variants(path: Path) -> tuple[list[str], list[str]]:
    """(the variants a sweep file marks done, those it marks started and not done): what a rerun
    after a crash skips (a fault on the GPU leaves the process's CUDA context unusable)."""
    marks = [json.loads(line) for line in path.read_text().splitlines() if '"what": "variant"' in line]
    done = [m["variant"] for m in marks if m["state"] == "done"]
    return done, [m["variant"] for m in marks if m["state"] == "started" and m["variant"] not in done]


COLUMNS = (
    ("shape", 16, "{}"), ("batch", 6, "{}"), ("variant", 11, "{}"), ("exact", 6, "{}"),
    ("conv_ms", 9, "{:.4f}"), ("conv_gb_s", 10, "{:,.0f}"), ("conv_floor_ms", 14, "{:.4f}"),
    ("conv_of_floor", 14, "{:.0%}"), ("conv_x_cudnn", 13, "{:.2f}x"), ("block_ms", 9, "{:.4f}"),
    ("block_gb_s", 11, "{:,.0f}"), ("block_floor_ms", 15, "{:.4f}"), ("block_of_floor", 15, "{:.0%}"),
    ("block_x_float_block", 20, "{:.2f}x"),
)  # fmt: skip


def format_row(row: dict) -> str:
    return "".join(f"{(fmt.format(row[k]) if k in row else '-'):>{w}}" for k, w, fmt in COLUMNS)


def main(argv: list[str] | None = None) -> int:
    from cuda_ext.benchmarks import copy_bandwidth_gb_s, machine_description

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench_results")))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batches", default="256,1")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--shapes", default="all", help="all, or a comma list of indexes into SHAPES")
    parser.add_argument("--skip", default="", help="variants not to run (a comma list)")
    parser.add_argument("--append", action="store_true", help="add to DIR/kernel_sweep.jsonl (a rerun)")
    parser.add_argument(
        "--unfinished", type=Path, help="print the done and the crashed variants of this sweep file, and stop"
    )
    args = parser.parse_args(argv)
    if args.unfinished:
        done, crashed = unfinished_variants(args.unfinished)
        print(",".join(done), ",".join(crashed), sep="\n")
        return 0
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # the baselines get cuDNN's own pick per shape
    shapes = SHAPES if args.shapes == "all" else [SHAPES[int(i)] for i in args.shapes.split(",")]
    copy_gb_s = copy_bandwidth_gb_s(device) if device.type == "cuda" else None
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "kernel_sweep.jsonl"
    head = {"what": "machine", "device": machine_description(args.device), "torch": torch.__version__,
            "copy_gb_s": copy_gb_s}  # fmt: skip
    if not (args.append and path.is_file()):
        path.write_text(json.dumps(head) + "\n")
    copy = f", copy {copy_gb_s:,.0f} GB/s" if copy_gb_s else ""
    print(f"kernel sweep on {head['device']}, torch {torch.__version__}{copy}")
    print("".join(f"{k:>{w}}" for k, w, _ in COLUMNS), flush=True)

    def write(line: dict) -> None:
        with path.open("a") as f:
            f.write(json.dumps(line) + "\n")

    # variant by variant, each marked started and done: a variant that faults loses its own rows
    # only (bench/gpu_sweep.sh reruns the sweep without it); the baselines are measured once
    baselines, inexact = Baselines(device, args.repeats, copy_gb_s), 0
    for name in (v for v in variants(device)[0] if v not in args.skip.split(",")):
        write({"what": "variant", "variant": name, "state": "started"})
        for batch in (int(b) for b in args.batches.split(",")):
            for shape in shapes:
                row = variant_row(name, shape, batch, baselines.of(shape, batch), device, args.repeats)
                write(row)
                print(format_row(row), flush=True)
                inexact += not row["exact"]
        write({"what": "variant", "variant": name, "state": "done"})
    print(f"kernel sweep: {'every variant exact' if not inexact else f'{inexact} rows NOT exact'}")
    return 3 if inexact else 0


if __name__ == "__main__":
    sys.exit(main())

"""The first thing to run on a GPU: every CUDA path on a list of shapes against the reference, in its
own process, printing per path and shape how many elements are wrong and where the first one is.

    python -m cuda_ext.smoke [--quick] [--json FILE] [--device cpu]

Unlike the test suite, this says *where* a kernel goes wrong: the count of mismatched output elements
with the first wrong (n, o, h, w), and of mismatched packed words with the first wrong (n, h, w,
word). Outputs are pre-filled with 0xFF bytes (``ops.debug_fill``), so unwritten elements count as
wrong. A CUDA fault is sticky (every later call in the process fails too), so the first one ends the
run, naming the path and case that raised it; run with CUDA_LAUNCH_BLOCKING=1 to pin it to its
launch, and again with that path in BIREAL_SKIP_CUDA_PATHS (a comma list) for the rest.
``--quick`` is the short list for compute-sanitizer; ``--device cpu`` runs the same checks on the
CPU paths (how CI tests this script). Exit status 0 only if all match.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import ops
from .reference import binary_block_ref, max_pool_signs_ref, pack_signs_ref, pack_weight_ref


@dataclass(frozen=True)
class Case:
    name: str
    batch: int
    channels: int
    out_channels: int
    height: int
    width: int
    kernel: tuple[int, int] = (3, 3)
    stride: int = 1
    padding: int = 1
    pad_value: float = 0.0
    epilogue: bool = True  # scale, bias and a residual
    bf16: bool = False  # out_dtype=torch.bfloat16 (and a bfloat16 residual)
    persistent_blocks: int = 0  # bmma_halo_p's grid at most this (ops.persistent_blocks; 0: as many as fit)

    @property
    def out_dtype(self) -> torch.dtype | None:
        return torch.bfloat16 if self.bf16 else None

    def output_size(self) -> tuple[int, int]:
        """(Ho, Wo) of the conv."""
        return (
            (self.height + 2 * self.padding - self.kernel[0]) // self.stride + 1,
            (self.width + 2 * self.padding - self.kernel[1]) // self.stride + 1,
        )


QUICK = [
    Case("tiny", 2, 33, 7, 5, 4),
    Case("two-words", 1, 100, 70, 6, 5, stride=2, pad_value=1.0),
    Case("bf16", 1, 64, 64, 4, 4, bf16=True),
    Case("partial-tiles-72", 3, 100, 72, 7, 6),  # bmma_lean: M = 126 rows, O = 64 + 8 channels
    Case("halo-tiles-bf16", 2, 130, 64, 19, 37, bf16=True),  # bmma_halo: 3 x 3 tiles of 8 x 16 per image
    Case("halo-w-opt-in-bf16", 1, 512, 64, 7, 7, bf16=True),  # bmma_halo_w: 68 KB of shared memory (opt-in)
    Case("batch1-256x14-bf16", 1, 256, 256, 14, 14, bf16=True),  # bmma_split: 8 tiles, 9 k-steps in 5 blocks each
    # bmma_halo_p: 36 work items (18 image tiles, cut both ways, x 2 channel blocks, the second partial)
    # in 3 blocks, each looping over 12 with the next one's halo and residuals prefetched
    Case("persistent-loops-bf16", 2, 100, 72, 19, 37, bf16=True, persistent_blocks=3),
]
FULL = QUICK + [
    Case("bireal18-64x56", 2, 64, 64, 56, 56),
    Case("bireal18-128x28", 2, 128, 128, 28, 28),
    Case("bireal18-256x14", 2, 256, 256, 14, 14),
    Case("bireal18-512x7", 2, 512, 512, 7, 7),
    Case("downsample-s2", 2, 64, 128, 56, 56, stride=2),
    Case("1x1-s2", 2, 256, 512, 14, 14, kernel=(1, 1), stride=2, padding=0),
    Case("odd-C-odd-O", 3, 131, 67, 9, 11, pad_value=-1.0),
    Case("no-epilogue", 2, 3, 5, 8, 8, epilogue=False),
    Case("pad2-5x5", 2, 70, 33, 7, 10, kernel=(5, 5), padding=2),
    Case("non-square-3x5", 2, 70, 33, 7, 10, kernel=(3, 5), padding=2, pad_value=1.0),
    Case("all-border", 2, 33, 5, 1, 2),
    Case("zero-out-channels", 2, 64, 0, 5, 5),
    Case("bf16-bireal18-64x56", 2, 64, 64, 56, 56, bf16=True),
    Case("bf16-odd", 2, 131, 67, 9, 11, stride=2, pad_value=-1.0, bf16=True),
    Case("pad3-7x7-s2", 2, 64, 64, 13, 11, kernel=(7, 7), stride=2, padding=3),  # 4^4 border classes
    Case("pad4-routed", 2, 64, 64, 9, 9, kernel=(3, 3), padding=4),  # bmma_lean runs bmma for it
    Case("halo-over-48KB", 2, 512, 64, 30, 31, kernel=(5, 5), stride=3, padding=2),  # bmma_halo runs bmma_lean
]


def inputs(case: Case, seed: int = 0):
    """CPU tensors: (packed_x, packed_w, scale, bias, residual) of the case."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(case.batch, case.channels, case.height, case.width, generator=g)
    w = torch.randn(case.out_channels, case.channels, *case.kernel, generator=g)
    ho, wo = case.output_size()
    if not case.epilogue:
        return pack_signs_ref(x), pack_weight_ref(w), None, None, None
    residual = torch.randn(case.batch, case.out_channels, ho, wo, generator=g)
    return (
        pack_signs_ref(x),
        pack_weight_ref(w),
        torch.rand(case.out_channels, generator=g) + 0.5,
        torch.randn(case.out_channels, generator=g),
        residual.bfloat16() if case.bf16 else residual,
    )


def expected(case: Case, px, pw, scale, bias, residual):
    if case.out_channels == 0:  # (the reference's F.conv2d rejects an empty weight)
        ho, wo = case.output_size()
        return (
            torch.empty(case.batch, 0, ho, wo, dtype=case.out_dtype or torch.float32),
            torch.empty(case.batch, ho, wo, 0, dtype=torch.int64),
        )
    return binary_block_ref(
        px, pw, case.channels, case.stride, case.padding, case.pad_value, scale, bias, residual, case.out_dtype
    )


def first_mismatch(got: torch.Tensor, want: torch.Tensor) -> tuple[int, list[int] | None]:
    """(number of differing elements, index of the first one); shape or dtype differences count all."""
    if got.shape != want.shape or got.dtype != want.dtype:
        return max(got.numel(), want.numel()), None
    wrong = ~torch.eq(got, want)  # NaN (an unwritten float) is never equal
    count = int(wrong.sum())
    return count, (wrong.nonzero()[0].tolist() if count else None)


def check(device: str, path: str, case: Case) -> dict:
    px, pw, scale, bias, residual = inputs(case)
    want_out, want_packed = expected(case, px, pw, scale, bias, residual)
    args = [t.to(device) if t is not None else None for t in (px, pw, scale, bias, residual)]
    with ops.forced_kernel_path(device, path), ops.persistent_blocks(case.persistent_blocks), ops.debug_fill():
        out, packed = ops.binary_block(
            args[0],
            args[1],
            case.channels,
            case.stride,
            case.padding,
            case.pad_value,
            *args[2:],
            out_dtype=case.out_dtype,
        )
        if device == "cuda":
            torch.cuda.synchronize()
    out_wrong, out_first = first_mismatch(out.cpu(), want_out)
    packed_wrong, packed_first = first_mismatch(packed.cpu(), want_packed)
    return {
        "path": path,
        "case": case.name,
        "ok": out_wrong == 0 and packed_wrong == 0,
        "out_wrong": out_wrong,
        "out_elements": want_out.numel(),
        "first_wrong_nohw": out_first,
        "packed_wrong": packed_wrong,
        "first_wrong_packed_nhwk": packed_first,
    }


def check_pack_signs(device: str, dtype: torch.dtype) -> dict:
    x = torch.randn(3, 130, 5, 7).to(dtype)
    x[0, :, 0, 0], x[1, :, 1, 1] = 0.0, -0.0
    with ops.debug_fill():
        got = ops.pack_signs(x.to(device).contiguous(memory_format=torch.channels_last)).cpu()
    wrong, first = first_mismatch(got, pack_signs_ref(x))
    return {
        "path": "pack_signs",
        "case": str(dtype).split(".")[-1],
        "ok": wrong == 0,
        "packed_wrong": wrong,
        "first_wrong_packed_nhwk": first,
    }


def check_max_pool_signs(device: str, dtype: torch.dtype) -> dict:
    """The ImageNet stem's pool (3x3, stride 2, padding 1) with the stem conv's bias, over two words
    of channels (the second with a tail): the output and its packed signs."""
    x, bias = torch.randn(2, 100, 13, 11).to(dtype), torch.randn(100).to(dtype)
    with ops.debug_fill():
        out, packed = ops.max_pool_signs(
            x.to(device).contiguous(memory_format=torch.channels_last), 3, 2, 1, bias.to(device)
        )
    ref_out, ref_packed = max_pool_signs_ref(x, 3, 2, 1, bias)
    out_wrong, out_first = first_mismatch(out.cpu(), ref_out)
    packed_wrong, packed_first = first_mismatch(packed.cpu(), ref_packed)
    return {
        "path": "max_pool_signs",
        "case": str(dtype).split(".")[-1],
        "ok": out_wrong == 0 and packed_wrong == 0,
        "out_wrong": out_wrong,
        "out_elements": ref_out.numel(),
        "first_wrong_nohw": out_first,
        "packed_wrong": packed_wrong,
        "first_wrong_packed_nhwk": packed_first,
    }


def checks(device: str = "cuda", quick: bool = False) -> list[tuple[str, Callable[[], dict]]]:
    """Every check as (name, run it): name is "<path or op> <case>". On a CUDA device the paths and
    ops named in ``BIREAL_SKIP_CUDA_PATHS`` are left out (``ops.skipped_cuda_paths``: the GPU
    scripts name there what lost the CUDA context in an earlier run, so a rerun checks the rest)."""
    found = [
        (f"pack_signs {dtype}", lambda d=dtype: check_pack_signs(device, d))
        for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64)
    ]
    found += [
        (f"max_pool_signs {dtype}", lambda d=dtype: check_max_pool_signs(device, d))
        for dtype in (torch.float32, torch.bfloat16)
    ]
    found += [
        (f"{path} {case.name}", lambda p=path, c=case: check(device, p, c))
        for path in ops.kernel_paths(device)
        for case in (QUICK if quick else FULL)
    ]
    if torch.device(device).type != "cuda":
        return found
    skipped = ops.skipped_cuda_paths()
    return [(name, fn) for name, fn in found if name.split()[0] not in skipped]


def run(device: str = "cuda", quick: bool = False) -> list[dict]:
    """Every check of ``checks``, printed as it finishes; stops at the first CUDA fault, naming its
    path (the context is lost: a rerun with that path in BIREAL_SKIP_CUDA_PATHS checks the rest)."""
    rows = []
    for name, fn in checks(device, quick):
        try:
            rows.append(fn())
        except RuntimeError as e:
            rows.append(
                {"path": name.split()[0], "case": name.split()[1], "ok": False, "error": str(e).splitlines()[0]}
            )
            print_row(rows[-1])
            if "CUDA error" in str(e) or "cudaError" in str(e):
                print(
                    f"smoke: CUDA context lost on path={name.split()[0]}: the run ends here (every later call "
                    "would fail in this process; run again with it in BIREAL_SKIP_CUDA_PATHS for the rest)"
                )
                return rows
            continue
        print_row(rows[-1])
    return rows


def print_row(r: dict) -> None:
    if "error" in r:
        print(f"{r['path']:>11} {r['case']:<22} ERROR {r['error']}", flush=True)
        return
    status = "ok" if r["ok"] else "WRONG"
    out = (
        f"out {r['out_wrong']}/{r['out_elements']} first (n,o,h,w)={r['first_wrong_nohw']}" if "out_wrong" in r else ""
    )
    print(
        f"{r['path']:>11} {r['case']:<22} {status:<5} {out} packed {r['packed_wrong']} wrong, "
        f"first (n,h,w,word)={r['first_wrong_packed_nhwk']}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="six small cases (for compute-sanitizer)")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not (torch.cuda.is_available() and ops.cuda_built()):
        print(
            "smoke: needs a CUDA GPU and the CUDA build of cuda_ext "
            f"(cuda available: {torch.cuda.is_available()}, built: {ops.cuda_built()})"
        )
        return 2
    where = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"smoke on {where}, paths {ops.kernel_paths(args.device)}", flush=True)
    rows = run(args.device, args.quick)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    bad = [r for r in rows if not r["ok"]]
    print(f"smoke: {len(rows) - len(bad)} of {len(rows)} checks exact" + (f"; WRONG: {len(bad)}" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

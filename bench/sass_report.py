"""What the CUDA kernels compiled to, read from the extension's fat binary without a GPU: per target
(sm_80, sm_90a) and kernel, registers, shared and local (spilled) memory, the SASS instruction
count, the 1-bit MMAs (BMMA ... AND.POPC), and for the tensor-core kernels the instructions after
the last MMA (the epilogue, counted statically: a loop's body once) per output element of a
thread, the number a lean epilogue brings down to about 10.

    python3 -m bench.sass_report [--so cuda_ext/_C*.so] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys

# outputs per thread of the bmma kernels: a warp's 32 x 64 tile over 32 lanes (binary_conv_cuda.cu)
OUTPUTS_PER_THREAD = 32 * 64 // 32
KERNELS = ("binary_conv2d_bmma_kernel", "binary_conv2d_bmma_async_kernel", "binary_conv2d_simt_kernel",
           "tap_sums_kernel")  # fmt: skip
INSTRUCTION = re.compile(r"/\*[0-9a-f]{4,}\*/\s+([A-Z][A-Z0-9_.]*)")


def sass_of(sass: str, kernel_name: str) -> str:
    """The SASS of one kernel from a cuobjdump --dump-sass listing."""
    start = sass.index(kernel_name + "E")  # mangled: ...<name>ENS0_10ConvParamsE
    end = sass.find("Function :", start)
    return sass[start : end if end > 0 else len(sass)]


def instructions(kernel_sass: str) -> list[str]:
    """The kernel's instructions (opcodes with their modifiers), in order."""
    return INSTRUCTION.findall(kernel_sass)


def resources(listing: str) -> dict[tuple[str, str], dict]:
    """{(sm, kernel function name): {"registers", "shared", "local"}} from --dump-resource-usage."""
    found, sm, function = {}, None, None
    for line in listing.splitlines():
        if line.strip().startswith("arch = "):
            sm = line.split("=")[1].strip()
        elif line.strip().startswith("Function "):
            function = line.strip()[len("Function ") :].rstrip(":")
        elif "REG:" in line and sm and function:
            values = dict(re.findall(r"(REG|SHARED|LOCAL):(\d+)", line))
            found[(sm, function)] = {k.lower(): int(v) for k, v in values.items()}
    return found


def report(so: str, tool: str) -> list[dict]:
    usage = resources(subprocess.run([tool, "--dump-resource-usage", so], capture_output=True, text=True).stdout)
    listing = subprocess.run([tool, "--list-elf", so], capture_output=True, text=True, check=True).stdout
    rows = []
    for sm in sorted(set(re.findall(r"\.(sm_\d+a?)\.cubin", listing))):
        dump = [tool, "--dump-sass", "--gpu-architecture", sm, so]
        sass = subprocess.run(dump, capture_output=True, text=True).stdout
        for name in KERNELS:
            if name + "E" not in sass:
                continue
            ops = instructions(sass_of(sass, name))
            mmas = [i for i, op in enumerate(ops) if op.startswith("BMMA")]
            function = next((f for (s, f) in usage if s == sm and name in f), None)
            row = {"sm": sm, "kernel": name, "instructions": len(ops), "bmma": len(mmas),
                   **usage.get((sm, function), {})}  # fmt: skip
            if mmas:
                row["after_last_mma"] = len(ops) - mmas[-1] - 1
                row["after_last_mma_per_output"] = round(row["after_last_mma"] / OUTPUTS_PER_THREAD, 1)
            rows.append(row)
    return rows


def format_rows(rows: list[dict]) -> str:
    cols = ("sm", "kernel", "instructions", "bmma", "reg", "shared", "local", "after_last_mma",
            "after_last_mma_per_output")  # fmt: skip
    widths = (8, 34, 13, 6, 5, 8, 7, 15, 26)
    lines = ["".join(f"{c:>{w}}" for c, w in zip(cols, widths))]
    lines += ["".join(f"{str(r.get(c, '-')):>{w}}" for c, w in zip(cols, widths)) for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from cuda_ext.build_config import find_cuobjdump

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--so", default=None, help="the extension (default: cuda_ext._C)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    tool = find_cuobjdump()
    if tool is None:
        print("sass_report: no cuobjdump (the CUDA toolkit's, or triton's)", file=sys.stderr)
        return 2
    if args.so is None:  # found, not loaded: reading it needs no torch
        import importlib.util

        args.so = importlib.util.find_spec("cuda_ext._C").origin
    rows = report(args.so, tool)
    print(format_rows(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())

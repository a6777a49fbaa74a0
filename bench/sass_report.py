"""What the CUDA kernels compiled to, read from the extension's fat binary without a GPU: per target
(sm_80, sm_90a) and kernel, registers, shared and local (spilled) memory, the SASS instruction
count (predicated ones included), the 1-bit MMAs (BMMA ... AND.POPC), and for the tensor-core
kernels the epilogue's size per output element of a thread: the instructions after the main loop
(after its backward branch, or after the last MMA where the compiler peeled the last k-step),
counted statically, a loop's body once; the number a lean epilogue brings down to about 10.

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
           "tap_sums_kernel", "binary_conv2d_bmma_lean_kernel", "binary_conv2d_bmma_halo_kernel",
           "binary_conv2d_bmma_split_kernel", "binary_conv2d_bmma_halo_p_kernel", "border_classes_kernel")  # fmt: skip
# the lean epilogue's template options (lean_epilogue.cuh), bit by bit: bmma_lean's (and bmma_lean1's),
# bmma_split's, bmma_halo's (and bmma_halo_w's) and bmma_halo_p's
TEMPLATED = ("binary_conv2d_bmma_lean_kernel", "binary_conv2d_bmma_halo_kernel", "binary_conv2d_bmma_split_kernel",
             "binary_conv2d_bmma_halo_p_kernel")  # fmt: skip
LEAN_OPTIONS = ("scale", "bias", "residual", "bf16", "pack")
FUNCTION = re.compile(r"Function : (\S+)")
# one SASS instruction: /*address*/ [@predicate] OPCODE operands ;
INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def sass_of(sass: str, kernel_name: str) -> str:
    """The SASS of one kernel (its first instantiation, for a template) from a cuobjdump --dump-sass
    listing."""
    start = next(m.start() for m in FUNCTION.finditer(sass) if _base_name(m.group(1)) == kernel_name)
    end = sass.find("Function :", start + 1)
    return sass[start : end if end > 0 else len(sass)]


def kernels_in(sass: str) -> list[tuple[str, str, str]]:
    """[(readable name, mangled name, SASS)] of every kernel of KERNELS in a --dump-sass listing; an
    instantiation of the lean epilogue is named by its options, e.g.
    binary_conv2d_bmma_lean_kernel<scale|bf16>."""
    found = []
    starts = list(FUNCTION.finditer(sass))
    for i, m in enumerate(starts):
        base = _base_name(m.group(1))
        if base not in KERNELS:
            continue
        end = starts[i + 1].start() if i + 1 < len(starts) else len(sass)
        found.append((_readable(m.group(1), base), m.group(1), sass[m.start() : end]))
    return found


def _base_name(mangled: str) -> str:
    """The kernel of KERNELS a mangled name is (the longest that it contains: bmma_lean's name holds
    bmma's), else the mangled name itself."""
    return max((name for name in KERNELS if name in mangled), key=len, default=mangled)


def _readable(mangled: str, base: str) -> str:
    """``base<options>``; a second template argument, true, names the path that runs those
    instantiations: the lean kernel's one-MMA ones bmma_lean1, the halo kernel's with the weights in
    shared memory bmma_halo_w."""
    options = re.search(r"ILi(\d+)E(?:Lb([01])E)?E", mangled)
    if base not in TEMPLATED or options is None:
        return base
    if options.group(2) == "1":
        base = base.replace("_lean_kernel", "_lean1_kernel").replace("_halo_kernel", "_halo_w_kernel")
    bits = int(options.group(1))
    return f"{base}<{'|'.join(n for i, n in enumerate(LEAN_OPTIONS) if bits >> i & 1) or 'plain'}>"


def instructions(kernel_sass: str) -> list[str]:
    """The kernel's instructions (opcodes with their modifiers), in order, predicated ones included."""
    return [opcode for _, opcode, _ in INSTRUCTION.findall(kernel_sass)]


def epilogue_size(kernel_sass: str) -> int | None:
    """Instructions after a tensor-core kernel's main loop: after the branch back of the innermost
    loop around the last BMMA (of the branches after it to an address at or before it, the one with
    the latest target, the last of those: the loop over k-steps, not bmma_halo_p's loop over work
    items around it), else after the last BMMA; None without BMMAs."""
    found = [(int(address, 16), opcode, operands) for address, opcode, operands in INSTRUCTION.findall(kernel_sass)]
    mmas = [i for i, (_, opcode, _) in enumerate(found) if opcode.startswith("BMMA")]
    if not mmas:
        return None
    last_mma_address = found[mmas[-1]][0]
    loop_end, loop_start = mmas[-1], -1
    for i in range(mmas[-1] + 1, len(found)):
        address, opcode, operands = found[i]
        target = re.search(r"0x([0-9a-f]+)", operands)
        if opcode.startswith("BRA") and target and loop_start <= int(target.group(1), 16) <= last_mma_address:
            loop_end, loop_start = i, int(target.group(1), 16)
    return len(found) - loop_end - 1


def resources(listing: str) -> dict[tuple[str, str], dict]:
    """{(sm, kernel function name): {"reg", "stack", "shared", "local"}} from --dump-resource-usage
    (registers spilled go to the stack frame)."""
    found, sm, function = {}, None, None
    for line in listing.splitlines():
        if line.strip().startswith("arch = "):
            sm = line.split("=")[1].strip()
        elif line.strip().startswith("Function "):
            function = line.strip()[len("Function ") :].rstrip(":")
        elif "REG:" in line and sm and function:
            values = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", line))
            found[(sm, function)] = {k.lower(): int(v) for k, v in values.items()}
    return found


def report(so: str, tool: str) -> list[dict]:
    from cuda_ext.build_config import fatbin_archs

    usage = resources(subprocess.run([tool, "--dump-resource-usage", so], capture_output=True, text=True).stdout)
    rows = []
    for sm in fatbin_archs(tool, so):
        dump = [tool, "--dump-sass", "--gpu-architecture", sm, so]
        sass = subprocess.run(dump, capture_output=True, text=True).stdout
        for name, mangled, kernel_sass in kernels_in(sass):
            ops = instructions(kernel_sass)
            mmas = [i for i, op in enumerate(ops) if op.startswith("BMMA")]
            row = {"sm": sm, "kernel": name, "instructions": len(ops), "bmma": len(mmas),
                   "cp_async": sum(op.startswith("LDGSTS") for op in ops),  # cp.async copies
                   "stg128": sum(op.startswith("STG") and ".128" in op for op in ops),  # 16-byte stores
                   "cluster_sync": sum(op.startswith("UCGABAR_WAIT") for op in ops),  # cluster.sync()
                   **usage.get((sm, mangled), {})}  # fmt: skip
            epilogue = epilogue_size(kernel_sass)
            if epilogue is not None:
                row["epilogue"] = epilogue
                row["epilogue_per_output"] = round(epilogue / OUTPUTS_PER_THREAD, 1)
            rows.append(row)
    return rows


def format_rows(rows: list[dict]) -> str:
    cols = ("sm", "kernel", "instructions", "bmma", "cp_async", "stg128", "cluster_sync", "reg", "stack", "shared",
            "local", "epilogue", "epilogue_per_output")  # fmt: skip
    widths = (8, 65, 13, 6, 9, 7, 13, 5, 6, 8, 7, 10, 21)
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

"""Whether (and with which toolkit) the CUDA kernels can be built here. Used by setup.py, and by
tests/test_cuda_build.py to know whether the build must contain them. Imports nothing but torch."""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess

DEFAULT_ARCHS = "8.0;9.0a"


def find_cuda_home() -> str | None:
    """A CUDA toolkit with both nvcc and the runtime headers (a bare nvcc wrapper is not enough)."""
    nvcc = shutil.which("nvcc")
    candidates = [
        os.environ.get("CUDA_HOME"),
        os.environ.get("CUDA_PATH"),
        nvcc and os.path.dirname(os.path.dirname(nvcc)),
        "/usr/local/cuda",
        *sorted(glob.glob("/usr/local/cuda-*"), reverse=True),
    ]
    for home in candidates:
        if (
            home
            and os.path.isfile(os.path.join(home, "include", "cuda_runtime.h"))
            and os.path.isfile(os.path.join(home, "bin", "nvcc"))
        ):
            return home
    return None


def nvcc_release(home: str) -> str | None:
    """'13.0' from ``nvcc --version``, or None if it does not run."""
    try:
        text = subprocess.run(
            [os.path.join(home, "bin", "nvcc"), "--version"], capture_output=True, text=True, timeout=60
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+\.\d+)", text)
    return match.group(1) if match else None


def cuda_build_plan() -> tuple[str | None, str]:
    """(CUDA home, "") when the CUDA kernels will be built, else (None, the reason)."""
    import torch

    if os.environ.get("BIREAL_CUDA", "auto") == "0":
        return None, "BIREAL_CUDA=0"
    if torch.version.cuda is None:
        return None, f"torch {torch.__version__} is not a CUDA build"
    home = find_cuda_home()
    if home is None:
        return None, "no CUDA toolkit with nvcc and cuda_runtime.h found (set CUDA_HOME)"
    release = nvcc_release(home)
    # torch refuses to build with an nvcc of another major version than its own CUDA
    if release is None or release.split(".")[0] != torch.version.cuda.split(".")[0]:
        return None, f"nvcc {release} in {home} does not match torch's CUDA {torch.version.cuda}"
    return home, ""


def find_cuobjdump(cuda_home: str | None = None) -> str | None:
    """A cuobjdump to read the extension's fat binary: the toolkit's, or the one triton ships with
    its NVIDIA backend (a toolkit of compilers only has none)."""
    candidates = [
        shutil.which("cuobjdump"),
        cuda_home and os.path.join(cuda_home, "bin", "cuobjdump"),
        *glob.glob("/usr/local/cuda*/bin/cuobjdump"),
    ]
    try:
        import triton

        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    return next((c for c in candidates if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


def fatbin_archs(cuobjdump: str, so: str) -> list[str]:
    """The GPU targets whose machine code ``so`` carries ("sm_80", "sm_90a"), read from each cubin's
    ``arch = `` header: ``--list-elf``'s file names drop the ``a`` with an older cuobjdump (triton
    3.6 ships 12.8's, which names an sm_90a cubin ``.sm_90.cubin``)."""
    usage = subprocess.run([cuobjdump, "--dump-resource-usage", so], capture_output=True, text=True, check=True)
    return sorted(set(re.findall(r"^\s*arch = (sm_\w+)\s*$", usage.stdout, flags=re.M)))

"""Builds the ``cuda_ext._C`` extension: C++ always; CUDA too when torch is a CUDA build and an nvcc
toolkit is found (no GPU is needed to build).

Install with ``pip install --no-build-isolation -e .`` (what ``make install`` does): an isolated
build environment would download a multi-GB CUDA torch.

Environment:
- ``BIREAL_CUDA``: ``auto`` (default), ``1`` (require the CUDA build), ``0`` (C++ only).
- ``TORCH_CUDA_ARCH_LIST``: GPU targets, default ``8.0;9.0a`` (mma.sync b1 AND-popc needs sm_80;
  ``9.0a`` is Hopper's full instruction set).
- ``CUDA_HOME``: the toolkit; otherwise the first of nvcc's folder, /usr/local/cuda and
  /usr/local/cuda-* that holds ``include/cuda_runtime.h``.
"""
import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

CXX_FLAGS = [
    "-O3",
    "-fopenmp",            # at::parallel_for is OpenMP-backed in torch's builds
    "-ffp-contract=off",   # no FMA contraction: the epilogue rounds like the torch reference
]
NVCC_FLAGS = [
    "-O3",
    "--fmad=false",        # the epilogue uses __fmul_rn / __fadd_rn; no other float math may fuse
    "-lineinfo",
]
DEFAULT_ARCHS = "8.0;9.0a"


def find_cuda_home() -> str | None:
    """A CUDA toolkit with both nvcc and the runtime headers (a bare nvcc wrapper is not enough)."""
    nvcc = shutil.which("nvcc")
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
                  nvcc and os.path.dirname(os.path.dirname(nvcc)), "/usr/local/cuda",
                  *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
    for home in candidates:
        if home and os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")) and \
                os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return home
    return None


def nvcc_release(home: str) -> str | None:
    """'13.0' from ``nvcc --version``, or None if it does not run."""
    try:
        text = subprocess.run([os.path.join(home, "bin", "nvcc"), "--version"], capture_output=True,
                              text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+\.\d+)", text)
    return match.group(1) if match else None


def want_cuda() -> bool:
    import torch

    flag = os.environ.get("BIREAL_CUDA", "auto")
    if flag == "0":
        return False
    home = find_cuda_home()
    release = nvcc_release(home) if home else None
    # torch refuses to build with an nvcc of another major version than its own CUDA
    same_major = release is not None and torch.version.cuda is not None and \
        release.split(".")[0] == torch.version.cuda.split(".")[0]
    ok = torch.version.cuda is not None and home is not None and same_major
    if not ok and home and torch.version.cuda:
        print(f"[bireal] not building the CUDA kernels: nvcc {release} in {home} does not match "
              f"torch's CUDA {torch.version.cuda}", file=sys.stderr)
    if flag == "1" and not ok:
        sys.exit(f"BIREAL_CUDA=1 but no CUDA build is possible: torch {torch.__version__} "
                 f"(CUDA {torch.version.cuda}), toolkit {home or 'not found (set CUDA_HOME)'}, "
                 f"nvcc {release}")
    if ok:
        os.environ["CUDA_HOME"] = home          # read by torch.utils.cpp_extension on import
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
    return ok


def wheel_cuda_dirs() -> tuple[list[str], list[str]]:
    """Headers and libraries of the pip-installed CUDA runtime next to torch (nvidia/cu13), if any."""
    import torch

    site = os.path.dirname(os.path.dirname(torch.__file__))
    roots = sorted(glob.glob(os.path.join(site, "nvidia", "cu*")))
    return ([d for r in roots if os.path.isdir(d := os.path.join(r, "include"))],
            [d for r in roots if os.path.isdir(d := os.path.join(r, "lib"))])


def extensions():
    cpp_sources = sorted(glob.glob("cuda_ext/csrc/*.cpp"))
    if not want_cuda():
        from torch.utils.cpp_extension import CppExtension

        return [CppExtension("cuda_ext._C", cpp_sources, extra_compile_args={"cxx": CXX_FLAGS},
                             extra_link_args=["-fopenmp"])]
    from torch.utils.cpp_extension import CUDAExtension

    include_dirs, library_dirs = wheel_cuda_dirs()
    print(f"[bireal] building the CUDA kernels for {os.environ['TORCH_CUDA_ARCH_LIST']} "
          f"with {os.environ['CUDA_HOME']} (BIREAL_CUDA=0 skips them)", file=sys.stderr)
    return [CUDAExtension("cuda_ext._C", cpp_sources + sorted(glob.glob("cuda_ext/csrc/*.cu")),
                          include_dirs=include_dirs, library_dirs=library_dirs,
                          define_macros=[("BIREAL_WITH_CUDA", "1")],
                          extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS},
                          extra_link_args=["-fopenmp"])]


def build_ext_class():
    from torch.utils.cpp_extension import BuildExtension

    # ninja compiles the sources in parallel; fall back to distutils' serial build without it.
    return BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)


setup(ext_modules=extensions(), cmdclass={"build_ext": build_ext_class()})

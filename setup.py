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
import shutil
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


def want_cuda() -> bool:
    import torch

    flag = os.environ.get("BIREAL_CUDA", "auto")
    if flag == "0":
        return False
    home = find_cuda_home()
    ok = torch.version.cuda is not None and home is not None
    if flag == "1" and not ok:
        sys.exit(f"BIREAL_CUDA=1 but no CUDA build is possible: torch {torch.__version__} "
                 f"(CUDA {torch.version.cuda}), toolkit {home or 'not found (set CUDA_HOME)'}")
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
          f"with {os.environ['CUDA_HOME']}", file=sys.stderr)
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

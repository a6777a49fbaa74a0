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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cuda_ext.build_config import DEFAULT_ARCHS, cuda_build_plan  # noqa: E402  (imports torch only)

CXX_FLAGS = [
    "-O3",
    "-fopenmp",  # at::parallel_for is OpenMP-backed in torch's builds
    "-ffp-contract=off",  # no FMA contraction: the epilogue rounds like the torch reference
]
NVCC_FLAGS = [
    "-O3",
    "--fmad=false",  # the epilogue uses __fmul_rn / __fadd_rn; no other float math may fuse
    "-lineinfo",
]


LINK_ARGS = ["-fopenmp"]
if sys.platform.startswith("linux"):
    # Resolve the C++ library from the shared libstdc++ that torch and Python load, before anything
    # the compiler driver appends: a g++ that links -static-libstdc++ (as one GPU machine's does)
    # would otherwise put a second copy of libstdc++'s stream and locale code in the extension,
    # whose number formatting then fails (truncated error messages here, a segfault there).
    LINK_ARGS.append("-l:libstdc++.so.6")


def want_cuda() -> bool:
    home, reason = cuda_build_plan()
    if home is None:
        if os.environ.get("BIREAL_CUDA") == "1":
            sys.exit(f"BIREAL_CUDA=1 but the CUDA kernels cannot be built: {reason}")
        print(f"[bireal] building without the CUDA kernels: {reason}", file=sys.stderr)
        return False
    os.environ["CUDA_HOME"] = home  # read by torch.utils.cpp_extension on import
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
    return True


def extensions():
    sources = sorted(glob.glob("cuda_ext/csrc/*.cpp"))
    compile_args = {"cxx": CXX_FLAGS}
    if want_cuda():
        from torch.utils.cpp_extension import CUDAExtension as Extension

        print(
            f"[bireal] building the CUDA kernels for {os.environ['TORCH_CUDA_ARCH_LIST']} "
            f"with {os.environ['CUDA_HOME']} (BIREAL_CUDA=0 skips them)",
            file=sys.stderr,
        )
        sources += sorted(glob.glob("cuda_ext/csrc/*.cu"))
        compile_args["nvcc"] = NVCC_FLAGS
        macros = [("BIREAL_WITH_CUDA", "1")]
    else:
        from torch.utils.cpp_extension import CppExtension as Extension

        macros = []
    return [
        Extension(
            "cuda_ext._C", sources, define_macros=macros, extra_compile_args=compile_args, extra_link_args=LINK_ARGS
        )
    ]


def build_ext_class():
    from torch.utils.cpp_extension import BuildExtension

    # ninja compiles the sources in parallel; fall back to distutils' serial build without it.
    return BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)


setup(ext_modules=extensions(), cmdclass={"build_ext": build_ext_class()})

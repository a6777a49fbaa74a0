"""Builds the ``cuda_ext._C`` extension (C++ always; CUDA when a CUDA torch and nvcc are present).

Install with ``pip install --no-build-isolation -e .`` (what ``make install`` does): an isolated
build environment would download a multi-GB CUDA torch. Set ``BIREAL_CUDA=0`` to skip the CUDA
sources, ``BIREAL_CUDA=1`` to require them.
"""
import glob
import os

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

CXX_FLAGS = [
    "-O3",
    "-fopenmp",            # at::parallel_for is OpenMP-backed in torch's builds
    "-ffp-contract=off",   # no FMA contraction: the epilogue rounds like the torch reference
]


def extensions():
    sources = sorted(glob.glob("cuda_ext/csrc/*.cpp"))
    return [CppExtension("cuda_ext._C", sources, extra_compile_args={"cxx": CXX_FLAGS},
                         extra_link_args=["-fopenmp"])]


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExtension.with_options(use_ninja=False)})

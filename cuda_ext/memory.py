"""CPU inference memory: keep freed activation memory in the process for the next forward.

PyTorch allocates CPU tensors with the C library's ``malloc``. With glibc's defaults, a large block
(an activation of a 224 px batch: 3-51 MB) is either its own ``mmap``, returned to the OS when
freed, or heap memory that ``free`` trims back to the OS; either way the next forward touches
fresh pages, and the kernel faults in and zeroes every one of them. For the packed Bi-Real-18 at
batch 16 on the development machine that cost about as much as all its convolutions: 57-65 ms per
forward with the defaults, 30-32 ms with freed memory kept (docs/benchmarks.md). ResNet-18 gains
too (170-181 ms -> 125-142 ms), less in proportion.

``keep_freed_memory()`` sets glibc's ``M_MMAP_THRESHOLD`` (blocks below it come from the heap) and
``M_TRIM_THRESHOLD`` (free heap memory at the top kept up to it): process-wide, the same effect as
``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` in the environment, or as running under
jemalloc or tcmalloc, which PyTorch's CPU tuning guide recommends for the same reason. The price is
that the process keeps its peak activation memory (about 0.3 GB for Bi-Real-18 at batch 16).

What a user runs gets it by default: ``bireal predict``, ``bireal evaluate`` (and the evaluate
stage) and the MLflow model server (``mlflow models serve`` of a registered artifact: the pyfunc
turns it on when it is loaded in MLflow's scoring server, never when a user loads the model into a
process of their own). ``bireal bench model`` times that setting, with glibc's defaults beside it.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
M_MMAP_THRESHOLD = -3


def _glibc():
    """The process's C library if it is glibc (musl and macOS have no mallopt), else None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()
    except (OSError, AttributeError):
        return None
    return libc


def keep_freed_memory(mmap_threshold: int = 1 << 30, trim_threshold: int = 1 << 31) -> bool:
    """Serve blocks up to ``mmap_threshold`` bytes from the heap and keep up to ``trim_threshold``
    bytes of freed heap memory in the process; -> whether the C library accepted both (False, and
    nothing changed, where it is not glibc)."""
    libc = _glibc()
    if libc is None:
        return False
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    clamp = (1 << 31) - 1  # mallopt takes an int
    return bool(
        libc.mallopt(M_MMAP_THRESHOLD, min(mmap_threshold, clamp))
        and libc.mallopt(M_TRIM_THRESHOLD, min(trim_threshold, clamp))
    )

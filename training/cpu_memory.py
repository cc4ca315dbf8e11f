"""Keep freed memory for reuse on CPU (glibc malloc) instead of handing it back to the OS every step.

A pretraining step allocates and frees several ``[rows, 65,536]`` fp32 buffers (~180 MB each: head outputs,
teacher targets, gradients). glibc serves allocations that large with fresh ``mmap`` calls and unmaps them when
they are freed, so every step page-faults that memory back in, zero-filled. Measured on the ViT-S/14 step of
``benchmarks/step_time.py`` (2 cores): ~290k minor page faults and 8.4 s per step by default; with the thresholds
below, 0 to 10k faults per step in the steady state and 7.3 s. The price: the process keeps its peak heap (RSS
does not shrink after a peak), which a training process reaches again at the next step anyway.

PyTorch's CPU performance guides recommend jemalloc/tcmalloc (``LD_PRELOAD``) for the same reason; this needs no
extra library. ``DINOFORGE_MALLOC_TUNING=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import os
import platform

__all__ = ["keep_freed_memory"]

# glibc <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_THRESHOLD = 2**31 - 1  # bytes: larger than any single buffer of a step, the largest value mallopt takes as int


def keep_freed_memory() -> bool:
    """Make glibc malloc serve large blocks from its heap and never trim it. True when applied.

    Affects the whole process (and DataLoader workers forked later). A no-op returning False on other C libraries
    and platforms, or when ``DINOFORGE_MALLOC_TUNING=0``.
    """
    if os.environ.get("DINOFORGE_MALLOC_TUNING", "1") == "0":
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    applied = libc.mallopt(_M_MMAP_THRESHOLD, _THRESHOLD) == 1
    return libc.mallopt(_M_TRIM_THRESHOLD, _THRESHOLD) == 1 and applied

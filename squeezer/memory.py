"""Give freed heap memory back to the operating system between calibration stages.

glibc's ``malloc`` raises its mmap threshold after large frees, so the tensors of the next
stage come from the heap, and memory freed there stays mapped (resident) until ``malloc_trim``.
Calling it between calibration batches and stages keeps the process's resident memory closer to
what is live (``python bench/probes.py memory`` measures the peaks). No-op where the C library
is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import cache


@cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim") if name else None
    except (OSError, AttributeError):
        return None


def release_free_memory() -> None:
    """``malloc_trim(0)``: return every free heap page to the OS (glibc; else nothing)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)

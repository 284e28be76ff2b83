"""Keep the process's resident memory close to what is live while calibrating.

glibc's ``malloc`` raises its mmap threshold after large frees (up to 32 MiB), so the tensors of
the next stage come from the heap, and memory freed there stays mapped (resident) until
``malloc_trim``. :func:`release_free_memory` is called between calibration batches and stages.
Inside one forward pass freed activations still leave free holes in the heap that raise the
peak; :func:`limit_heap_retention` (opt-in, process-wide, ``squeezer quantize --low-memory``)
fixes the threshold so that large tensors are mapped and unmapped on their own. Both are no-ops
where the C library is not glibc (``python bench/probes.py memory`` measures the peaks).
"""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import cache
from typing import Any

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


@cache
def _libc_function(name: str) -> Any:
    library = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(library), name) if library else None
    except (OSError, AttributeError):
        return None


def _malloc_trim():
    return _libc_function("malloc_trim")


def _mallopt():
    return _libc_function("mallopt")


def release_free_memory() -> None:
    """``malloc_trim(0)``: return every free heap page to the OS (glibc; else nothing)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def limit_heap_retention(threshold: int = 1 << 20) -> bool:
    """``mallopt(M_MMAP_THRESHOLD, threshold)``: every allocation of ``threshold`` bytes or more (default
    1 MiB) gets its own mapping, returned to the OS when freed, for the rest of the process (glibc then
    stops adapting the threshold). Lowers the resident peak of calibration towards the live memory,
    at the price of page faults on every large allocation (slower forwards). Returns whether it applied
    (glibc only). Raises ValueError for a threshold outside ``1 .. 32 MiB``."""
    if not 1 <= threshold <= 32 << 20:
        raise ValueError(f"mmap threshold must be 1 byte .. 32 MiB, got {threshold}")
    mallopt = _mallopt()
    return mallopt is not None and mallopt(_M_MMAP_THRESHOLD, threshold) == 1

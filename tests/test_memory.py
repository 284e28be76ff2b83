"""squeezer.memory: freed heap pages go back to the operating system (glibc's malloc_trim)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from squeezer.memory import _malloc_trim, _mallopt, limit_heap_retention, release_free_memory

PROBE = """
import os
import numpy as np
from squeezer.memory import release_free_memory

def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

chunks = [np.ones(8000) for _ in range(3000)]  # 3000 x 64 kB from the heap, below the mmap threshold
keep = np.ones(8000)                            # allocated last: the top of the heap stays in use
before = rss()
del chunks
freed = rss()
release_free_memory()
print(before - freed, freed - rss())
"""


@pytest.mark.skipif(_malloc_trim() is None or not sys.platform.startswith("linux"), reason="needs glibc on Linux")
def test_freed_heap_memory_returns_to_the_os():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout.split()
    dropped_by_free, dropped_by_trim = map(int, out)
    assert dropped_by_free < 50 * 2**20, "glibc keeps freed heap pages resident (what the trim is for)"
    assert dropped_by_trim > 150 * 2**20, "the trim returns the ~180 MiB freed"


def test_release_calls_malloc_trim_with_zero_and_skips_without_it(monkeypatch):
    import squeezer.memory as memory

    calls: list[int] = []
    monkeypatch.setattr(memory, "_malloc_trim", lambda: calls.append)
    release_free_memory()
    assert calls == [0], "malloc_trim(0): trim every free page"
    monkeypatch.setattr(memory, "_malloc_trim", lambda: None)  # not glibc: nothing to call
    release_free_memory()
    assert calls == [0]


RETENTION = """
import os, sys
import numpy as np
from squeezer.memory import limit_heap_retention

def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

if sys.argv[1] == "limit":
    assert limit_heap_retention(1 << 20)
big = np.ones(1 << 20)           # 8 MiB, mapped on its own; freeing it raises glibc's dynamic threshold
del big
chunks = [np.ones(1 << 18) for _ in range(100)]  # 100 x 2 MiB
keep = np.ones(1 << 18)  # allocated last: the top of the heap stays in use
before = rss()
del chunks
print(before - rss())
"""


@pytest.mark.skipif(_mallopt() is None or not sys.platform.startswith("linux"), reason="needs glibc on Linux")
def test_limited_heap_retention_unmaps_large_tensors_when_freed():
    def dropped(mode: str) -> int:
        run = subprocess.run([sys.executable, "-c", RETENTION, mode], capture_output=True, text=True, check=True)
        return int(run.stdout.split()[-1])

    assert dropped("default") < 50 * 2**20, "glibc's raised threshold keeps the freed 200 MiB in the heap"
    assert dropped("limit") > 180 * 2**20, "with a fixed 1 MiB threshold each 2 MiB block is unmapped when freed"


@pytest.mark.parametrize("threshold", [0, 64 << 20])
def test_heap_retention_threshold_is_checked(threshold):
    with pytest.raises(ValueError, match="threshold"):
        limit_heap_retention(threshold)

"""What the benchmarks record about the machine they ran on (shared by the bench scripts)."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8")


def loadavg() -> str:
    """The 1 / 5 / 15-minute load averages, as ``/proc/loadavg`` gives them."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def cpu_info() -> dict[str, Any]:
    """CPU model name, the vector / matrix ISA flags that decide the kernels, logical CPUs, platform."""
    cpu, flags = platform.processor() or platform.machine(), []
    try:
        text = Path("/proc/cpuinfo").read_text()
        cpu = next(line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name"))
        have = set(next(line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")))
        flags = [f for f in FLAGS if f in have]
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cpu_flags": flags, "logical_cpus": os.cpu_count(), "platform": platform.platform()}


def versions(*modules: str) -> dict[str, str | None]:
    """``{module: __version__}`` (None when not importable), python first."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for mod in modules:
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            out[mod] = None
    return out

"""What the benchmarks record about the machine they ran on: CPU, versions, load of other processes, memory."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from common import utc_now

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


def versions(*modules: str, distributions: Mapping[str, str] | None = None) -> dict[str, str | None]:
    """``{module: version}``, python first: ``__version__`` of each of ``modules``, then the installed
    distribution's version for each ``{module: distribution}`` of ``distributions`` (read without importing
    it); None for what is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {"python": platform.python_version()}
    for mod in modules:
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            out[mod] = None
    for mod, dist in (distributions or {}).items():
        try:
            out[mod] = version(dist)
        except PackageNotFoundError:
            out[mod] = None
    return out


def machine_record(versions: dict[str, str | None], **settings: Any) -> dict[str, Any]:
    """The ``machine`` entry of a results file: CPU (:func:`cpu_info`), the run's ``settings``, torch's
    quantized engine, the UTC date, ``versions`` and the load average at the start."""
    return {**cpu_info(), **settings, "quantized_engine": torch.backends.quantized.engine, "date": utc_now(),
            "versions": versions, "loadavg_start": loadavg()}


class CpuMeter:
    """CPU used by *other* processes (in cores) between ``start`` and ``stop``: the machine's busy time
    from /proc/stat minus this process's own time. About 0 on a quiet machine."""

    def _read(self) -> tuple[float, float, float] | None:
        try:
            fields = [float(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
            mine = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, ValueError, IndexError):
            return None
        busy = sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0.0)  # minus idle and iowait
        return time.perf_counter(), busy, float(mine[11]) + float(mine[12])  # utime + stime

    def start(self) -> "CpuMeter":
        self.begin = self._read()
        return self

    def stop(self) -> float | None:
        end = self._read()
        if self.begin is None or end is None or end[0] - self.begin[0] <= 0:
            return None
        hz = os.sysconf("SC_CLK_TCK")
        return max(0.0, ((end[1] - self.begin[1]) - (end[2] - self.begin[2])) / hz / (end[0] - self.begin[0]))


def foreign_load(seconds: float = 2.0) -> float | None:
    """CPU cores other processes used over the next ``seconds`` (this process sleeps meanwhile)."""
    meter = CpuMeter().start()
    time.sleep(seconds)
    return meter.stop()


def wait_quiet(max_wait_s: float, log: Callable[[str], None], threshold: float = 0.3) -> float | None:
    """Sleep until other processes use less than ``threshold`` cores (or ``max_wait_s`` passes); their load."""
    deadline = time.perf_counter() + max_wait_s
    load = foreign_load()
    while load is not None and load >= threshold and time.perf_counter() < deadline:
        log(f"  other processes use {load:.2f} cores; waiting for a quieter machine")
        load = foreign_load(5.0)
    return load


class PeakMemory:
    """Peak resident memory of this process above its level at entry, in bytes (``extra``): Linux's
    high-water mark ``VmHWM`` is reset on entry (``/proc/self/clear_refs`` = 5) and read on exit.
    ``extra`` is None where /proc does not offer this."""

    extra: int | None = None

    @staticmethod
    def _status(key: str) -> int | None:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        except (OSError, ValueError):
            return None
        return None

    def __enter__(self) -> "PeakMemory":
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.base = self._status("VmRSS")
        except OSError:
            self.base = None
        return self

    def __exit__(self, *exc: object) -> None:
        peak = self._status("VmHWM")
        self.extra = None if self.base is None or peak is None else max(0, peak - self.base)

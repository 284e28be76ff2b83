"""Choose a path per layer shape and batch size by timing the eligible ones.

Rows ``m`` fall in buckets (1, 2-16, 17-128, >128), each timed at a representative size.
A choice is cached in memory and in ``$SQUEEZER_CACHE_DIR/kernels.json`` (default
``~/.cache/squeezer``) keyed by torch version, threads, paths, format and ``(N, K, bucket)``,
so a second model with the same shapes is packed without timing.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from .base import KernelPath, LinearProblem

BUCKETS: tuple[tuple[int, int], ...] = ((1, 1), (16, 8), (128, 64), (1 << 62, 256))
"""(largest m in the bucket, m used to time it)."""
_MEMORY: dict[str, str] = {}


def bucket_of(m: int) -> int:
    """Index of the bucket that holds ``m`` rows."""
    return 0 if m == 1 else 1 if m <= 16 else 2 if m <= 128 else 3


def _cache_file() -> Path:
    root = os.environ.get("SQUEEZER_CACHE_DIR") or Path.home() / ".cache" / "squeezer"
    return Path(root) / "kernels.json"


def _load_disk() -> dict[str, str]:
    try:
        data = json.loads(_cache_file().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _store_disk(key: str, name: str) -> None:
    path = _cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _load_disk()
        data[key] = name
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        pass  # an unwritable cache only costs a re-measurement


def time_path(path: KernelPath, state: Any, x: torch.Tensor, repeats: int = 7) -> float:
    """Median seconds of ``repeats`` calls after two warm-up calls."""
    with torch.no_grad():
        for _ in range(2):
            path.run(state, x)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            path.run(state, x)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def choose(problem: LinearProblem, paths: tuple[KernelPath, ...], states: dict[str, Any], bucket: int) -> str:
    """The fastest eligible path for ``bucket`` (cached)."""
    m = BUCKETS[bucket][1]
    eligible = [p for p in paths if p.eligible(problem, m)]
    if len(eligible) == 1:
        return eligible[0].name
    spec = problem.weight.spec.describe() + f"|{problem.config.activation_mode}"
    key = (f"{torch.__version__}|t{torch.get_num_threads()}|{','.join(p.name for p in eligible)}|{spec}|"
           f"{problem.out_features}x{problem.in_features}|b{bucket}")
    if key not in _MEMORY:
        cached = _load_disk().get(key)
        if cached in {p.name for p in eligible}:
            _MEMORY[key] = cached
        else:
            x = torch.randn(m, problem.in_features)
            timings = {p.name: time_path(p, states[p.name], x) for p in eligible}
            _MEMORY[key] = min(timings, key=timings.get)
            _store_disk(key, _MEMORY[key])
    return _MEMORY[key]

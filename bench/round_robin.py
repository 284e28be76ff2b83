"""Round-robin timing of several calls on one machine and the round-by-round ratio of two of them.

Every call is timed in the same rounds (each in a new seeded random order), so machine noise hits all of
them alike; two calls are compared by the median of their per-round time ratios with a bootstrap interval.
Used by ``peers.py`` and ``probes.py``.
"""

from __future__ import annotations

import math
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from machine import CpuMeter

QUIET_CORES = 0.25  # a timing round is clean when other processes used fewer cores than this
REWARM_S = 0.004    # untimed calls before a fast path's timed ones, when its turn comes (1 to 10 calls)


def time_round_robin(calls: dict[str, Callable[[], Any]], budget_s: float, min_rounds: int,
                     max_rounds: int) -> tuple[dict[str, list[float]], dict[str, list[float]], dict[str, Any]]:
    """Warm up every call, then time them in rounds (each in a new seeded random order, so that no path
    always follows the same one); ms samples per name, each name's median per kept round, and the rounds' info.

    A call estimated under 50 ms is re-warmed when its turn comes (untimed calls for about
    ``REWARM_S``, 1 to 10 of them: its weights back in cache, as in a service that calls one model
    in a loop) and then timed 3 times in a row; a slower call is timed once per round
    (``python bench/probes.py same-graph`` measures both settings on the MLP at batch 1). The number of rounds comes
    from ``budget_s``. A round during which other processes used more than ``QUIET_CORES`` cores
    is not counted as clean; rounds go on until enough are clean or twice the budget has passed,
    and only clean rounds are kept when there are at least ``min_rounds`` of them.
    """
    estimate = {}
    for name, fn in calls.items():
        fn()
        start = time.perf_counter()
        fn()
        estimate[name] = time.perf_counter() - start
    plan = {name: (max(1, min(10, math.ceil(REWARM_S / max(est, 1e-9)))), 3) if est < 0.05 else (0, 1)
            for name, est in estimate.items()}
    per_round = sum(estimate[n] * (rewarm + inner) for n, (rewarm, inner) in plan.items())
    target = max(min_rounds, min(max_rounds, int(budget_s / max(per_round, 1e-9))))
    per_round_samples: list[dict[str, list[float]]] = []
    foreign: list[float | None] = []
    names = list(calls)
    begin = time.perf_counter()
    while True:
        r = len(per_round_samples)
        meter = CpuMeter().start()
        got: dict[str, list[float]] = {name: [] for name in names}
        for name in random.Random(r).sample(names, len(names)):  # each path after random others
            rewarm, inner = plan[name]
            fn = calls[name]
            for _ in range(rewarm):
                fn()
            for _ in range(inner):
                start = time.perf_counter()
                fn()
                got[name].append((time.perf_counter() - start) * 1e3)
        per_round_samples.append(got)
        foreign.append(meter.stop())
        clean = sum(1 for f in foreign if f is not None and f < QUIET_CORES)
        if r + 1 >= target and (clean >= target or time.perf_counter() - begin > 2 * budget_s or r + 1 >= max_rounds):
            break
    keep = [i for i, f in enumerate(foreign) if f is not None and f < QUIET_CORES]
    if len(keep) < min_rounds:
        keep = list(range(len(per_round_samples)))
    samples = {name: [ms for i in keep for ms in per_round_samples[i][name]] for name in names}
    info = {"rounds": len(per_round_samples), "rounds_kept": len(keep), "clean_rounds": clean,
            "foreign_cores_per_round": [None if f is None else round(f, 3) for f in foreign]}
    round_ms = {name: [round(statistics.median(per_round_samples[i][name]), 5) for i in keep] for name in names}
    return samples, round_ms, info


def paired_rounds(mine: list[float] | None, theirs: list[float] | None, resamples: int = 2000) -> dict[str, Any]:
    """Both paths timed in the same rounds: the share of rounds where ``mine`` was at least as fast, and the
    median of the per-round ratios ``mine / theirs`` with a 95 % bootstrap interval (seeded). An interval
    that holds 1 means that the two are equally fast within this machine's noise."""
    if not mine or not theirs or len(mine) != len(theirs):
        return {"rounds": 0}
    ratios = np.asarray(mine) / np.asarray(theirs)
    rng = np.random.default_rng(0)
    boot = np.median(rng.choice(ratios, size=(resamples, len(ratios))), axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {"rounds": len(ratios), "faster_rounds": int((ratios <= 1).sum()), "median_ratio": float(np.median(ratios)),
            "ratio_ci95": [float(lo), float(hi)],
            "verdict": "faster" if hi < 1 else "slower" if lo > 1 else "equal within noise"}

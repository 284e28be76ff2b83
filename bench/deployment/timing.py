"""Batch-1 latency of the paths, interleaved round-robin, and the fraud serving loop."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from common import log, short_error
from machine import CpuMeter, wait_quiet
from deployment.evaluate import as_numpy, forms
from deployment.paths import DPath
from deployment.runtimes import set_threads
from deployment.tasks import Task

BLOCK = 10                      # consecutive calls of one path per round-robin turn
WARMUP = 20
WARMUP_S = 10.0                 # warm-up stops after this long (slow paths)
SLOW_PATH_S = 300.0             # a path whose calls would take longer than this gets fewer (>= MIN_CALLS)
MIN_CALLS = 30
SERVE_CHUNK = 250
QUIET_CORES = 0.25


def rotated(names: list[str], r: int) -> list[str]:
    """Round ``r``'s order: ``names`` rotated left by ``r`` (each path leads once every ``len(names)`` rounds)."""
    return names[r % len(names):] + names[:r % len(names)] if names else []


def percentile(samples: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``samples``."""
    return float(np.percentile(np.asarray(samples), q))


def time_paths(task: Task, paths: list[DPath], calls: int, threads: int,
               wait_s: float = 0.0) -> tuple[dict[str, dict[str, float]], dict[str, Any]]:
    """Round-robin timing at ``threads`` threads: after ``WARMUP`` calls each (at most ``WARMUP_S`` seconds),
    rounds of ``BLOCK`` calls per path (order rotated each round) until every path has ``calls`` timed calls;
    inputs cycle over up to 32 test inputs. A path whose warm-up says that ``calls`` calls would take more
    than ``SLOW_PATH_S`` gets fewer (at least ``MIN_CALLS``; its record says how many). First waits up
    to ``wait_s`` seconds for a quiet machine."""
    before = wait_quiet(wait_s, log) if wait_s > 0 else None
    info = set_threads(threads)
    info["foreign_cores_before"] = before
    pool = [forms(b) for b in task.eval_inputs[:32]]
    runners: dict[str, tuple[Callable[..., Any], str]] = {}
    errors: dict[str, str] = {}
    for p in paths:
        if p.make is None or not p.timed:
            continue
        try:
            runners[p.key] = (p.make(threads), p.wants)
        except Exception as exc:  # noqa: BLE001
            errors[p.key] = short_error(exc)
    samples: dict[str, list[float]] = {k: [] for k in runners}
    target: dict[str, int] = {}
    meter = CpuMeter().start()
    clock = time.perf_counter_ns
    with torch.inference_mode():
        for key, (run, wants) in list(runners.items()):
            try:
                begin, took = time.perf_counter(), []
                for i in range(WARMUP):
                    t0 = clock()
                    run(*pool[i % len(pool)][wants])
                    took.append((clock() - t0) / 1e9)
                    if time.perf_counter() - begin > WARMUP_S:
                        break
            except Exception as exc:  # noqa: BLE001
                errors[key] = short_error(exc)
                del runners[key], samples[key]
                continue
            per_call = float(np.median(took[len(took) // 2:]))
            target[key] = calls if per_call * calls <= SLOW_PATH_S else max(MIN_CALLS, int(SLOW_PATH_S / per_call))
        names = list(runners)
        r = 0
        while any(len(samples[k]) < target[k] for k in names):
            for key in rotated(names, r):
                if len(samples[key]) >= target[key]:
                    continue
                run, wants = runners[key]
                got = samples[key]
                for j in range(min(BLOCK, target[key] - len(got))):
                    inp = pool[(r * BLOCK + j) % len(pool)][wants]
                    t0 = clock()
                    run(*inp)
                    got.append((clock() - t0) / 1e6)
            r += 1
    busy = meter.stop()
    stats = {}
    for key, s in samples.items():
        stats[key] = {"median_ms": percentile(s, 50), "p99_ms": percentile(s, 99), "mean_ms": float(np.mean(s)),
                      "min_ms": float(np.min(s)), "calls": len(s)}
        if len(s) < calls:
            stats[key]["note"] = f"{len(s)} calls only: {calls} would take over {SLOW_PATH_S:.0f} s"
    for key, err in errors.items():
        stats[key] = {"error": err}
    info.update(foreign_cores=None if busy is None else round(busy, 3), calls=calls, block=BLOCK, warmup=WARMUP)
    return stats, info


def serve_fraud(task: Task, paths: list[DPath], threads: int, requests: int,
                wait_s: float = 0.0) -> tuple[dict[str, dict[str, float]], dict[str, Any]]:
    """The fraud service: one raw transaction per request -> standardise -> model -> sigmoid -> decision.
    Paths take turns serving chunks of ``SERVE_CHUNK`` consecutive requests (order rotated); per path
    p50 / p99 of the request time and throughput = requests / time spent serving them (after waiting up
    to ``wait_s`` seconds for a quiet machine)."""
    before = wait_quiet(wait_s, log) if wait_s > 0 else None
    info = set_threads(threads)
    info["foreign_cores_before"] = before
    fraud = task.extra["fraud"]
    raw = task.extra["raw_test"]
    mean, std = fraud.mean, fraud.std
    runners = {p.key: (p.make(threads), p.wants) for p in paths if p.make is not None and p.timed}
    lat: dict[str, list[float]] = {k: [] for k in runners}
    flagged: dict[str, int] = {k: 0 for k in runners}
    names = list(runners)
    clock = time.perf_counter_ns
    meter = CpuMeter().start()
    with torch.inference_mode():
        for key in names:  # warm-up
            run, wants = runners[key]
            x = ((raw[0] - mean) / std).astype(np.float32)[None]
            for _ in range(WARMUP):
                run(torch.from_numpy(x) if wants == "torch" else x)
        for r in range(math.ceil(requests / SERVE_CHUNK)):
            for key in rotated(names, r):
                run, wants = runners[key]
                got = lat[key]
                for j in range(SERVE_CHUNK):
                    row = raw[(r * SERVE_CHUNK + j) % len(raw)]
                    t0 = clock()
                    x = ((row - mean) / std).astype(np.float32)[None]
                    logit = float(as_numpy(run(torch.from_numpy(x) if wants == "torch" else x)).reshape(-1)[0])
                    fraud_p = 1.0 / (1.0 + math.exp(-logit))
                    flagged[key] += fraud_p > 0.5
                    got.append((clock() - t0) / 1e6)
    busy = meter.stop()
    stats = {k: {"p50_ms": percentile(s, 50), "p99_ms": percentile(s, 99), "mean_ms": float(np.mean(s)),
                 "throughput_rps": len(s) / (sum(s) / 1e3), "requests": len(s), "flagged": flagged[k]}
             for k, s in lat.items()}
    info.update(foreign_cores=None if busy is None else round(busy, 3), requests=requests, chunk=SERVE_CHUNK)
    return stats, info

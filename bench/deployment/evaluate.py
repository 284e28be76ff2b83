"""Accuracy of every path: batch-1 outputs over the test inputs -> metrics and relative L2 errors."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from common import log, short_error
from deployment.paths import DPath
from deployment.runtimes import EVAL_THREADS, set_threads
from deployment.tasks import Task

EVAL_SLOW_S = 90.0              # a path whose accuracy run would take longer is evaluated on fewer inputs
EVAL_MIN = 40


def as_numpy(out: Any) -> np.ndarray:
    """A runner's output (first of a tuple) as a float32 array."""
    if isinstance(out, (tuple, list)):
        out = out[0]
    if isinstance(out, torch.Tensor):
        return out.detach().float().numpy()
    return np.asarray(out, dtype=np.float32)


def forms(inputs: tuple) -> dict[str, tuple]:
    """The inputs in the two forms the runners take: ``{"torch": tensors, "numpy": arrays}``."""
    return {"torch": inputs, "numpy": tuple(t.numpy() for t in inputs)}


def evaluate(task: Task, paths: list[DPath]) -> dict[str, dict[str, Any]]:
    """Batch-1 outputs of every path over the test inputs -> metrics, rel. L2 vs fp32 and vs the same
    config's squeezer PyTorch model (packed and simulated). A path so slow that all inputs would take more
    than ``EVAL_SLOW_S`` runs the first ``n`` only (at least ``EVAL_MIN``); its record then holds ``eval_n`` and
    the metrics of its twins and same-runtime peers on those ``n`` inputs (``subset_refs``), which the goals use."""
    set_threads(EVAL_THREADS)
    inputs = [forms(b) for b in task.eval_inputs]
    stacked: dict[str, np.ndarray] = {}
    res: dict[str, dict[str, Any]] = {}
    with torch.inference_mode():
        for p in paths:
            if p.make is None:
                continue
            start = time.perf_counter()
            try:
                run = p.make(EVAL_THREADS)
                first = task.reduce(as_numpy(run(*inputs[0][p.wants])), inputs[0]["numpy"])
                t0 = time.perf_counter()
                run(*inputs[0][p.wants])
                per_call = time.perf_counter() - t0
                n = len(inputs) if per_call * len(inputs) <= EVAL_SLOW_S else \
                    min(len(inputs), max(EVAL_MIN, int(EVAL_SLOW_S / per_call)))
                rows = [first] + [task.reduce(as_numpy(run(*f[p.wants])), f["numpy"]) for f in inputs[1:n]]
                stacked[p.key] = np.stack(rows)
            except Exception as exc:  # noqa: BLE001
                res[p.key] = {"error": f"evaluation: {short_error(exc)}"}
                log(f"  {p.key}: evaluation FAILED {res[p.key]['error']}")
                continue
            res[p.key] = {"eval_s": round(time.perf_counter() - start, 2)}
            if n < len(inputs):
                res[p.key]["eval_n"] = n
                log(f"  {p.key}: {per_call:.2f} s per call: evaluated on the first {n} of {len(inputs)} inputs")
    ref = stacked.get(paths[0].key)
    if ref is None:
        raise RuntimeError(f"{task.name}: the torch fp32 reference failed")
    sq_torch = {p.config: p.key for p in paths if p.family == "squeezer" and p.runtime == "PyTorch"}
    sq_sim = {p.config: p.key for p in paths if p.family == "squeezer-sim"}
    rel = lambda a, b: float(np.linalg.norm(a - b) / np.linalg.norm(b))  # noqa: E731
    for p in paths:
        if p.key not in stacked:
            continue
        y = stacked[p.key]
        n = len(y)
        r = res[p.key]
        r["metrics"] = task.metric(y, ref[:n])
        r["rel_l2_vs_fp32"] = rel(y, ref[:n])
        twin = sq_torch.get(p.config) if p.family == "squeezer" and p.runtime != "PyTorch" else None
        if twin in stacked:
            r["rel_l2_vs_squeezer_torch"] = rel(y, stacked[twin][:n])
        sim = sq_sim.get(p.config) if p.family == "squeezer" else None
        if sim in stacked:
            r["rel_l2_vs_squeezer_sim"] = rel(y, stacked[sim][:n])
        if n < len(ref):
            others = [twin, sim] + [q.key for q in paths if q.family == "peer" and q.runtime == p.runtime]
            r["subset_refs"] = {k: task.metric(stacked[k][:n], ref[:n]) for k in others if k in stacked and len(stacked[k]) >= n}
    return res

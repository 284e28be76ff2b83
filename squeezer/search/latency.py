"""Measured per-layer latency table for latency budgets: every candidate layer, alone, in every
format, packed on the real kernels (:func:`squeezer.pack`), at batch 1.

``ms[l][f]`` is the median wall time of layer ``l`` in format ``f`` on its own batch-1 input (captured
from a float pass); ``fixed_ms = max(0, t_model - sum_l ms[l]["fp32"])`` is the time of everything else
(activations, norms, attention), so a model's latency is estimated as ``fixed_ms + sum_l ms[l][f_l]``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from ..api import quantize
from ..calibration import Batch, call_model
from ..errors import DataError
from ..kernels import pack
from .formats import FLOAT, format_config


@dataclass
class LatencyTable:
    ms: dict[str, dict[str, float]]
    fixed_ms: float
    model_ms: float

    def total(self, choice: dict[str, str]) -> float:
        """Estimated batch-1 model latency of a format choice (ms)."""
        return self.fixed_ms + sum(self.ms[l][f] for l, f in choice.items())


def first_row(batch: Batch) -> Batch:
    """The batch cut to its first row (tensors, tuples and dicts alike)."""
    if isinstance(batch, Tensor):
        return batch[:1]
    if isinstance(batch, dict):
        return {k: first_row(v) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(first_row(v) for v in batch)
    return batch


def median_ms(fn: Callable[[], object], repeats: int = 50, warmup: int = 5) -> float:
    """Median wall time of ``fn()`` in milliseconds, after ``warmup`` calls, without gradients."""
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _layer_inputs(model: nn.Module, names: list[str], batch: Batch) -> dict[str, Tensor]:
    modules = dict(model.named_modules())
    seen: dict[str, Tensor] = {}
    hooks = [modules[n].register_forward_pre_hook(lambda m, args, n=n: seen.setdefault(n, args[0].detach()))
             for n in names]
    try:
        with torch.no_grad():
            call_model(model, batch)
    finally:
        for h in hooks:
            h.remove()
    missing = [n for n in names if n not in seen]
    if missing:
        raise DataError(f"layers {missing[:3]} were not reached by the example batch")
    return seen


def _packed_layer(layer: nn.Module, fmt: str) -> nn.Module:
    """A packed copy of ``layer`` alone in format ``fmt``."""
    cfg = replace(format_config(fmt), include=("^layer$",))
    return pack(quantize(nn.ModuleDict({"layer": layer}), cfg, progress=False), inplace=True)["layer"]


def measure_latency(model: nn.Module, batch: Batch, names: list[str], formats: list[str],
                    repeats: int = 50) -> LatencyTable:
    """Time every layer of ``names`` in every format at batch 1 (see module docstring)."""
    model = model.eval()
    example = first_row(batch)
    inputs = _layer_inputs(model, names, example)
    modules = dict(model.named_modules())
    ms: dict[str, dict[str, float]] = {}
    for n in names:
        x = inputs[n]
        ms[n] = {}
        for f in dict.fromkeys((FLOAT, *formats)):
            layer = modules[n] if f == FLOAT else _packed_layer(modules[n], f)
            ms[n][f] = median_ms(lambda layer=layer, x=x: layer(x), repeats)
    total = median_ms(lambda: call_model(model, example), repeats)
    return LatencyTable(ms, max(0.0, total - sum(ms[n][FLOAT] for n in names)), total)

"""``auto_quantize``: one format per layer under a budget: measure sensitivities, allocate, quantize.

A byte budget is checked against the real checkpoint: the model is saved to a temporary directory
and, while the files exceed the budget, the allocation is re-solved with the budget reduced by the
excess (manifest and header overhead), so ``bytes(checkpoint) <= budget``.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

from torch import nn

from ..calibration import Batch, check_batches
from ..errors import ConfigError, DataError
from ..io.checkpoint import save
from ..report.quant import QuantReport
from ..transform import report_of
from .allocate import Allocation, Budget, allocate
from .formats import DEFAULT_FORMATS, FLOAT
from .sensitivity import Sensitivity, measure_sensitivity
from .tune import build


def checkpoint_bytes(model: nn.Module) -> int:
    """Bytes of ``squeezer.save(model, ...)``: every file of the checkpoint directory."""
    with tempfile.TemporaryDirectory() as tmp:
        path = save(model, Path(tmp) / "checkpoint")
        return sum(f.stat().st_size for f in path.iterdir())


def auto_quantize(model: nn.Module, calib: Iterable[Batch], budget: Budget | dict[str, float] | float, *,
                  algorithm: str = "rtn", formats: tuple[str, ...] | list[str] = DEFAULT_FORMATS,
                  score: str = "rel_mse", sens: Sensitivity | None = None, inplace: bool = False,
                  progress: bool = True) -> nn.Module:
    """Quantize ``model`` with one format per layer, chosen from measured sensitivities under ``budget``
    (a :class:`Budget`, a mapping of its fields, or mean bits per weight). Returns the quantized model (a
    copy unless ``inplace``) in simulate mode; its :class:`QuantReport` holds the allocation in
    ``report.config["allocation"]``."""
    if budget is None:
        raise ConfigError("auto_quantize needs a budget (e.g. 4.0 mean bits, or {'bytes': 200_000})")
    if calib is None:
        raise DataError("auto_quantize measures per-layer sensitivity: pass calibration batches")
    batches = check_batches(calib)
    sens = sens or measure_sensitivity(model, batches, formats, algorithm=algorithm, progress=progress)
    q, allocation = _fit_budget(model, batches, Budget.parse(budget), sens, algorithm, score)
    if inplace:
        q = build(model, allocation.choice, batches, algorithm, inplace=True)
    report_of(q, QuantReport).config["allocation"] = allocation.to_dict()
    return q


def _fit_budget(model: nn.Module, calib: list[Batch], budget: Budget, sens: Sensitivity, algorithm: str,
                score: str) -> tuple[nn.Module, Allocation]:
    """The model built from the allocation under ``budget`` whose checkpoint fits a byte budget."""
    target, slack = budget.bytes, 0.0
    for _ in range(8):
        alloc = allocate(sens, budget if target is None else replace(budget, bytes=target - slack), score=score)
        q = build(model, alloc.choice, calib, algorithm)
        if target is None or all(f == FLOAT for f in alloc.choice.values()):
            return q, alloc  # nothing quantized: the user's own float model, no checkpoint to measure
        size = checkpoint_bytes(q)
        alloc.extra["checkpoint_bytes"] = size
        if size <= target:
            return q, alloc
        slack = max(size - alloc.bytes, slack + size - target)
    raise ConfigError(f"budget bytes={target:g}: no allocation fits the checkpoint after 8 tries")

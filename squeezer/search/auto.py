"""``squeezer.quantize(model, "auto", budget=...)``: measure sensitivities, allocate under the
budget, quantize. A byte budget is checked against the real checkpoint: the model is saved to a
temporary directory and, while the files exceed the budget, the allocation is re-solved with the
budget reduced by the excess (manifest and header overhead), so ``bytes(checkpoint) <= budget``.
"""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path

from torch import nn

from ..calibration import Batch
from ..errors import ConfigError
from .allocate import Allocation, Budget, allocate
from .formats import DEFAULT_FORMATS, FLOAT
from .sensitivity import Sensitivity, measure_sensitivity
from .tune import build


def checkpoint_bytes(model: nn.Module) -> int:
    """Bytes of ``squeezer.save(model, ...)``: every file of the checkpoint directory."""
    from ..io.checkpoint import save

    with tempfile.TemporaryDirectory() as tmp:
        path = save(model, Path(tmp) / "checkpoint")
        return sum(f.stat().st_size for f in path.iterdir())


def auto_quantize(model: nn.Module, calib: list[Batch], budget: Budget | dict[str, float] | float, *,
                  formats: tuple[str, ...] | list[str] = DEFAULT_FORMATS, algorithm: str = "rtn",
                  score: str = "rel_mse", sens: Sensitivity | None = None,
                  progress: bool = True) -> tuple[nn.Module, Allocation]:
    """The quantized model (simulate mode, a copy) and its allocation."""
    budget = Budget.parse(budget)
    sens = sens or measure_sensitivity(model, calib, formats, algorithm=algorithm, progress=progress)
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

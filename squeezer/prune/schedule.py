"""Gradual magnitude pruning on the cubic schedule of Zhu & Gupta (2017), "To prune, or not
to prune", with user fine-tuning between steps.

At step ``t = 0 .. n`` the target sparsity is ``s_t = s_f + (s_i - s_f) (1 - t / n)^3``: it rises
fast while many redundant weights remain and flattens as it nears ``s_f``, leaving the
fine-tuning steps time to recover.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from ..errors import ConfigError
from ..transform import attach_report, report_of, working_copy
from .magnitude import Scope, check_sparsity, magnitude_prune, mask_report, weight_sparsity
from .report import PruneReport, count_params
from .select import LAYER_CLASSES, select_layers


def cubic_sparsity(step: int, steps: int, target: float, initial: float = 0.0) -> float:
    """``s_t = s_f + (s_i - s_f) (1 - t / n)^3`` with ``t = step``, ``n = steps``, ``s_f = target``,
    ``s_i = initial``; ``s_0 = s_i`` and ``s_n = s_f``."""
    _check_steps(steps)
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= steps:
        raise ConfigError(f"step must be an integer in [0, steps={steps}], got {step!r}")
    return target + (initial - target) * (1.0 - step / steps) ** 3


def _check_steps(steps: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps must be an integer >= 1, got {steps!r}")


@dataclass
class PruneStep:
    """One step of :func:`gradual_prune`: the scheduled sparsity and the one reached."""

    step: int
    scheduled: float
    sparsity: float


@dataclass
class GradualPruneReport:
    steps: list[PruneStep] = field(default_factory=list)
    final: PruneReport | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"steps": [asdict(s) for s in self.steps], "final": None if self.final is None else self.final.to_dict()}


def gradual_prune(
    model: nn.Module,
    target: float,
    steps: int,
    train_fn: Callable[[nn.Module], Any],
    *,
    initial: float = 0.0,
    scope: Scope = "global",
    layer_types: str | Sequence[str] = tuple(LAYER_CLASSES),
    include: str | Sequence[str] = (),
    ignore: str | Sequence[str] = (),
    inplace: bool = False,
) -> nn.Module:
    """Prune ``model`` to ``target`` sparsity in ``steps`` magnitude-pruning steps.

    For ``t = 1 .. steps``: mask to :func:`cubic_sparsity` ``(t, steps, target, initial)`` with
    :func:`magnitude_prune` (masks only grow), then call ``train_fn(model)``, which fine-tunes
    the model (its own optimiser, data and number of iterations; masked weights stay 0). The
    masks are left on: call :func:`remove_masks` when fine-tuning is over. ``sparsity`` in each
    step is measured on the selected layers' weights right after pruning; ``final`` compares
    the parameters in use before the first step with those after the last.
    """
    model = working_copy(model, inplace)
    target = check_sparsity(target, "target")
    initial = check_sparsity(initial, "initial")
    if initial > target:
        raise ConfigError(f"initial sparsity {initial} must be <= target {target}")
    if not callable(train_fn):
        raise ConfigError(f"train_fn must be a callable taking the model, got {type(train_fn).__name__}")
    _check_steps(steps)
    layers, _ = select_layers(model, layer_types, include, ignore)
    before, model_before = {name: count_params(m) for name, m in layers.items()}, count_params(model)
    report = GradualPruneReport()
    for t in range(1, steps + 1):
        scheduled = cubic_sparsity(t, steps, target, initial)
        last = report_of(magnitude_prune(model, scheduled, scope=scope, layer_types=layer_types, include=include,
                                         ignore=ignore, inplace=True))
        report.steps.append(PruneStep(t, scheduled, weight_sparsity(layers.values())))
        train_fn(model)
    report.final = mask_report(f"gradual-{scope}", model, layers, before, model_before, last.skipped)
    return attach_report(model, report)

"""Accuracy-driven search: the smallest mixed-precision model whose metric stays within a tolerance.

With ``m0 = evaluate(float model)`` and ``m = evaluate(candidate)``, the drop is ``m0 - m``
(``m - m0`` when lower is better), divided by ``|m0|`` when ``relative``. The search

1. starts from the budget's allocation (:func:`allocate`), or from every layer in its smallest format;
2. *falls back* while the drop exceeds ``max_drop``: the layer whose current format scores the
   highest sensitivity moves to its next larger format (more bytes, e.g. w3g128 -> w4g128 -> w8 -> fp32);
3. then *tightens*: tries moving each layer to its next smaller format, least sensitivity increase
   per byte saved first, and keeps every move after which the drop still holds;

a recurrent layer's matrices are all fp32 or none (:func:`choice_config`): a matrix that moves to fp32 takes
the layer's other matrices with it, and one that leaves fp32 takes them each one format down (:func:`move_unit`);

stopping after ``max_trials`` evaluations or ``timeout_s`` seconds, and returns the smallest model
that met the tolerance (or, when none did, the best-scoring one, with ``met = False``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..api import quantize
from ..calibration import Batch, check_batches
from ..errors import ConfigError
from .allocate import Allocation, Budget, allocate, choice_config, costs
from .formats import DEFAULT_FORMATS, FLOAT
from .sensitivity import Sensitivity, _evaluate, measure_sensitivity, split_unit


@dataclass
class Trial:
    step: str
    choice: dict[str, str]
    bytes: int
    metric: float
    drop: float
    met: bool


@dataclass
class TuneResult:
    """The chosen model (quantized, simulate mode) and every trial on the way."""

    model: nn.Module
    choice: dict[str, str]
    metric: float
    baseline: float
    drop: float
    met: bool
    bytes: int
    trials: list[Trial] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"choice": self.choice, "metric": self.metric, "baseline": self.baseline, "drop": self.drop,
                "met": self.met, "bytes": self.bytes, "seconds": self.seconds,
                "trials": [t.__dict__ for t in self.trials]}


def check_tolerance(max_drop: float) -> float:
    if not isinstance(max_drop, (int, float)) or not math.isfinite(max_drop) or max_drop < 0:
        raise ConfigError(f"max_drop (the tolerated metric drop) must be a number >= 0, got {max_drop!r}")
    return float(max_drop)


def build(model: nn.Module, choice: dict[str, str], calib: list[Batch], algorithm: str = "rtn", *,
          inplace: bool = False) -> nn.Module:
    """The model quantized with one format per layer, in eval mode (a copy unless ``inplace``)."""
    return quantize(model, choice_config(choice, algorithm), calib, inplace=inplace, progress=False).eval()


def _ladder(sens: Sensitivity, layer: str, formats: list[str]) -> list[str]:
    """The layer's formats from smallest to largest bytes."""
    return sorted(formats, key=lambda f: (sens.bytes[layer][f], f))


def move_unit(choice: dict[str, str], unit: str, ladders: dict[str, list[str]], direction: int) -> dict[str, str]:
    """``choice`` with ``unit`` one format up (``direction=1``) or down (``-1``) its ladder (formats by bytes); when
    a recurrent matrix reaches fp32 its layer's other matrices go to fp32 too, when it leaves fp32 they each
    move one format down with it."""
    ladder = ladders[unit]
    moved = {unit: ladder[ladder.index(choice[unit]) + direction]}
    layer, matrix = split_unit(unit)
    if matrix is not None and FLOAT in (choice[unit], moved[unit]):
        for other in choice:
            if other != unit and split_unit(other)[0] == layer:
                rungs = ladders[other]
                moved[other] = FLOAT if moved[unit] == FLOAT else rungs[rungs.index(FLOAT) - 1]
    return {**choice, **moved}


def tune(
    model: nn.Module,
    calib: Iterable[Batch],
    evaluate: Callable[[nn.Module], float],
    max_drop: float,
    *,
    budget: Budget | dict[str, float] | float | None = None,
    relative: bool = False,
    higher_is_better: bool = True,
    sens: Sensitivity | None = None,
    formats: tuple[str, ...] | list[str] = DEFAULT_FORMATS,
    score: str = "rel_mse",
    algorithm: str = "rtn",
    max_trials: int = 30,
    timeout_s: float | None = None,
    progress: bool = True,
    on_trial: Callable[[Trial], None] | None = None,
) -> TuneResult:
    """Run the search described in the module docstring; ``on_trial`` sees every finished trial."""
    max_drop = check_tolerance(max_drop)
    if max_trials < 1:
        raise ConfigError(f"max_trials must be at least 1, got {max_trials}")
    started = time.perf_counter()
    batches = check_batches(calib)
    sens = sens or measure_sensitivity(model, batches, formats, algorithm=algorithm, progress=progress)
    fmts = [f for f in formats if f in sens.formats]
    table = sens.scores(score)
    baseline = sens.baseline if sens.baseline is not None else _evaluate(evaluate, model, "the float model")

    def drop_of(metric: float) -> float:
        d = baseline - metric if higher_is_better else metric - baseline
        return d / abs(baseline) if relative and baseline else d

    trials: list[Trial] = []
    best: list[Any] = [None, None]  # (trial, model): met first, then fewest bytes, then smallest drop

    def rank(t: Trial) -> tuple:
        return (not t.met, t.bytes if t.met else 0, t.drop)

    def run(step: str, choice: dict[str, str]) -> Trial:
        q = build(model, choice, batches, sens.algorithm)
        metric = _evaluate(evaluate, q, f"trial {len(trials)} ({step})")
        d = drop_of(metric)
        trial = Trial(step, dict(choice), int(costs(sens, choice)["bytes"]), metric, d, d <= max_drop)
        trials.append(trial)
        if best[0] is None or rank(trial) < rank(best[0]):
            best[:] = [trial, q]
        if on_trial is not None:
            on_trial(trial)
        return trial

    def budget_left() -> bool:
        return len(trials) < max_trials and (timeout_s is None or time.perf_counter() - started < timeout_s)

    ladders = {l: _ladder(sens, l, fmts) for l in sens.layers}
    if budget is not None:
        start: Allocation = allocate(sens, budget, score=score, formats=fmts)
        choice = dict(start.choice)
    else:
        choice = {l: ladders[l][0] for l in sens.layers}
    current = run("start", choice)
    while not current.met and budget_left():
        movable = [l for l in sens.layers if ladders[l][-1] != choice[l]]
        if not movable:
            break
        worst = max(movable, key=lambda l: table[l][choice[l]])
        choice = move_unit(choice, worst, ladders, 1)
        current = run("fallback", choice)
    if current.met:
        def gain(l: str) -> float:
            smaller = ladders[l][ladders[l].index(choice[l]) - 1]
            saved = sens.bytes[l][choice[l]] - sens.bytes[l][smaller]
            return (table[l][smaller] - table[l][choice[l]]) / max(saved, 1)

        accepted = True
        while accepted and budget_left():  # passes until no layer can shrink further
            accepted = False
            for layer in sorted([l for l in sens.layers if ladders[l][0] != choice[l]], key=gain):
                if not budget_left():
                    break
                if ladders[layer][0] == choice[layer]:  # moved down with its recurrent layer in this pass
                    continue
                candidate = move_unit(choice, layer, ladders, -1)
                if run("tighten", candidate).met:
                    choice, accepted = candidate, True
    t, chosen = best
    return TuneResult(chosen, t.choice, t.metric, baseline, t.drop, t.met, t.bytes, trials,
                      time.perf_counter() - started)

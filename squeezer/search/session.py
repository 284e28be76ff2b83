"""One search run, as ``squeezer search`` does it: sensitivities -> search -> the chosen model saved
as a checkpoint, with its before / after figures (:func:`squeezer.report.data.search_data` turns
a :class:`SearchRun` into the data of the HTML report).

Strategies: ``tune`` (accuracy-driven fallback from the budget's allocation, :mod:`.tune`) and
``pareto`` (the joint Optuna study of :mod:`.joint` over mean bits up to the budget's, pruning
``sparsity`` and SVD ``rank``; resumable from ``out/study.db``). ``out`` receives
``checkpoint/`` (``squeezer.load`` reads it) and ``search.json`` (every trial); each file is
written atomically.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..cache import CacheDir
from ..calibration import Batch, call_model
from ..errors import ConfigError
from ..io.atomic import atomic_write
from ..io.checkpoint import save
from ..kernels import pack
from ..report.json import dumps
from .allocate import Budget
from .formats import DEFAULT_FORMATS
from .joint import SearchSpace, pareto_search
from .latency import first_row, median_ms
from .sensitivity import Sensitivity, measure_sensitivity
from .tune import Trial, check_tolerance, tune

STRATEGIES = ("tune", "pareto")


@dataclass
class SearchRun:
    """What a search produced: the chosen model (simulate mode), its before / after ``summary``
    (bytes, batch-1 latency, metric), the sensitivities, the trials as Pareto points, the ``config``
    (strategy, budget, formats, chosen format per layer, ...) and the caller's ``extra``."""

    model: nn.Module
    summary: dict[str, Any]
    sensitivity: Sensitivity
    pareto: dict[str, Any]
    config: dict[str, Any]
    extra: dict[str, Any]


def pareto_flags(points: list[tuple[float, float]], higher_is_better: bool = True) -> list[bool]:
    """``True`` for the points ``(size, metric)`` no other point dominates (size no larger and metric
    no worse, one of them strictly)."""
    sign = 1.0 if higher_is_better else -1.0
    flags = []
    for i, (s, m) in enumerate(points):
        dominated = any(s2 <= s and sign * m2 >= sign * m and (s2 < s or sign * m2 > sign * m)
                        for j, (s2, m2) in enumerate(points) if j != i)
        flags.append(not dominated)
    return flags


def _trial_points(trials: list[Trial], chosen: dict[str, str], higher_is_better: bool) -> dict[str, Any]:
    flags = pareto_flags([(t.bytes, t.metric) for t in trials], higher_is_better)
    return {"x": "bytes", "y": "metric", "trials": [
        {"x": t.bytes, "y": t.metric, "front": f, "chosen": t.choice == chosen and t.met,
         "params": {"step": t.step, **_counts(t.choice)}} for t, f in zip(trials, flags)]}


def _counts(choice: dict[str, str]) -> dict[str, int]:
    return {f: list(choice.values()).count(f) for f in dict.fromkeys(choice.values())}


def batch1_latency_ms(model: nn.Module, batch: Batch, packed: bool, repeats: int = 100) -> float:
    """Median batch-1 latency; ``packed``: of a copy packed on the real kernels."""
    if packed:
        model = pack(model)
    example = first_row(batch)
    return median_ms(lambda: call_model(model, example), repeats)


def run_search(
    model: nn.Module,
    calib: list[Batch],
    evaluate: Callable[[nn.Module], float],
    out: str | Path,
    *,
    max_drop: float,
    budget: Budget | dict[str, float] | float | None = None,
    strategy: str = "tune",
    trials: int = 30,
    formats: tuple[str, ...] | list[str] = DEFAULT_FORMATS,
    algorithm: str = "rtn",
    relative: bool = False,
    higher_is_better: bool = True,
    resume: bool = False,
    seed: int = 0,
    sparsity: tuple[float, ...] = (0.0,),
    rank: tuple[float | None, ...] = (None,),
    cache_dir: CacheDir = True,
    progress: bool = True,
    on_trial: Callable[[Any], None] | None = None,
    extra: dict[str, Any] | None = None,
) -> SearchRun:
    """Run one search and write ``out`` (see module docstring)."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"unknown search strategy {strategy!r}; valid: {', '.join(STRATEGIES)}")
    check_tolerance(max_drop)
    if resume and strategy != "pareto":
        raise ConfigError("resume continues an Optuna study: it needs strategy 'pareto'")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sens: Sensitivity = measure_sensitivity(model, calib, formats, algorithm=algorithm, cache_dir=cache_dir,
                                            progress=progress)
    if strategy == "tune":
        result = tune(model, calib, evaluate, max_drop, budget=budget, relative=relative,
                      higher_is_better=higher_is_better, sens=sens, formats=formats, algorithm=algorithm,
                      max_trials=trials, progress=progress, on_trial=on_trial)
        chosen, choice, metric, baseline, met = result.model, result.choice, result.metric, result.baseline, result.met
        trial_log = [t.__dict__ for t in result.trials]
        pareto = _trial_points(result.trials, choice, higher_is_better)
    else:
        bits = (Budget.parse(budget).bits if budget is not None else None) or 8.0
        space = SearchSpace(bits=(min(2.0, bits), bits), formats=tuple(formats), algorithms=(algorithm,),
                            sparsity=tuple(sparsity), rank=tuple(rank))
        found = pareto_search(model, calib, evaluate, space=space, trials=trials, seed=seed, storage=out / "study.db",
                              resume=resume, max_drop=max_drop, higher_is_better=higher_is_better, cache_dir=cache_dir,
                              progress=progress)
        if found.chosen is None:
            raise ConfigError(f"no trial of the study met --max-drop {max_drop:g}: raise the budget or the trials")
        chosen = found.build(model, calib)
        choice, metric, baseline, met = found.chosen["choice"], found.chosen["metric"], found.baseline, True
        trial_log = found.to_dict()["trials"]
        pareto = found.pareto_data()
    config = {"strategy": strategy, "max_drop": max_drop, "relative": relative,
              "budget": None if budget is None else Budget.parse(budget).__dict__, "formats": list(formats),
              "algorithm": algorithm, "choice": choice, "met": met, "trials": len(trial_log)}
    checkpoint = save(chosen, out / "checkpoint", extra={"search": config, **(extra or {})})
    size = sum(f.stat().st_size for f in checkpoint.iterdir())
    before_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    summary = {
        "before": {"bytes": before_bytes, "latency_ms": batch1_latency_ms(model, calib[0], packed=False),
                   "metric": baseline},
        "after": {"bytes": size, "latency_ms": batch1_latency_ms(chosen, calib[0], packed=True), "metric": metric},
    }
    atomic_write(out / "search.json", dumps({"trials": trial_log, "choice": choice}))
    return SearchRun(chosen, summary, sens, pareto, config, extra or {})

"""The two rules every public transform of a model follows.

*Copy or in place*: every transform returns a new model and leaves its input untouched unless
``inplace=True``, in which case it changes the input and returns that same object
(:func:`working_copy`). The transforms: ``squeezer.quantize``, ``squeezer.compress``,
``squeezer.pack``, ``squeezer.search.auto_quantize``, ``squeezer.qat.prepare_qat`` /
``convert``, the ``squeezer.prune`` functions, ``squeezer.lowrank.low_rank``,
``squeezer.distill.distill``.

*Results as values*: a transform returns the model; what it measured (a ``QuantReport``, a
``PruneReport``, ...) goes with that model. Reports accumulate in order, so a model that went
through several transforms carries all of their figures: :func:`report_of` gives the latest
report, or the latest of a given type. :func:`attach_report` is the only writer.
"""

from __future__ import annotations

import copy
from typing import Any, TypeVar

from torch import nn

from .errors import ModelError

M = TypeVar("M", bound=nn.Module)
R = TypeVar("R")

_REPORTS = "squeezer_reports"


def working_copy(model: M, inplace: bool) -> M:
    """The model a transform changes: ``model`` itself when ``inplace``, else a deep copy."""
    return model if inplace else copy.deepcopy(model)


def attach_report(model: M, report: Any) -> M:
    """Append ``report`` to the reports ``model`` carries; returns ``model``."""
    reports = model.__dict__.setdefault(_REPORTS, [])
    reports.append(report)
    return model


def report_of(model: nn.Module, kind: type[R] | None = None) -> R:
    """The latest report attached to ``model`` (of type ``kind`` when given); ModelError if none."""
    reports = [r for r in model.__dict__.get(_REPORTS, []) if kind is None or isinstance(r, kind)]
    if not reports:
        what = "report" if kind is None else kind.__name__
        raise ModelError(f"model {type(model).__name__} carries no {what}: it did not come from a squeezer transform "
                         "that makes one")
    return reports[-1]

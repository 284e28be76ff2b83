"""The data of the HTML report (:mod:`squeezer.html_report`) for ``quantize`` and ``compress`` runs,
the robustness section, and the task metrics the CLI names (``--robust-metric``).

Metrics take the concatenated model outputs ``o`` and targets ``y``:
``accuracy``: ``mean(argmax o == y)``, or ``mean(1[o > 0] == y)`` for one logit per sample;
``roc_auc``: the Mann-Whitney ROC-AUC of one score per sample (``o[:, 1]`` for two-class logits).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from .errors import ConfigError


def accuracy(outputs: Tensor, targets: Tensor) -> float:
    o = outputs.squeeze(-1) if outputs.dim() > 1 and outputs.shape[-1] == 1 else outputs
    predicted = o.argmax(-1) if o.dim() > 1 else (o > 0).long()
    return float((predicted == targets.reshape(predicted.shape).long()).float().mean())


def roc_auc(outputs: Tensor, targets: Tensor) -> float:
    from .examples.credit import roc_auc as auc

    o = outputs.squeeze(-1) if outputs.dim() > 1 and outputs.shape[-1] == 1 else outputs
    if o.dim() > 1:
        if o.shape[-1] != 2:
            raise ConfigError(f"roc_auc needs one score or two-class logits per sample, got outputs {tuple(o.shape)}")
        o = o[:, 1] - o[:, 0]
    return auc(o, targets)


METRICS: dict[str, Callable[[Tensor, Tensor], float]] = {"accuracy": accuracy, "roc_auc": roc_auc}


def task_metric(name: str) -> Callable[[Tensor, Tensor], float]:
    if name not in METRICS:
        raise ConfigError(f"unknown metric {name!r}; valid: {', '.join(METRICS)}")
    return METRICS[name]


def compression_data(report: dict[str, Any], title: str) -> dict[str, Any]:
    """Report data of a ``compress`` run: before = the baseline row, after = the last row, and every
    step's row as the table."""
    rows = report["rows"]
    pick = ("params", "nonzero_params", "bytes", "metric")
    return {"title": title, "summary": {"before": {k: rows[0][k] for k in pick}, "after": {k: rows[-1][k] for k in pick}},
            "layers": rows}


def add_robustness(data: dict[str, Any], models: dict[str, nn.Module], batches: list[tuple[Tensor, Tensor]],
                   metric: str, feature_names: list[str] | None = None) -> dict[str, Any]:
    """``data`` with a ``robustness`` section measured on ``(x, y)`` batches."""
    from .robustness import robustness

    data["robustness"] = robustness(models, batches, task_metric(metric), feature_names=feature_names)
    return data

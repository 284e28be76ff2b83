"""Task metrics of a model's outputs against targets: accuracy and ROC-AUC (``METRICS`` by name)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.stats import rankdata
from torch import Tensor

from .errors import ConfigError


def roc_auc(scores: Tensor | np.ndarray, labels: Tensor | np.ndarray) -> float:
    """ROC-AUC via the Mann-Whitney U statistic.

    With ``r_i`` the rank of ``scores[i]`` among all scores (ties get their average rank),
    ``n1`` positives and ``n0`` negatives: ``AUC = (sum_{i: y_i = 1} r_i - n1 (n1 + 1) / 2) / (n1 n0)``,
    i.e. ``P(s_pos > s_neg) + P(s_pos = s_neg) / 2``. Raises ``ValueError`` unless both classes occur.
    """
    s, y = (v.detach().cpu().numpy() if isinstance(v, Tensor) else np.asarray(v) for v in (scores, labels))
    s = s.astype(np.float64).reshape(-1)
    y = y.reshape(-1) > 0.5
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in length: {s.size} vs {y.size}")
    n1 = int(y.sum())
    n0 = y.size - n1
    if n1 == 0 or n0 == 0:
        raise ValueError("roc_auc needs both positive and negative labels")
    ranks = rankdata(s)
    return float((ranks[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def accuracy(outputs: Tensor, targets: Tensor) -> float:
    """Fraction of samples whose prediction equals the target: ``argmax`` of class logits ``(n, k)``,
    ``1[o > 0]`` of one logit per sample ``(n,)`` / ``(n, 1)``."""
    o = outputs.squeeze(-1) if outputs.dim() > 1 and outputs.shape[-1] == 1 else outputs
    predicted = o.argmax(-1) if o.dim() > 1 else (o > 0).long()
    return float((predicted == targets.reshape(predicted.shape).long()).float().mean())


def score_auc(outputs: Tensor, targets: Tensor) -> float:
    """:func:`roc_auc` of one score per sample: the logit ``(n,)`` / ``(n, 1)``, or ``o[:, 1] - o[:, 0]`` of
    two-class logits ``(n, 2)``."""
    o = outputs.squeeze(-1) if outputs.dim() > 1 and outputs.shape[-1] == 1 else outputs
    if o.dim() > 1:
        if o.shape[-1] != 2:
            raise ConfigError(f"roc_auc needs one score or two-class logits per sample, got outputs {tuple(o.shape)}")
        o = o[:, 1] - o[:, 0]
    return roc_auc(o, targets)


METRICS: dict[str, Callable[[Tensor, Tensor], float]] = {"accuracy": accuracy, "roc_auc": score_auc}




def task_metric(name: str) -> Callable[[Tensor, Tensor], float]:
    """The metric called ``name`` (a key of :data:`METRICS`), or :class:`ConfigError` listing them."""
    if name not in METRICS:
        raise ConfigError(f"unknown metric {name!r}; valid: {', '.join(METRICS)}")
    return METRICS[name]

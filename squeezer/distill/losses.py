"""Knowledge-distillation loss (Hinton et al., "Distilling the Knowledge in a Neural Network", 2015).

Multi-class logits (last axis = ``C >= 2`` classes; leading axes are samples / tokens):

    ``L_KD = T^2 * mean_samples KL(softmax(t / T) || softmax(s / T))``

Single-logit binary models (logits ``(B,)`` or ``(..., 1)``), with ``p = sigmoid(t / T)`` and
``q = sigmoid(s / T)``, the Bernoulli KL:

    ``L_KD = T^2 * mean_samples [p log(p / q) + (1 - p) log((1 - p) / (1 - q))]``

The ``T^2`` factor keeps the gradient magnitude independent of the temperature. Teacher logits
are detached: gradients flow to the student only. ``L_KD = 0`` exactly when ``s == t``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError, DataError


def is_single_logit(logits: Tensor) -> bool:
    """True for one logit per sample: shape ``(B,)`` or ``(..., 1)``."""
    return logits.dim() == 1 or logits.shape[-1] == 1


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0) -> Tensor:
    """``T^2`` times the mean KL divergence from the teacher's to the student's tempered
    distribution (module docstring); a scalar tensor."""
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not (
        math.isfinite(temperature) and temperature > 0
    ):
        raise ConfigError(f"temperature must be a finite number > 0, got {temperature!r}")
    if student_logits.shape != teacher_logits.shape:
        raise DataError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                        f"{tuple(teacher_logits.shape)} differ in shape")
    s = student_logits.float() / temperature
    t = teacher_logits.detach().float() / temperature
    if is_single_logit(s):
        p = torch.sigmoid(t)
        kl = p * (F.logsigmoid(t) - F.logsigmoid(s)) + (1 - p) * (F.logsigmoid(-t) - F.logsigmoid(-s))
        return temperature**2 * kl.mean()
    log_q = F.log_softmax(s, dim=-1).reshape(-1, s.shape[-1])
    log_p = F.log_softmax(t, dim=-1).reshape(-1, s.shape[-1])
    return temperature**2 * F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)

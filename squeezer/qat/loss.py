"""The QAT objective: task loss plus a weight quantization-error penalty.

``E_quant = sum_weights mean((W - fq(W))^2)`` over the weights of the model's (unpacked) quantized layers
(one per layer; each matrix of a recurrent layer on its own), and

    ``L = L_task + lam * E_quant``.

Gradients: ``fq(W)`` is taken as a constant in ``W`` (rounding has zero derivative almost
everywhere), so ``dE/dW = 2 (W - fq(W)) / numel`` pulls each weight towards its grid point;
learned step sizes get the LSQ gradient of ``fq`` (which, through the straight-through
rounding, shrinks steps that only add rounding error and widens ranges that clip).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..errors import ConfigError, ModelError
from ..modules import quant_layers
from .weights import grid_targets


class QATLoss(NamedTuple):
    """``loss = task + lam * quant``; ``task`` and ``quant`` are returned for logging."""

    loss: Tensor
    task: Tensor
    quant: Tensor


def quant_error(model: nn.Module) -> Tensor:
    """``E_quant``: the sum over quantized weights of ``mean((W - fq(W))^2)`` (module docstring)."""
    layers = quant_layers(model)
    if not layers:
        raise ModelError("quant_error: model has no quantized layers (use squeezer.qat.prepare_qat)")
    total: Tensor | None = None
    for name, layer in layers.items():
        if layer.is_packed:
            raise ModelError(f"quant_error: layer {name!r} is packed, its float weight is gone")
        for w, target in grid_targets(layer).values():
            err = torch.mean((w.float() - target.float()) ** 2)
            total = err if total is None else total + err
    return total


def qat_loss(task_loss: Tensor, model: nn.Module, lam: float) -> QATLoss:
    """``L_task + lam * E_quant`` with both terms (``lam = 0``: ``E_quant`` is computed without
    a graph, for logging only)."""
    if not isinstance(lam, (int, float)) or isinstance(lam, bool) or not math.isfinite(lam) or lam < 0:
        raise ConfigError(f"lam must be a finite number >= 0, got {lam!r}")
    if lam == 0:
        with torch.no_grad():
            quant = quant_error(model)
        return QATLoss(task_loss, task_loss, quant)
    quant = quant_error(model)
    return QATLoss(task_loss + lam * quant, task_loss, quant)

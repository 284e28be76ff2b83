"""AWQ: activation-aware weight quantization (Lin et al., "AWQ: Activation-aware Weight
Quantization for LLM Compression and Acceleration", MLSys 2024).

A few input channels carry much larger activations than the rest; the rounding error of their
weight columns dominates the output error. AWQ scales those columns up before rounding,
``W' = W diag(s)``, and the input down, ``x' = x / s`` (``layer.input_scale = 1 / s``), which leaves
the float function unchanged while giving the salient columns a finer relative grid. With the mean
input magnitude ``m_j = mean |x_j|`` over the calibration rows,

    s(alpha) = m^alpha / sqrt(max(m^alpha) * min(m^alpha))     (the reference normalisation)

and ``alpha`` is chosen on ``linspace(0, 1, grid)`` to minimise the layer's output error

    e(alpha) = ||X W^T - (X / s) Q(W diag(s))^T||^2 = n/2 * tr(dW H dW^T),  dW = W - Q(W diag(s)) diag(1/s)

**measured with the Hessian** ``H = 2 X^T X / n`` of all calibration rows (exact, not only on the
sampled rows, and costs one ``(N, K) x (K, K)`` product per grid point, independent of the number
of rows). ``alpha = 0`` is ``s = 1`` (plain round-to-nearest), so the search never ends worse than
RTN on this objective. Then (``clip=True``) each block's range is shrunk by
:func:`~squeezer.algorithms.clip_search.best_clip_qparams` on the scaled weight with the Hessian of
the scaled input, ``H_s = diag(1/s) H diag(1/s)``.

The statistics are those of the layer's input *after* any ``input_scale`` already set (the
pipeline's hooks call ``layer.smooth``), so a previous factor composes: ``input_scale <- old / s``.
Linear layers with a uniform weight mapping, and the matrices of recurrent layers
(:class:`~squeezer.algorithms.matrices.MatrixView`): there the recurrence feeds the matrix itself and no
``x / s`` can be inserted, so ``s = 1`` and only the clipping step runs. The others keep round-to-nearest.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ConfigError
from ..modules.base import QuantMixin
from ..modules.layers import QuantLinear
from ..quant.core import QParams, compute_qparams, fake_quantize
from ..quant.spec import QuantSpec
from .base import Algorithm, register
from .clip_search import best_clip_qparams
from .matrices import MatrixView
from .stats import LayerStats

_FLOOR = 1e-5  # smallest channel statistic, relative to the largest (dead channels)


def awq_scales(mean_abs: Tensor, alpha: float) -> Tensor:
    """``s = m^alpha`` normalised by ``sqrt(max * min)``; ``m`` floored at ``1e-5 max(m)``."""
    m = mean_abs.float()
    top = float(m.max()) if m.numel() else 0.0
    if not top > 0:
        return torch.ones_like(m)
    s = m.clamp_min(top * _FLOOR).pow(alpha)
    return s / (s.max() * s.min()).sqrt()


def hessian_error(weight: Tensor, w_hat: Tensor, hessian: Tensor) -> float:
    """``tr(dW H dW^T)`` with ``dW = weight - w_hat``: the output error on the calibration rows (x ``2 / n``)."""
    dw = (weight - w_hat).to(hessian.dtype)
    return float(((dw @ hessian) * dw).sum())


def scaled_error(weight: Tensor, s: Tensor, spec: QuantSpec, hessian: Tensor) -> float:
    """``e`` of the module docstring for scales ``s`` (round-to-nearest of ``W diag(s)``)."""
    ws = weight * s
    w_hat = fake_quantize(ws, spec, compute_qparams(ws, spec)) / s
    return hessian_error(weight, w_hat, hessian)


def has_data(stats: LayerStats | None) -> bool:
    return stats is not None and stats.count > 0


@register
@dataclass
class AWQ(Algorithm):
    """Activation-aware per-input-channel scaling (see module docstring).

    Options: ``grid`` (number of ``alpha`` values in ``[0, 1]``), ``clip`` (range search after scaling).
    """

    name = "awq"
    grid: int = 20
    clip: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.grid, int) or isinstance(self.grid, bool) or self.grid < 1:
            raise ConfigError(f"awq: grid must be a positive integer, got {self.grid!r}")
        if not isinstance(self.clip, bool):
            raise ConfigError(f"awq: clip must be true or false, got {self.clip!r}")

    def applies_to(self, layer: QuantMixin) -> bool:
        return isinstance(layer, (QuantLinear, MatrixView)) and layer.weight_spec.mapping == "uniform"

    def alphas(self) -> list[float]:
        return torch.linspace(0.0, 1.0, self.grid).tolist() if self.grid > 1 else [0.0]

    def search(self, weight: Tensor, mean_abs: Tensor, hessian: Tensor, spec: QuantSpec,
               alphas: list[float] | None = None) -> tuple[float, Tensor, list[float]]:
        """Best ``(alpha, s)`` on the grid (or on ``alphas``), and the error of every grid point."""
        errors: list[float] = []
        best: tuple[float, Tensor] | None = None
        best_err = float("inf")
        for alpha in self.alphas() if alphas is None else alphas:
            s = awq_scales(mean_abs, alpha)
            err = scaled_error(weight, s, spec, hessian)
            errors.append(err)
            if best is None or err < best_err:
                best, best_err = (alpha, s), err
        return best[0], best[1], errors

    def quantize_layer(self, layer: QuantMixin, stats: LayerStats | None) -> None:
        if not has_data(stats):  # the calibration data never reached the layer: keep round-to-nearest
            layer.calibrate_weight()
            return
        spec = layer.weight_spec
        w = layer.weight.detach().float()
        device = w.device
        hessian = stats.hessian().to(device=device, dtype=torch.float32)
        mean_abs = stats.mean_abs().to(device)
        alpha, s, _ = self.search(w, mean_abs, hessian, spec, [0.0] if isinstance(layer, MatrixView) else None)
        self.last_alpha = alpha
        ws = w * s
        if self.clip:
            inv = (1.0 / s).double()
            h_s = stats.hessian().to(device) * inv[:, None] * inv[None, :]
            qparams: QParams = best_clip_qparams(ws, spec, h_s)
        else:
            qparams = compute_qparams(ws, spec)
        if alpha != 0.0:
            inv = (1.0 / s).to(layer.weight.dtype)
            old = layer.input_scale
            layer.input_scale = inv if old is None else old * inv
        layer.set_quantized(ws, qparams)

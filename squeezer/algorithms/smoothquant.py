"""SmoothQuant (Xiao et al., "SmoothQuant: Accurate and Efficient Post-Training Quantization for
Large Language Models", ICML 2023).

Activations of a few input channels are far larger than the rest, which ruins 8-bit activation
quantization (per token or per tensor). SmoothQuant migrates part of that range into the weight
with a per-input-channel factor, ``W' = W diag(s)``, ``x' = x / s`` (``layer.input_scale = 1 / s``,
applied by ``layer.smooth`` in every mode, packed runtime and ONNX export), so the float function
is unchanged:

    s_j = max|X_j|^alpha / max|W_:,j|^(1 - alpha)

(``max|X_j|`` over all calibration rows; channels whose input or weight column is all zero keep
``s_j = 1``; ``s`` is clamped to ``>= 1e-5``). ``alpha`` is chosen per layer (the default,
``alpha=None``) on ``linspace(0, 1, grid)`` -- plus the identity ``s = 1``, so that smoothing never
makes a layer worse -- to minimise the layer's output error with both quantizers on the sampled
calibration rows ``X``, or given (the paper's ``0.5``):

    e = ||X W^T - fq_a(X / s) fq_w(W diag(s))^T||^2

where ``fq_a`` is the layer's activation spec: dynamic (parameters per call, e.g. per token) or,
for static activations, a min-max range of the smoothed sample; ``fq_w`` is round-to-nearest.
The weight's parameters are round-to-nearest of the smoothed weight. Static activation ranges are
observed later by the pipeline on the smoothed inputs (``smooth`` runs before the observer).

The statistics are those of the input after any ``input_scale`` already set, so a previous factor
composes: ``input_scale <- old / s``. Linear layers with activation quantization only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ConfigError
from ..modules.base import QuantMixin
from ..modules.layers import QuantLinear
from ..quant.core import compute_qparams, fake_quantize
from .awq import has_data
from .base import Algorithm, register
from .stats import SAMPLE_ROWS, LayerStats

_MIN_SCALE = 1e-5


def smooth_scales(act_max: Tensor, weight: Tensor, alpha: float) -> Tensor:
    """``s_j = max|X_j|^alpha / max|W_:,j|^(1-alpha)``; 1 where either maximum is 0; ``>= 1e-5``."""
    a = act_max.float()
    w = weight.detach().float().abs().amax(dim=0)
    dead = (a <= 0) | (w <= 0) | ~torch.isfinite(a)
    s = a.clamp_min(_MIN_SCALE).pow(alpha) / w.clamp_min(_MIN_SCALE).pow(1.0 - alpha)
    return torch.where(dead, torch.ones_like(s), s.clamp_min(_MIN_SCALE))


def layer_output_error(layer: QuantMixin, rows: Tensor, weight: Tensor, s: Tensor | None,
                       reference: Tensor | None = None) -> float:
    """``||X W^T - fq_a(X / s) fq_w(W diag(s))^T||^2`` on ``rows`` (``s = None``: no smoothing);
    ``reference``: ``X W^T`` when already computed."""
    if reference is None:
        reference = rows @ weight.T
    x = rows if s is None else rows / s
    ws = weight if s is None else weight * s
    spec = layer.act_spec
    if layer.scheme.activation_mode == "dynamic":
        xq = fake_quantize(x, spec)
    else:
        xq = fake_quantize(x, spec, compute_qparams(x, spec))
    wq = fake_quantize(ws, layer.weight_spec, compute_qparams(ws, layer.weight_spec))
    return float(((reference - xq @ wq.T) ** 2).sum())


@register
@dataclass
class SmoothQuant(Algorithm):
    """Migrate activation outliers into the weight (see module docstring).

    Options: ``alpha`` (migration strength in ``[0, 1]``, or ``None``, the default: searched per layer),
    ``grid`` (search points).
    """

    name = "smoothquant"
    sample_rows = SAMPLE_ROWS  # searches on the sampled rows
    alpha: float | None = None
    grid: int = 20

    def __post_init__(self) -> None:
        if self.alpha is not None and (isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float))
                                       or not 0.0 <= self.alpha <= 1.0):
            raise ConfigError(f"smoothquant: alpha must be in [0, 1] or null (search), got {self.alpha!r}")
        if not isinstance(self.grid, int) or isinstance(self.grid, bool) or self.grid < 1:
            raise ConfigError(f"smoothquant: grid must be a positive integer, got {self.grid!r}")

    def applies_to(self, layer: QuantMixin) -> bool:
        return isinstance(layer, QuantLinear) and layer.act_spec is not None

    def alphas(self) -> list[float]:
        return torch.linspace(0.0, 1.0, self.grid).tolist() if self.grid > 1 else [0.5]

    def search(self, layer: QuantMixin, rows: Tensor, weight: Tensor, act_max: Tensor) -> tuple[float | None, Tensor | None, dict]:
        """Best ``(alpha, s)`` (``(None, None)``: the identity won) and the error of each candidate."""
        reference = rows @ weight.T
        errors: dict = {None: layer_output_error(layer, rows, weight, None, reference)}
        best: tuple[float | None, Tensor | None] = (None, None)
        best_err = errors[None]
        for alpha in self.alphas():
            s = smooth_scales(act_max, weight, alpha)
            err = layer_output_error(layer, rows, weight, s, reference)
            errors[alpha] = err
            if err < best_err:
                best, best_err = (alpha, s), err
        return best[0], best[1], errors

    def quantize_layer(self, layer: QuantMixin, stats: LayerStats | None) -> None:
        if not has_data(stats):  # the calibration data never reached the layer: keep round-to-nearest
            layer.calibrate_weight()
            return
        w = layer.weight.detach().float()
        act_max = stats.abs_max.to(w.device)
        rows = stats.sample.to(w.device)
        if self.alpha is None:
            alpha, s, _ = self.search(layer, rows, w, act_max)
        else:
            alpha, s = float(self.alpha), smooth_scales(act_max, w, float(self.alpha))
        self.last_alpha = alpha
        if s is None:
            layer.set_quantized(w, compute_qparams(w, layer.weight_spec))
            return
        ws = w * s
        inv = (1.0 / s).to(layer.weight.dtype)
        old = layer.input_scale
        layer.input_scale = inv if old is None else old * inv
        layer.set_quantized(ws, compute_qparams(ws, layer.weight_spec))

"""Empirical bias correction (Nagel et al., "Data-Free Quantization Through Weight Equalization and
Bias Correction", ICCV 2019, section 4.2; the empirical variant with calibration data).

Rounding the weights shifts the expected output: with ``dW = W_hat - W`` (round-to-nearest) and an
input row ``x``, ``E[y_hat - y] = dW E[x]``. Folding that into the bias,

    b <- b - dW E[x],        E[x] = stats.mean()  (the mean input row, in the weight's column space)

makes the mean output shift zero on the calibration data (exactly, up to float rounding: the
correction is computed in float64). For a convolution the columns are im2col patches and
``E[x]`` is the mean patch over every output position, padding zeros included, so ``dW E[x]`` is
exactly the mean shift of each output channel over all positions (zero padding is accounted for
as it happens; the shift of a single border position still differs from the mean, which one bias
per channel cannot correct). With ``padding_mode`` other than ``zeros`` the statistics see zero
padding, so the correction is approximate there.

A layer without bias gets one (a new ``bias`` Parameter) when ``add_bias=True`` (default);
otherwise it keeps plain round-to-nearest. The weights are round-to-nearest (any mapping: the
correction needs only ``W_hat``); the float weight is kept, so ``quantize(weight)`` reproduces the
RTN codes. Grouped convolutions (``groups > 1``) keep round-to-nearest: the layer statistics hold
the first group's patches only, and the other groups' means are unknown. Only the weights' error
is corrected: with quantized activations the input's rounding noise is not part of ``dW E[x]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..modules.base import QuantMixin
from ..modules.layers import QuantEmbedding
from .base import Algorithm, register
from .matrices import MatrixView
from .stats import LayerStats


@register
@dataclass
class BiasCorrection(Algorithm):
    """RTN weights plus ``b <- b - (W_hat - W) E[x]`` (see module docstring). Option: ``add_bias``."""

    name = "bias_correction"
    add_bias: bool = True

    def applies_to(self, layer: QuantMixin) -> bool:
        if isinstance(layer, MatrixView):  # a recurrent matrix corrects its own bias; it cannot get a new one
            return layer.bias is not None
        return not isinstance(layer, QuantEmbedding) and getattr(layer, "groups", 1) == 1

    def quantize_layer(self, layer: QuantMixin, stats: LayerStats | None) -> None:
        layer.calibrate_weight()
        if stats is None or stats.count == 0 or (layer.bias is None and not self.add_bias):
            return
        w = layer.weight.detach()
        dw = (layer.quantized_weight().detach().double() - w.double()).reshape(w.shape[0], -1)
        mean = (stats.sum / max(stats.count, 1)).to(dw.device)  # float64 (stats.mean() is float32)
        shift = dw @ mean
        with torch.no_grad():
            if layer.bias is None:
                layer.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device))
            layer.bias.copy_((layer.bias.double() - shift.to(layer.bias.device)).to(layer.bias.dtype))

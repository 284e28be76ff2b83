"""Output-mean bias correction of convolutions, measured on the layer's own function.

Rounding a convolution's weight (and, with static activations, its input) shifts the mean of each output
channel. With ``x`` the layer's input in the float model and ``op`` the layer's function (its own ``forward``
for a subclass that pads first, grouped and depthwise convolutions included),

    delta_c = E_{n, positions}[ op(fq_a(x), W_hat)_c - op(x, W)_c ],        b_c <- b_c - delta_c

makes the mean output of every channel equal the float model's on the calibration data. For a layer linear in
``W`` this is Nagel et al.'s empirical bias correction (``dW E[x]``, ICCV 2019, section 4.2) with the padding
zeros and every group counted as they happen, plus the mean of the input-rounding error. It matters most
before a batch norm with a large gain ``gamma / sqrt(var + eps)`` on a channel whose output varies little
around a large mean: the norm removes the mean, not the rounding shift, and multiplies the shift by the gain.
A layer without bias gets one (zeros, then corrected).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..calibration import Batch, call_model
from ..modules import set_mode
from ..modules.base import QuantMixin


def output_shift(layer: QuantMixin, x: Tensor) -> tuple[Tensor, int]:
    """``delta`` summed over one batch: ``(sum_{n, positions}(op(fq_a(x), W_hat) - op(x, W)), n * positions)``,
    the sum of shape ``(out_channels,)`` in float64; ``x`` is the layer's raw input (smoothed here, as in
    ``forward``)."""
    x = layer.smooth(x)
    diff = (layer._op(layer.quantize_input(x), layer.quantized_weight()) - layer._op(x, layer.weight)).double()
    rows = diff.transpose(0, 1).reshape(diff.shape[1], -1)
    return rows.sum(1), rows.shape[1]


def correct_output_shift(model: nn.Module, layers: dict[str, QuantMixin], batches: list[Batch]) -> list[str]:
    """Correct the bias of each convolution of ``layers`` (see module docstring) from one float pass of
    ``batches`` through ``model``; every shift is measured before any bias changes. Returns the corrected
    layers' names. Leaves the layers in ``simulate`` mode."""
    convs = {name: layer for name, layer in layers.items() if isinstance(layer, nn.modules.conv._ConvNd)
             and not isinstance(layer, nn.modules.conv._ConvTransposeNd)}
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name: str):
        def record(layer: QuantMixin, args: tuple, _: object) -> None:
            total, rows = output_shift(layer, args[0].detach())
            sums[name] = sums.get(name, 0) + total
            counts[name] = counts.get(name, 0) + rows
        return record

    set_mode(model, "float")
    handles = [layer.register_forward_hook(hook(name)) for name, layer in convs.items()]
    try:
        with torch.no_grad():
            for batch in batches:
                call_model(model, batch)
    finally:
        for h in handles:
            h.remove()
        set_mode(model, "simulate")
    with torch.no_grad():
        for name in sums:
            layer = convs[name]
            if layer.bias is None:
                layer.bias = nn.Parameter(torch.zeros(layer.out_channels, dtype=layer.weight.dtype,
                                                      device=layer.weight.device))
            delta = (sums[name] / counts[name]).to(layer.bias.dtype)
            layer.bias.copy_(layer.bias - delta)
    return list(sums)

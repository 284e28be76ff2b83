"""Quantized layers and the model surgery that installs them."""

from .base import QuantMixin
from .layers import QuantConv1d, QuantConv2d, QuantEmbedding, QuantLinear
from .swap import SkippedLayer, quant_layers, set_mode, swap_layers

__all__ = [
    "QuantMixin", "QuantLinear", "QuantConv1d", "QuantConv2d", "QuantEmbedding",
    "SkippedLayer", "quant_layers", "set_mode", "swap_layers",
]

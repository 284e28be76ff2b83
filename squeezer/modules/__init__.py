"""Quantized layers and the model surgery that installs them."""

from .attention import UnfusedEncoderLayer, UnfusedMultiheadAttention, unfuse
from .base import QuantMixin
from .layers import (
    LayerType,
    QuantConv1d,
    QuantConv2d,
    QuantEmbedding,
    QuantLinear,
    layer_type_names,
    register_layer_type,
    unregister_layer_type,
)
from .recurrent import QuantGRU, QuantLSTM, QuantRecurrent, QuantRNN
from .swap import SkippedLayer, quant_layers, set_mode, swap_layers

__all__ = [
    "QuantMixin", "QuantLinear", "QuantConv1d", "QuantConv2d", "QuantEmbedding",
    "SkippedLayer", "quant_layers", "set_mode", "swap_layers",
    "LayerType", "layer_type_names", "register_layer_type", "unregister_layer_type",
    "QuantRecurrent", "QuantLSTM", "QuantGRU", "QuantRNN",
    "UnfusedMultiheadAttention", "UnfusedEncoderLayer", "unfuse",
]

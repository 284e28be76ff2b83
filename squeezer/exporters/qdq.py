"""The *QDQ form* shared by the ``torch.export``-based formats (TFLite, ExecuTorch): each quantized layer
becomes a :class:`QdqLayer` calling PyTorch's ``quantized_decomposed`` ops (the PT2E
representation that litert-torch and ExecuTorch lower to int8 kernels) with squeezer's numbers:

* weights: int8 codes ``q``, zero point 0, squeezer's scale ``S`` per output channel (axis 0) or
  per tensor, ``W^ = q * S``: uniform symmetric signed codes of <= 8 bits as they are (int3 / int4
  codes take a byte each), a codebook whose levels are integers in [-127, 127] (ternary, binary,
  2-bit log2) as ``levels[code]``; nothing else has an int8 form (see ``unsupported``);
* static activations: ``dequantize(quantize(x, S_a, Z_a))`` per tensor on squeezer's grid;
  unsigned codes (``Z_a`` in 0..255) are stored as int8 with ``Z_a - 128`` (the same real values)
  and clamped to [-128, 127];
* ``input_scale`` (SmoothQuant / AWQ) as ``x * s`` in float in front of the quantizer, after a Hadamard input
  rotation (``input_rotation``) as a fast Walsh-Hadamard transform in float (additions, no product with ``H_b``);
* dynamic activations: the format's own (see its module), with a warning where it differs.

``unsupported="error"`` (default) raises :class:`ConfigError` naming a layer whose weights have no
int8 form; ``"float"`` stores that layer's dequantized weights ``W^`` in float32 (the same outputs,
a bigger file) and records a warning.
"""

from __future__ import annotations

import copy
import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..modules import QuantConv1d, QuantConv2d, QuantEmbedding, QuantLinear, quant_layers
from ..modules.layers import OwnForward, OwnFunction, QuantConv3d, QuantConvTranspose
from ..modules.base import QuantMixin
from ..modules.swap import ensure_deployable
from ..quant.formats import INT8_WEIGHTS, STATIC_INT8, activation_format, unsupported_format, weight_format
from ..quant.core import QTensor
from ..quant.levels import lookup
from ..quant.rotation import rotate_butterfly
from ..quant.spec import PerChannel
from .base import ExportReport

Unsupported = Literal["error", "float"]


def deployable_layers(model: nn.Module, action: str) -> dict[str, QuantMixin]:
    """The quantized layers of ``model`` (none for a float or pruned model); QAT-prepared models are refused."""
    return ensure_deployable(model, action) if quant_layers(model) else {}


def example_call(example_inputs: Any) -> tuple[tuple, dict[str, Tensor]]:
    """``example_inputs`` (a tensor, a tuple of positional inputs or a keyword dict) as ``(args, kwargs)``."""
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    return (example_inputs,), {}


@functools.cache
def qd() -> Any:
    """``torch.ops.quantized_decomposed`` (registered by importing its module)."""
    importlib.import_module("torch.ao.quantization.fx._decomposed")
    return torch.ops.quantized_decomposed


@dataclass
class Int8Weight:
    """A weight as int8 codes (the layer's weight shape) and float32 scales ((N,) per channel or () per tensor)."""

    codes: Tensor
    scale: Tensor
    label: str


def int8_codes(qt: QTensor) -> Int8Weight | None:
    """Codes ``qt`` as int8 with zero point 0 (``levels[code]`` for an integer codebook), or None when their
    format, classified with its k-means levels, is not in :data:`INT8_WEIGHTS`."""
    levels = qt.qparams.levels
    if weight_format(qt.spec, levels) not in INT8_WEIGHTS:
        return None
    codes = qt.codes if levels is None else lookup(qt.codes.long(), levels.reshape(-1))
    scale = qt.qparams.scale.float().reshape((-1,) if isinstance(qt.spec.granularity, PerChannel) else ())
    return Int8Weight(codes.to(torch.int8), scale.contiguous(), f"int8 codes of {qt.spec.describe()}")


def int8_weight(layer: QuantMixin) -> Int8Weight | None:
    """:func:`int8_codes` of the layer's weight."""
    return int8_codes(layer.weight_qtensor())


def activation_mode(layer: QuantMixin) -> str:
    """``none`` / ``dynamic`` / ``static``: how the layer's input is quantized; an embedding's input is token
    ids, never quantized, whatever its scheme says."""
    return "none" if isinstance(layer, QuantEmbedding) else layer.scheme.activation_mode


def static_input_grid(layer: QuantMixin, name: str, backend: str) -> tuple[float, int]:
    """Squeezer's static input ``(scale, zero point)`` on the int8 code range; ``backend`` names the format
    that refuses activations outside :data:`STATIC_INT8`."""
    spec, qp = layer.act_spec, layer.act_qparams
    if qp is None:
        raise ConfigError(f"layer {name!r}: static activations are not calibrated")
    fmt = activation_format("static", spec)
    if fmt not in STATIC_INT8:
        raise unsupported_format(backend, name, fmt, STATIC_INT8, spec.describe())
    zero = 0 if qp.zero_point is None else int(qp.zero_point.reshape(-1)[0])
    return float(qp.scale.reshape(-1)[0]), zero - (0 if spec.signed else 128)


def fake_quant(x: Tensor, grid: tuple[float, int]) -> Tensor:
    """``dequantize(quantize(x))`` per tensor, int8 codes in [-128, 127]."""
    scale, zero = grid
    q = qd().quantize_per_tensor(x, scale, zero, -128, 127, torch.int8)
    return qd().dequantize_per_tensor(q, scale, zero, -128, 127, torch.int8)


def dequantize_codes(weight: Tensor, scale: Tensor, zero: Tensor, tensor_scale: float, fold: bool) -> Tensor:
    """``W^ = q * S`` by ``dequantize_per_channel`` (axis 0; ``scale (N,)``) or ``dequantize_per_tensor``
    (``tensor_scale``), codes in [-127, 127]; ``fold``: ``weight`` is the float ``W^`` itself, quantized
    first in the graph (the ``quantize -> dequantize`` pair a converter folds into an int8 constant)."""
    ops = qd()
    if scale.dim() == 1:
        if fold:
            weight = ops.quantize_per_channel(weight, scale, zero, 0, -127, 127, torch.int8)
        return ops.dequantize_per_channel(weight, scale, zero, 0, -127, 127, torch.int8)
    if fold:
        weight = ops.quantize_per_tensor(weight, tensor_scale, 0, -127, 127, torch.int8)
    return ops.dequantize_per_tensor(weight, tensor_scale, 0, -127, 127, torch.int8)


CONVS = {QuantConv1d: F.conv1d, QuantConv2d: F.conv2d, QuantConv3d: F.conv3d}
QDQ_LAYERS = (QuantLinear, QuantEmbedding, *CONVS, QuantConvTranspose)
"""The layer types with a QDQ form; any other quantized layer is refused by name (:func:`unsupported_layer`)."""


def unsupported_layer(backend: str, name: str, layer: QuantMixin, supported: tuple[type, ...]) -> ConfigError:
    """:func:`unsupported_format` for a layer type ``backend`` has no form of, whatever its format:
    ``layer 'bag': format int8-channel (in a QuantEmbeddingBag) is not supported by ONNX; supported: ...``."""
    return unsupported_format(backend, name, weight_format(layer.weight_spec), (f"{c.__name__} layers" for c in supported),
                              f"in a {type(layer).__name__}", hint=f"quantize with ignore=[{name!r}] to keep it in float")


def _op(layer: QuantMixin, name: str) -> Callable[[Tensor, Tensor, Tensor | None], Tensor]:
    """The float function ``op(x, weight, bias)`` of a layer of :data:`QDQ_LAYERS` on its stored weight layout
    (output channels first: a transposed convolution's weight is reordered back to torch's inside); a subclass
    running its own forward: that forward around the weight (:class:`OwnFunction`, a submodule of the QDQ layer)."""
    if isinstance(layer, OwnForward):
        return OwnFunction(layer)
    if isinstance(layer, (*CONVS, QuantConvTranspose)):
        if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
            raise ConfigError(f"layer {name!r}: export supports zero padding given as numbers, got "
                              f"padding={layer.padding!r}, padding_mode={layer.padding_mode!r}")
    if isinstance(layer, QuantConvTranspose):
        return lambda x, w, bias: layer.transpose(x, layer.torch_weight(w), bias, layer.stride, layer.padding,
                                                  layer.output_padding, layer.groups, layer.dilation)
    conv = next((f for cls, f in CONVS.items() if isinstance(layer, cls)), None)
    if conv is not None:
        return functools.partial(conv, stride=layer.stride, padding=layer.padding, dilation=layer.dilation,
                                 groups=layer.groups)
    if isinstance(layer, QuantEmbedding):
        if layer.max_norm is not None:
            raise ConfigError(f"layer {name!r}: an embedding with max_norm has no exported form")
        return lambda idx, w, _bias: F.embedding(idx, w, layer.padding_idx)
    return F.linear


class QdqLayer(nn.Module):
    """A squeezer layer in QDQ form: ``op(quantizer(rotate(x) * input_scale), dequantize(q, S)) + b``.

    ``weight``: :class:`Int8Weight` or None (float32 ``W^`` stored as is); ``fold_weight``: the graph
    holds ``quantize(W^)`` for a converter to fold into int8 (litert-torch) instead of the int8
    codes (ExecuTorch); ``input_grid``: static ``(scale, zero)``; ``dynamic``: per-tensor dynamic
    int8 q/dq of the input (``choose_qparams``, ExecuTorch's XNNPACK pattern); ``output_grid``:
    an int8 q/dq of the output (set by the TFLite exporter where its kernels need one).
    """

    def __init__(self, layer: QuantMixin, name: str, weight: Int8Weight | None, *, fold_weight: bool,
                 input_grid: tuple[float, int] | None = None, dynamic: bool = False) -> None:
        super().__init__()
        self.name, self.op = name, _op(layer, name)
        self.input_grid, self.dynamic, self.fold_weight = input_grid, dynamic, fold_weight
        self.output_grid: tuple[float, int] | None = None
        self.per_channel = weight is not None and weight.scale.dim() == 1
        if weight is None:
            self.register_buffer("weight", layer.quantized_weight().detach().float().clone())
            self.register_buffer("scale", None)
        else:
            shape = (-1,) + (1,) * (weight.codes.dim() - 1)
            stored = weight.codes.float() * weight.scale.reshape(shape if self.per_channel else ()) if fold_weight else weight.codes
            self.register_buffer("weight", stored.contiguous())
            self.register_buffer("scale", weight.scale)
            self.register_buffer("zero", torch.zeros(weight.scale.shape, dtype=torch.int64))
            self.tensor_scale = float(weight.scale) if not self.per_channel else 0.0
        bias = getattr(layer, "bias", None)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.register_buffer("input_scale", None if layer.input_scale is None else layer.input_scale.detach().float().clone())
        self.rotation = layer.input_rotation

    def dequantized_weight(self) -> Tensor:
        if self.scale is None:
            return self.weight
        return dequantize_codes(self.weight, self.scale, self.zero, self.tensor_scale, self.fold_weight)

    def forward(self, x: Tensor) -> Tensor:
        if self.rotation > 1:  # additions only: a converter must not quantize a product with H_b
            x = rotate_butterfly(x, self.rotation)
        if self.input_scale is not None:
            x = x * self.input_scale
        if self.input_grid is not None:
            x = fake_quant(x, self.input_grid)
        elif self.dynamic and x.is_floating_point():
            ops = qd()
            scale, zero = ops.choose_qparams.tensor(x, -128, 127, torch.finfo(torch.float32).eps, torch.int8)
            x = ops.dequantize_per_tensor.tensor(ops.quantize_per_tensor.tensor(x, scale, zero, -128, 127, torch.int8),
                                                 scale, zero, -128, 127, torch.int8)
        y = self.op(x, self.dequantized_weight(), self.bias)
        return y if self.output_grid is None else fake_quant(y, self.output_grid)


def checked_weight(layer: QuantMixin, name: str, backend: str, unsupported: Unsupported,
                   report: ExportReport) -> Int8Weight | None:
    """:func:`int8_weight`, or per ``unsupported`` the ``backend``'s refusal (:func:`unsupported_format`) /
    a float32 fallback with a warning; a layer type with no QDQ form (not in :data:`QDQ_LAYERS`) is refused."""
    if unsupported not in ("error", "float"):
        raise ConfigError(f"unsupported must be 'error' or 'float', got {unsupported!r}")
    if not isinstance(layer, QDQ_LAYERS):
        raise unsupported_layer(backend, name, layer, QDQ_LAYERS)
    weight = int8_weight(layer)
    if weight is None:
        qt = layer.weight_qtensor()
        fmt, what = weight_format(qt.spec, qt.qparams.levels), qt.spec.describe()
        if unsupported == "error":
            raise unsupported_format(backend, name, fmt, INT8_WEIGHTS, what,
                                     hint="quantize it with an int8 preset, or pass unsupported='float' to store its "
                                          "dequantized weights in float32")
        report.warnings.append(f"layer {name!r}: format {fmt} ({what}) has no {backend} int8 form; stored as float32 "
                               "(the same outputs, no integer kernel)")
    return weight


DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
"""Modules that are the identity in eval mode (left out of exported QDQ graphs by :func:`qdq_model`)."""


def qdq_model(model: nn.Module, make: Callable[[str, QuantMixin], nn.Module]) -> nn.Module:
    """A copy of ``model`` (in eval mode) whose quantized layers are replaced by ``make(name, layer)``;
    other modules are copied, the quantized layers themselves are not. Dropout modules become ``nn.Identity``
    (what they compute in eval mode), so that none is left as a node between a layer and its activation or the
    next input quantizer, where it would keep a runtime from fusing them into an int8 kernel."""
    memo: dict[int, Any] = {id(layer): make(name, layer) for name, layer in quant_layers(model).items()}
    copied = copy.deepcopy(model, memo).eval()
    for parent in list(copied.modules()):
        for child_name, child in parent.named_children():
            if isinstance(child, DROPOUTS):
                setattr(parent, child_name, nn.Identity())
    return copied

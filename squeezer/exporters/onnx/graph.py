"""ONNX export that carries squeezer's integers and runs on ONNX Runtime's integer kernels.

Each quantized layer is exported by a symbolic function that writes its own nodes:

* uniform weights of <= 8 bits per channel / tensor: ``DequantizeLinear(int8|uint8 codes, S, Z)`` in
  front of ``MatMul`` (codes stored ``W^T (K, N)``, ``axis=1``) / ``Conv`` (``axis=0``) (QDQ; ONNX Runtime
  fuses it into integer kernels); in front of uint8 static activations, signed codes are stored as
  uint8 ``q + 128`` with zero point ``Z + 128`` (see the last point);
* uniform 4- or 8-bit weight-only layers (per group of a power of two >= 16, or per channel with the
  scale repeated over blocks of 128): ``com.microsoft.MatMulNBits`` (``accuracy_level=4``: ONNX Runtime
  quantizes activations per block internally, its fastest CPU path); see :func:`nbits_tensors`;
* codebook weights with one level table (log2, exp, binary, ternary, per-tensor k-means):
  ``Gather(levels, codes) * S``, codes stored as uint8;
* other per-group uniform weights of <= 8 bits: uint8 codes decoded in the graph,
  ``(q - Z) * S`` per ``(N, G, g)`` block (ONNX Runtime folds these two forms into float weights
  when it loads the model: the file is small, the arithmetic is fp32);
* static activations: ``QuantizeLinear`` / ``DequantizeLinear`` on the input;
* dynamic per-token int8 activations with int8 weights: ``s = max|x| / 127`` per row,
  ``x_q = clip(round(x / s)) + 128`` as uint8 with zero point 128 (one ``QuantizeLinear`` per row),
  ``MatMulInteger(x_q, W_q^T + 128) * s * S_w`` (both zero points 128): integer GEMM with the exact
  per-token semantics (ONNX has no per-token ``DynamicQuantizeLinear``);
  for a convolution one scale per sample and ``ConvInteger`` (weights as uint8 ``q + 128``, zero point 128);
* dynamic per-token asymmetric 8-bit activations with int8 weights (``w8a8-asym``): squeezer's min-max
  ``(s, z)`` per row, one per-axis ``QuantizeLinear`` to uint8, ``MatMulInteger`` and an exact int32
  zero-point correction ``- z colsum(W_q)``;
* dynamic per-tensor uint8 activations with int8 weights (``w8a8-tensor``): ``DynamicQuantizeLinear``
  (exactly squeezer's asymmetric min-max formula) + ``MatMulInteger``, which ONNX Runtime fuses
  into ``DynamicQuantizeMatMul``; convolutions take the float fake-quantization form (warned).
* integer operands are u8 x u8 or s8 x s8, never u8 x s8: ONNX Runtime's x86 u8 x s8 kernels on CPUs
  without VNNI (AVX2, AVX-512 without VNNI) add pairs of products in saturating int16 (``vpmaddubsw``),
  which puts outputs 10-30 % off (measured on AVX2: ``MatMulInteger`` in ONNX Runtime 1.20-1.32, static
  QDQ since 1.23, which fuses it into ``QGemm`` / ``QLinearConv``); u8 x u8 is exact on every CPU, within
  1.1-1.4x of u8 x s8's speed there (s8 x s8 is exact too, but a scalar fallback: 6-50x slower).
Anything else is written as its reconstructed float weight and listed in the export report
as a warning naming the layer (never silently). The file is then compacted
(:mod:`squeezer.exporters.onnx.compact`).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import Tensor, nn

from ...calibration import call_model, output_tensors
from ...errors import ConfigError, DataError
from ...modules import QuantEmbedding, QuantLinear, QuantRecurrent, quant_layers
from ...modules.layers import OwnForward, QuantConv1d, QuantConv2d, QuantConv3d, QuantConvTranspose, own_forward
from ...modules.swap import ensure_deployable
from ...modules.base import QuantMixin
from ...quant.core import QTensor
from ...quant.formats import (
    AXIS0,
    INT8_WEIGHTS,
    STATIC_INT8,
    Format,
    activation_format,
    classify,
    uniform_formats,
    unsupported_format,
)
from ...quant.spec import PerChannel, PerGroup, PerTensor, QuantSpec
from ..base import ExportReport
from ..options import build_options
from ..qdq import unsupported_layer
from .compact import compact_onnx
from .nodes import channel_scale, const, matmul_integer_u8, scalar, uint8_codes, uint8_gemm_weight, uint8_zero
from .recurrent import uses_contrib_ops, recurrent_forward

NBITS_WEIGHTS = uniform_formats((4, 8), ("channel", "group"))
"""``MatMulNBits`` (weight-only Linear; a group size must be a power of two >= 16)."""
QDQ_WEIGHTS = uniform_formats(range(1, 9), AXIS0)
GROUP_WEIGHTS = uniform_formats(range(1, 9), ("group",))
ROW_WEIGHTS = uniform_formats(range(1, 9), ("channel",))
"""Embedding tables whose rows are gathered as 8-bit codes and dequantized per row."""
CODEBOOK_WEIGHTS = frozenset(f"{c}-{g}" for c in ("codebook", "codebook-int8") for g in AXIS0)
INT_GEMM_WEIGHTS = INT8_WEIGHTS & QDQ_WEIGHTS
"""Symmetric signed codes of <= 8 bits: the int8 operand of ``MatMulInteger`` / ``ConvInteger``."""
ASYM_TOKEN = frozenset({"dynamic-token-uint8", "dynamic-token-int8-asym"})
EXPORTED_LAYERS = (QuantLinear, QuantEmbedding, QuantConv1d, QuantConv2d, QuantConv3d, QuantConvTranspose)
"""The layer types with a symbolic function; any other quantized layer is refused by name."""
KIND_LABEL = {"qdq": "DequantizeLinear", "codebook": "uint8 codes -> Gather(levels) * scale",
              "group": "uint8 codes -> (q - Z) * S per group", "float": "float weight"}


@dataclass
class OnnxOptions:
    """Options of the ONNX export."""

    opset: int = field(default=17, metadata={"help": "ONNX opset version"})
    dynamic_axes: dict[str, dict[int, str]] | None = field(
        default=None, metadata={"help": "dynamic axes per input / output name (default: batch, and the sequence of token ids)"})
    compact: bool = field(default=True, metadata={"help": "constants as initializers, short tensor names (False: "
                                                          "PyTorch's module-path names, for debugging)"})


def _unsqueeze_last(g: Any, v: Any) -> Any:
    return g.op("Unsqueeze", v, const(g, torch.tensor([-1], dtype=torch.int64)))


def _unsigned_weights(layer: QuantMixin) -> bool:
    """Whether the layer's ``DequantizeLinear`` weight is written as uint8 (``q + 128``): in front of uint8
    static activations, so that ONNX Runtime's fused kernel is u8 x u8, not a saturating u8 x s8."""
    return layer.scheme.activation_mode == "static" and not layer.act_spec.signed


def _dq_weight(g: Any, qt: QTensor, transposed: bool = False, unsigned: bool = False) -> Any:
    """``DequantizeLinear`` of uniform codes, per tensor (scalar params) or per output channel.
    ``transposed``: a Linear weight stored as ``W^T (K, N)`` with ``axis=1``, ONNX Runtime's QDQ
    MatMul layout, so that ``DequantizeLinear -> MatMul`` fuses into an integer kernel.
    ``unsigned``: signed codes stored as uint8 ``(q + 128, Z + 128)`` (:func:`uint8_codes`)."""
    spec = qt.spec
    scale = qt.qparams.scale.float().reshape(-1)
    zero = torch.zeros(scale.shape, dtype=torch.int8) if qt.qparams.zero_point is None else qt.qparams.zero_point.reshape(-1)
    codes = qt.codes.t() if transposed else qt.codes
    if spec.signed and unsigned:
        codes, zero = uint8_codes(codes), uint8_codes(zero)
    dtype = torch.int8 if spec.signed and not unsigned else torch.uint8
    codes, zero = codes.to(dtype), zero.to(dtype)
    if isinstance(spec.granularity, PerTensor):
        return g.op("DequantizeLinear", const(g, codes), const(g, scale[0]), const(g, zero[0]))
    return g.op("DequantizeLinear", const(g, codes), const(g, scale), const(g, zero), axis_i=1 if transposed else 0)


def _codebook_weight(g: Any, qt: QTensor) -> Any:
    """``Gather(levels, codes) * S`` with one shared level table."""
    w = g.op("Gather", const(g, qt.qparams.levels.float().reshape(-1)), g.op("Cast", const(g, qt.codes.to(torch.uint8)), to_i=6))
    scale = qt.qparams.scale.float()
    shape = [-1] + [1] * (qt.codes.dim() - 1) if isinstance(qt.spec.granularity, PerChannel) else [1] * qt.codes.dim()
    return g.op("Mul", w, const(g, scale.reshape(shape)))


def _group_weight(g: Any, qt: QTensor) -> Any:
    """Per-group uniform codes decoded in the graph: ``((codes - Z) * S)`` on ``(N, G, g)`` blocks."""
    n = qt.codes.shape[0]
    k = qt.codes[0].numel()
    size = qt.spec.granularity.size
    blocks = -(-k // size)
    codes = torch.zeros(n, blocks * size, dtype=torch.int16)
    codes[:, :k] = qt.codes.reshape(n, k).to(torch.int16) - qt.spec.qmin  # shift to unsigned
    w = g.op("Cast", const(g, codes.to(torch.uint8).reshape(n, blocks, size)), to_i=1)
    zero = torch.zeros(n, blocks) if qt.qparams.zero_point is None else qt.qparams.zero_point.float()
    w = g.op("Mul", g.op("Sub", w, const(g, (zero - qt.spec.qmin).reshape(n, blocks, 1))),
             const(g, qt.qparams.scale.float().reshape(n, blocks, 1)))
    w = g.op("Reshape", w, const(g, torch.tensor([n, blocks * size], dtype=torch.int64)))
    w = g.op("Slice", w, const(g, torch.tensor([0], dtype=torch.int64)), const(g, torch.tensor([k], dtype=torch.int64)),
             const(g, torch.tensor([1], dtype=torch.int64)))
    return g.op("Reshape", w, const(g, torch.tensor(list(qt.codes.shape), dtype=torch.int64)))


def _format(layer: QuantMixin) -> Format:
    """The layer's classified format (k-means levels read from its weight parameters)."""
    levels = layer.weight_qtensor().qparams.levels if layer.weight_spec.mapping == "kmeans" else None
    return classify(layer.scheme, levels)


def _weight_kind(layer: QuantMixin) -> str:
    fmt, g = _format(layer), layer.weight_spec.granularity
    pow2_group = not isinstance(g, PerGroup) or (g.size >= 16 and g.size & (g.size - 1) == 0)
    if fmt.weight in NBITS_WEIGHTS and pow2_group and fmt.activation == "none" and isinstance(layer, QuantLinear):
        return "nbits"
    if fmt.weight in QDQ_WEIGHTS:
        return "qdq"
    if fmt.weight in GROUP_WEIGHTS:
        return "group"
    return "codebook" if fmt.weight in CODEBOOK_WEIGHTS else "float"


def _weight_node(g: Any, layer: QuantMixin, qt: QTensor, kind: str) -> Any:
    if kind == "qdq":
        return _dq_weight(g, qt, unsigned=_unsigned_weights(layer))
    if kind == "codebook":
        return _codebook_weight(g, qt)
    if kind == "group":
        return _group_weight(g, qt)
    return const(g, qt.dequantize())


def _quantize_input_static(g: Any, x: Any, layer: QuantMixin) -> Any:
    spec, qp = layer.act_spec, layer.act_qparams
    dtype = torch.int8 if spec.signed else torch.uint8
    zero = torch.tensor(0 if qp.zero_point is None else int(qp.zero_point.reshape(-1)[0]), dtype=dtype)
    scale = scalar(g, float(qp.scale.reshape(-1)[0]))
    return g.op("DequantizeLinear", g.op("QuantizeLinear", x, scale, const(g, zero)), scale, const(g, zero))


def _reduce(g: Any, op: str, x: Any, axes: list[int] | None, keepdims: bool = True) -> Any:
    """``op`` (ReduceMax / ReduceMin) over ``axes``, or over every axis when None."""
    kw = {} if axes is None else {"axes_i": axes}
    return g.op(op, x, keepdims_i=int(keepdims), **kw)


def _per_row_scale(g: Any, x: Any, qmax: int, axes: list[int] | None, keepdims: bool = True,
                   signed: bool = True) -> Any:
    """``s = max(top / qmax, 1e-12)`` over ``axes`` (None: the whole tensor), ``top = max|x|`` (unsigned
    codes: ``max(max x, 0)``, as :func:`squeezer.quant.core.uniform_qparams`); size-1 dims kept or dropped."""
    top = _reduce(g, "ReduceMax", g.op("Abs", x) if signed else x, axes, keepdims)
    if not signed:
        top = g.op("Max", top, scalar(g, 0.0))
    return g.op("Max", g.op("Div", top, scalar(g, float(qmax))), scalar(g, 1e-12))


def _quantize_uint8_per_row(g: Any, x: Any, axes: list[int]) -> tuple[Any, Any]:
    """Symmetric int8 codes ``clip(round(x / s), -127, 127)`` per slice of axis 0, ``s = max|x| / 127``
    over ``axes``, stored as uint8 ``+ 128`` (zero point 128) by one per-axis ``QuantizeLinear`` (round
    half to even, as squeezer; ``|x / s| <= 127``, so it never saturates), the u8 operand of a u8 x u8
    integer kernel. Returns ``(codes, s)`` with ``s`` of shape ``(x.shape[0],)``."""
    s = _per_row_scale(g, x, 127, axes, keepdims=False)
    zero = g.op("Expand", uint8_zero(g), g.op("Shape", s))
    return g.op("QuantizeLinear", x, s, zero, axis_i=0), s


def _gemm_activation(layer: QuantMixin) -> str | None:
    """The activation format of a layer whose weights are an int8 GEMM operand (:data:`INT_GEMM_WEIGHTS`),
    else None. Integer forms: ``dynamic-token-int8`` (GEMM / convolution), ``dynamic-tensor-uint8`` (ONNX's own
    ``DynamicQuantizeLinear`` computes exactly squeezer's parameters), :data:`ASYM_TOKEN` (``w8a8-asym``)."""
    fmt = _format(layer)
    return fmt.activation if fmt.weight in INT_GEMM_WEIGHTS else None


def _minmax_params(g: Any, x: Any, spec: QuantSpec, axes: list[int] | None, keepdims: bool = True) -> tuple[Any, Any]:
    """Asymmetric ``(S, Z)`` over ``axes`` (None: the whole tensor) with the formula of
    :func:`squeezer.quant.core.uniform_qparams`: ``lo = min(min x, 0)``, ``hi = max(max x, 0)``,
    ``S = max((hi - lo) / (qmax - qmin), 1e-12)``, ``Z = clip(qmin - round(lo / S), qmin, qmax)`` (float)."""
    qmin, qmax = float(spec.qmin), float(spec.qmax)
    lo = g.op("Min", _reduce(g, "ReduceMin", x, axes, keepdims), scalar(g, 0.0))
    hi = g.op("Max", _reduce(g, "ReduceMax", x, axes, keepdims), scalar(g, 0.0))
    s = g.op("Max", g.op("Div", g.op("Sub", hi, lo), scalar(g, qmax - qmin)), scalar(g, 1e-12))
    zero = g.op("Clip", g.op("Sub", scalar(g, qmin), g.op("Round", g.op("Div", lo, s))), scalar(g, qmin), scalar(g, qmax))
    return s, zero


def _fake_quantize_dynamic(g: Any, x: Any, layer: QuantMixin, axes: list[int]) -> Any:
    """Dynamic uniform fake quantization per token (per sample over ``axes``; per tensor for a
    per-tensor spec) in float ops, with the min-max parameters of
    :func:`squeezer.quant.core.uniform_qparams` (no integer kernel):
    ``x^ = (clip(round(x / S) + Z, qmin, qmax) - Z) * S``."""
    spec = layer.act_spec
    if isinstance(spec.granularity, PerTensor):
        axes = None
    qmin, qmax, zero = float(spec.qmin), float(spec.qmax), None
    if spec.symmetric:
        s = _per_row_scale(g, x, spec.qmax, axes, signed=spec.signed)
    else:
        s, zero = _minmax_params(g, x, spec, axes)
    q = g.op("Round", g.op("Div", x, s))
    if zero is not None:
        q = g.op("Add", q, zero)
    q = g.op("Clip", q, scalar(g, qmin), scalar(g, qmax))
    if zero is not None:
        q = g.op("Sub", q, zero)
    return g.op("Mul", q, s)


def _per_token_int8_matmul(g: Any, x: Any, qt: QTensor, bias: Any) -> Any:
    """``y = s * ((q_x - 128) @ q_W^T) * S_w + b`` for ``x (..., K)``: ``q_x`` per row of the ``(M, K)``
    view (:func:`_quantize_uint8_per_row`), then ``MatMulInteger`` (u8 x u8) and the two scales."""
    k = qt.codes.shape[1]
    xq, s = _quantize_uint8_per_row(g, g.op("Reshape", x, const(g, torch.tensor([-1, k], dtype=torch.int64))), [1])
    w, w_zero = uint8_gemm_weight(g, qt)
    acc = g.op("MatMulInteger", xq, w, uint8_zero(g), w_zero)
    return _rescaled_rows(g, acc, s, qt, x, bias)


def _per_token_asym_int8_matmul(g: Any, x: Any, spec: QuantSpec, qt: QTensor, bias: Any) -> Any:
    """``y = s ((q_x - z) @ q_W^T) S_w + b`` for ``x (..., K)`` with squeezer's asymmetric ``(s, z)`` per row
    of the ``(M, K)`` view (:func:`_minmax_params`). ``q_x = clip(round(x / s) + z)`` is stored as uint8
    (``+ 128`` for signed codes) by one per-axis ``QuantizeLinear`` with zero points ``z_u = z + 128``
    (round half to even and saturation to [0, 255], as squeezer's clip); ``MatMulInteger`` (u8 x u8,
    zero points 0 and 128) and the exact int32 correction ``- z_u colsum(q_W)`` remove the zero points."""
    k = qt.codes.shape[1]
    rows = g.op("Reshape", x, const(g, torch.tensor([-1, k], dtype=torch.int64)))
    s, zero = _minmax_params(g, rows, spec, [1], keepdims=False)
    zero_u8 = g.op("Cast", g.op("Add", zero, scalar(g, 128.0 if spec.signed else 0.0)), to_i=2)  # uint8
    w, w_zero = uint8_gemm_weight(g, qt)
    acc = g.op("MatMulInteger", g.op("QuantizeLinear", rows, s, zero_u8, axis_i=0), w, scalar(g, 0, torch.uint8), w_zero)
    shift = g.op("Mul", _unsqueeze_last(g, g.op("Cast", zero_u8, to_i=6)),  # int32 (M, 1) x (N,)
                 const(g, qt.codes.to(torch.int32).sum(dim=1)))
    acc = g.op("Sub", acc, shift)
    return _rescaled_rows(g, acc, s, qt, x, bias)


def _rescaled_rows(g: Any, acc: Any, s: Any, qt: QTensor, x: Any, bias: Any) -> Any:
    """The int32 accumulator ``acc (M, N)`` of the ``(M, K)`` view of ``x`` as floats, ``acc * s * S_w``
    (``s (M,)`` per row, ``S_w (N,)`` per output channel), back to ``x``'s leading dims ``(..., N)``, then ``+ b``."""
    y = g.op("Mul", g.op("Mul", g.op("Cast", acc, to_i=1), _unsqueeze_last(g, s)), const(g, channel_scale(qt, 2)))
    lead = g.op("Slice", g.op("Shape", x), const(g, torch.tensor([0], dtype=torch.int64)),
                const(g, torch.tensor([-1], dtype=torch.int64)))
    n = qt.codes.shape[0]
    y = g.op("Reshape", y, g.op("Concat", lead, const(g, torch.tensor([n], dtype=torch.int64)), axis_i=0))
    return y if bias is None else g.op("Add", y, bias)  # after the reshape: ONNX Runtime fuses it (BiasGelu, ...)


def _per_tensor_uint8_matmul(g: Any, x: Any, qt: QTensor, bias: Any) -> Any:
    """``y = s_x ((q_x - z_x) @ q_W^T) * S_w + b`` with ``(q_x, s_x, z_x) = DynamicQuantizeLinear(x)``
    (uint8, ``s_x = (max(x, 0) - min(x, 0)) / 255``, ``z_x = round(-min(x, 0) / s_x)``: squeezer's
    formula), ``MatMulInteger`` (u8 x u8) and one ``Mul`` by ``s_x * S_w``: the pattern ONNX Runtime
    fuses into its ``DynamicQuantizeMatMul`` kernel."""
    xq, xs, xz = g.op("DynamicQuantizeLinear", x, outputs=3)
    return matmul_integer_u8(g, xq, xs, xz, qt, bias)


def _linear_symbolic(g: Any, x: Any, layer: QuantLinear, report: ExportReport, name: str) -> Any:
    qt = layer.weight_qtensor()
    kind = _weight_kind(layer)
    bias = None if layer.bias is None else const(g, layer.bias.detach().float())
    h = layer.rotation_matrix()
    if h is not None:  # rotate(x): blocks of b as rows, times H_b, back to x's shape
        blocks = g.op("Reshape", x, const(g, torch.tensor([-1, h.shape[0]], dtype=torch.int64)))
        x = g.op("Reshape", g.op("MatMul", blocks, const(g, h)), g.op("Shape", x))
    if layer.input_scale is not None:
        x = g.op("Mul", x, const(g, layer.input_scale.float()))
    mode, gemm = layer.scheme.activation_mode, _gemm_activation(layer)
    if gemm == "dynamic-token-int8":
        report.layers[name] = "MatMulInteger (int8 weights, dynamic per-token int8 activations)"
        return _per_token_int8_matmul(g, x, qt, bias)
    if gemm == "dynamic-tensor-uint8":
        report.layers[name] = "MatMulInteger (int8 weights, dynamic per-tensor uint8 activations: DynamicQuantizeLinear)"
        return _per_tensor_uint8_matmul(g, x, qt, bias)
    if gemm in ASYM_TOKEN:
        report.layers[name] = "MatMulInteger (int8 weights, dynamic per-token asymmetric 8-bit activations)"
        return _per_token_asym_int8_matmul(g, x, layer.act_spec, qt, bias)
    if mode == "static":
        x = _quantize_input_static(g, x, layer)
    elif mode == "dynamic":
        x = _fake_quantize_dynamic(g, x, layer, [-1])
        report.warnings.append(f"layer {name!r}: dynamic activations exported as float fake-quantization")
    if kind == "nbits":
        y = _matmul_nbits(g, x, qt)
        report.layers[name] = f"MatMulNBits ({qt.spec.bits} bits, block {nbits_block(qt)})"
    else:
        if kind == "qdq":
            w = _dq_weight(g, qt, transposed=True, unsigned=_unsigned_weights(layer))
        else:
            w = g.op("Transpose", _weight_node(g, layer, qt, kind), perm_i=[1, 0])
        y = g.op("MatMul", x, w)
        report.layers[name] = KIND_LABEL[kind] + " + MatMul" + (" (static QDQ activations)" if mode == "static" else "")
        if kind == "float":
            report.warnings.append(f"layer {name!r}: {qt.spec.describe()} has no ONNX integer form; stored as float")
    return y if bias is None else g.op("Add", y, bias)


def nbits_block(qt: QTensor) -> int:
    """``MatMulNBits`` block size: the group size, or for per-channel weights the one of 128, 64, 32,
    16 that stores a row in the fewest bytes (the channel's scale is repeated over its blocks)."""
    g = qt.spec.granularity
    if isinstance(g, PerGroup):
        return g.size
    k = qt.codes.shape[1]
    bytes_per_code = qt.spec.bits / 8
    # bytes of one row: padded codes + a 4-byte scale and a zero point per block
    return min((128, 64, 32, 16), key=lambda b: (-(-k // b) * (b * bytes_per_code + 5), -b))


def nbits_tensors(qt: QTensor) -> tuple[Tensor, Tensor, Tensor]:
    """``MatMulNBits`` inputs ``(B, scales, zero_points)`` for 4- or 8-bit codes of shape ``(N, K)``:
    ``B (N, ceil(K / block), block * bits / 8)`` (4 bits: two codes a byte, low nibble first),
    scales ``(N, blocks)`` and zero points ``(N, blocks)`` (4 bits: ``(N, ceil(blocks / 2))``, two a
    byte), the 2-D shapes ONNX Runtime's own quantizer writes. Signed
    symmetric codes ``q`` are stored as ``q + 2^(bits-1)`` with that zero point: the same values."""
    n, k = qt.codes.shape
    bits, block = qt.spec.bits, nbits_block(qt)
    blocks = -(-k // block)
    offset = 2 ** (bits - 1) if qt.spec.signed else 0
    codes = torch.zeros(n, blocks * block, dtype=torch.uint8)
    codes[:, :k] = (qt.codes.to(torch.int16) + offset).to(torch.uint8)
    per_block = lambda t: t.reshape(n, -1).expand(n, blocks) if t.reshape(n, -1).shape[1] == 1 else t.reshape(n, blocks)  # noqa: E731
    scales = per_block(qt.qparams.scale.float()).contiguous()
    zp = torch.full((n, blocks), offset, dtype=torch.uint8) if qt.qparams.zero_point is None else \
        (per_block(qt.qparams.zero_point).to(torch.int16) + offset).to(torch.uint8)
    if bits == 8:
        return codes.reshape(n, blocks, block), scales, zp.contiguous()
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).reshape(n, blocks, block // 2)
    zp = torch.nn.functional.pad(zp, (0, blocks % 2))
    return packed.contiguous(), scales, (zp[:, 0::2] | (zp[:, 1::2] << 4)).contiguous()


def _matmul_nbits(g: Any, x: Any, qt: QTensor, accuracy_level: int = 4) -> Any:
    b, scales, zp = nbits_tensors(qt)
    n, k = qt.codes.shape
    return g.op("com.microsoft::MatMulNBits", x, const(g, b), const(g, scales), const(g, zp),
                K_i=k, N_i=n, bits_i=qt.spec.bits, block_size_i=nbits_block(qt), accuracy_level_i=accuracy_level)


def _conv_symbolic(g: Any, x: Any, layer: QuantMixin, report: ExportReport, name: str) -> Any:
    if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
        raise ConfigError(f"layer {name!r}: ONNX export supports zero padding given as numbers, got "
                          f"padding={layer.padding!r}, padding_mode={layer.padding_mode!r}")
    qt = layer.weight_qtensor()
    kind = _weight_kind(layer)
    attrs = {"kernel_shape_i": list(layer.kernel_size), "strides_i": list(layer.stride),
             "pads_i": list(layer.padding) * 2, "dilations_i": list(layer.dilation), "group_i": layer.groups}
    dims = qt.codes.dim()
    bias = None if layer.bias is None else layer.bias.detach().float()
    if layer.input_scale is not None:
        x = g.op("Mul", x, const(g, layer.input_scale.float().reshape([1, -1] + [1] * (dims - 2))))
    if _gemm_activation(layer) == "dynamic-token-int8":
        # one scale per sample (squeezer's "token" of a convolution); weights as uint8 codes + 128
        xq, s = _quantize_uint8_per_row(g, x, list(range(1, dims)))
        zero = uint8_zero(g)
        acc = g.op("ConvInteger", xq, const(g, uint8_codes(qt.codes)), zero, zero, **attrs)
        s = g.op("Reshape", s, const(g, torch.tensor([-1] + [1] * (dims - 1), dtype=torch.int64)))
        y = g.op("Mul", g.op("Mul", g.op("Cast", acc, to_i=1), s), const(g, channel_scale(qt, dims)))
        report.layers[name] = "ConvInteger (int8 weights, dynamic per-sample int8 activations)"
        return y if bias is None else g.op("Add", y, const(g, bias.reshape([1, -1] + [1] * (dims - 2))))
    if layer.scheme.activation_mode == "static":
        x = _quantize_input_static(g, x, layer)
    elif layer.scheme.activation_mode == "dynamic":
        x = _fake_quantize_dynamic(g, x, layer, axes=list(range(1, dims)))
        report.warnings.append(f"layer {name!r}: dynamic activations exported as float fake-quantization")
    args = [x, _weight_node(g, layer, qt, kind)] + ([] if bias is None else [const(g, bias)])
    report.layers[name] = KIND_LABEL[kind] + " + Conv"
    if kind == "float":
        report.warnings.append(f"layer {name!r}: {qt.spec.describe()} has no ONNX integer form; stored as float")
    return g.op("Conv", *args, **attrs)


def _conv_transpose_symbolic(g: Any, x: Any, layer: QuantConvTranspose, report: ExportReport, name: str) -> Any:
    """``ConvTranspose(x^, W^)``: the weight node of the layer's output-channels-first codes (``DequantizeLinear``
    per output channel, axis 0, ...), reordered in the graph to ONNX's ``(in, out / groups, k...)``
    (``Reshape (G, out / G, in / G, k...)``, ``Transpose`` of the middle axes, ``Reshape``), which ONNX
    Runtime folds into a float weight when it loads the model; activations as float (fake-)quantization."""
    qt = layer.weight_qtensor()
    kind = _weight_kind(layer)
    dims, groups = qt.codes.dim(), layer.groups
    cout, ig, *k = qt.codes.shape
    w = g.op("Reshape", _weight_node(g, layer, qt, kind), const(g, torch.tensor([groups, cout // groups, ig, *k])))
    w = g.op("Transpose", w, perm_i=[0, 2, 1, *range(3, dims + 1)])
    w = g.op("Reshape", w, const(g, torch.tensor([groups * ig, cout // groups, *k])))
    if layer.scheme.activation_mode == "static":
        x = _quantize_input_static(g, x, layer)
    elif layer.scheme.activation_mode == "dynamic":
        x = _fake_quantize_dynamic(g, x, layer, axes=list(range(1, dims)))
        report.warnings.append(f"layer {name!r}: dynamic activations exported as float fake-quantization")
    args = [x, w] + ([] if layer.bias is None else [const(g, layer.bias.detach().float())])
    report.layers[name] = KIND_LABEL[kind] + " + ConvTranspose"
    if kind == "float":
        report.warnings.append(f"layer {name!r}: {qt.spec.describe()} has no ONNX integer form; stored as float")
    return g.op("ConvTranspose", *args, kernel_shape_i=k, strides_i=list(layer.stride), pads_i=list(layer.padding) * 2,
                output_padding_i=list(layer.output_padding), dilations_i=list(layer.dilation), group_i=groups)


def _embedding_symbolic(g: Any, idx: Any, layer: QuantEmbedding, report: ExportReport, name: str) -> Any:
    qt = layer.weight_qtensor()
    spec = qt.spec
    if _format(layer).weight in ROW_WEIGHTS:
        rows = g.op("Cast", g.op("Gather", const(g, qt.codes.to(torch.int8 if spec.signed else torch.uint8)), idx), to_i=1)
        if qt.qparams.zero_point is not None:
            zero = g.op("Gather", const(g, qt.qparams.zero_point.float().reshape(-1)), idx)
            rows = g.op("Sub", rows, _unsqueeze_last(g, zero))
        report.layers[name] = "Gather int8 rows, then dequantize"
        return g.op("Mul", rows, _unsqueeze_last(g, g.op("Gather", const(g, qt.qparams.scale.float().reshape(-1)), idx)))
    kind = _weight_kind(layer)
    report.layers[name] = KIND_LABEL[kind] + " + Gather"
    if kind == "float":
        report.warnings.append(f"layer {name!r}: {spec.describe()} has no ONNX integer form; stored as float")
    return g.op("Gather", _weight_node(g, layer, qt, kind), idx)


@dataclass(frozen=True, eq=False)
class _Traced:
    """A quantized layer being exported: its module, its name and the report its symbolic writes to."""

    layer: QuantMixin
    name: str
    report: ExportReport


class _QuantLayerOp(torch.autograd.Function):
    """Runs the layer for tracing; ``symbolic`` writes its ONNX nodes."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, traced: _Traced) -> Tensor:  # type: ignore[override]
        layer = traced.layer
        tracing = torch._C._get_tracing_state()
        torch._C._set_tracing_state(None)  # the symbolic below stands for this computation
        try:
            with torch.no_grad():
                if layer.is_packed:
                    return layer.runtime(x).detach()
                return layer._op(layer.quantize_input(layer.smooth(x)), layer.quantized_weight()).detach()
        finally:
            torch._C._set_tracing_state(tracing)

    @staticmethod
    def symbolic(g: Any, x: Any, traced: _Traced) -> Any:
        layer, report, name = traced.layer, traced.report, traced.name
        if isinstance(layer, QuantLinear):
            return _linear_symbolic(g, x, layer, report, name)
        if isinstance(layer, QuantEmbedding):
            return _embedding_symbolic(g, x, layer, report, name)
        if isinstance(layer, QuantConvTranspose):
            return _conv_transpose_symbolic(g, x, layer, report, name)
        return _conv_symbolic(g, x, layer, report, name)


class _OwnForwardPart(torch.autograd.Function):
    """The quantized input (``part="input"``) or weight (``part="weight"``, ``x`` only anchors the node) of a layer
    running its own forward (``OwnForward``); ``symbolic`` writes their ONNX nodes (``QuantizeLinear`` /
    ``DequantizeLinear`` of the input; the weight node of its format, e.g. ``DequantizeLinear`` of int8 codes)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, traced: _Traced, part: str) -> Tensor:  # type: ignore[override]
        layer = traced.layer
        tracing = torch._C._get_tracing_state()
        torch._C._set_tracing_state(None)
        try:
            with torch.no_grad():
                return (layer.quantize_input(x) if part == "input" else layer.quantized_weight()).detach()
        finally:
            torch._C._set_tracing_state(tracing)

    @staticmethod
    def symbolic(g: Any, x: Any, traced: _Traced, part: str) -> Any:
        layer, report, name = traced.layer, traced.report, traced.name
        qt = layer.weight_qtensor()
        if part == "input":
            if layer.scheme.activation_mode == "static":
                return _quantize_input_static(g, x, layer)
            report.warnings.append(f"layer {name!r}: dynamic activations exported as float fake-quantization")
            return _fake_quantize_dynamic(g, x, layer, [-1] if layer.token_axis_is_last else list(range(1, qt.codes.dim())))
        kind = _weight_kind(layer)
        if kind == "nbits":  # MatMulNBits computes x W^T, not the subclass's function: the weight alone
            kind = "qdq" if _format(layer).weight in QDQ_WEIGHTS else "group"
        report.layers[name] = f"{layer.float_class.__name__}'s own forward on {KIND_LABEL[kind]}"
        if kind == "float":
            report.warnings.append(f"layer {name!r}: {qt.spec.describe()} has no ONNX integer form; stored as float")
        return _weight_node(g, layer, qt, kind)


def _own_forward_op(x: Tensor, traced: _Traced) -> Tensor:
    """A subclass's own forward, traced as it is, on the ONNX nodes of its quantized input and weight."""
    layer = traced.layer
    if layer.scheme.activation_mode != "none":
        x = _OwnForwardPart.apply(x, traced, "input")
    return own_forward(layer, layer.float_class, x, _OwnForwardPart.apply(x, traced, "weight"))


def _check_static(layer: QuantMixin, name: str) -> None:
    """Static activations are written as one 8-bit ``QuantizeLinear`` grid per tensor (:data:`STATIC_INT8`)."""
    if layer.act_qparams is None:
        raise ConfigError(f"layer {name!r}: static activations are not calibrated")
    fmt = activation_format("static", layer.act_spec)
    if fmt not in STATIC_INT8:
        raise unsupported_format("ONNX", name, fmt, STATIC_INT8, layer.act_spec.describe())


@contextlib.contextmanager
def _export_forwards(model: nn.Module, report: ExportReport) -> Iterator[None]:
    """Each quantized layer's ``forward`` replaced by :class:`_QuantLayerOp` for the duration; a recurrent layer's
    by :func:`~squeezer.exporters.onnx.recurrent.recurrent_forward`'s."""
    forwards = {n: recurrent_forward(l, n, report) for n, l in quant_layers(model).items() if isinstance(l, QuantRecurrent)}
    layers = quant_layers(model)
    saved = {name: layer.__dict__.get("forward") for name, layer in layers.items()}
    try:
        for name, layer in layers.items():
            if name in forwards:
                layer.forward = forwards[name]
                continue
            if not isinstance(layer, EXPORTED_LAYERS):
                raise unsupported_layer("ONNX", name, layer, EXPORTED_LAYERS)
            if layer.scheme.activation_mode == "static":
                _check_static(layer, name)
            op = _own_forward_op if isinstance(layer, OwnForward) else _QuantLayerOp.apply
            layer.forward = (lambda t, op: (lambda x: op(x, t)))(_Traced(layer, name, report), op)
        yield
    finally:
        for name, layer in layers.items():
            if saved[name] is None:
                layer.__dict__.pop("forward", None)
            else:
                layer.forward = saved[name]


def _names_and_axes(example: Any) -> tuple[tuple, list[str], dict[str, dict[int, str]], dict[str, Tensor], bool]:
    if isinstance(example, Tensor):
        example = (example,)
    if isinstance(example, dict):
        args, names, kwargs = (), list(example), dict(example)
        tensors = list(example.values())
    else:
        args, kwargs = tuple(example), {}
        names = ["input"] if len(args) == 1 else [f"input_{i}" for i in range(len(args))]
        tensors = list(args)
    for name, t in zip(names, tensors):
        if not isinstance(t, Tensor):
            raise DataError(f"example input {name!r} must be a tensor, got {type(t).__name__}")
    # token ids (integer, 2-D+) have a dynamic sequence axis, and so does every input sharing its length
    seq = {t.shape[1] for t in tensors if not t.is_floating_point() and t.dim() >= 2}
    axes = {name: {0: "batch", 1: "sequence"} if t.dim() >= 2 and t.shape[1] in seq else {0: "batch"}
            for name, t in zip(names, tensors)}
    return args, names, axes, kwargs, bool(seq)


def export_onnx(model: nn.Module, example_inputs: Any, path: str | Path, *, require_quantized: bool = True,
                **options: Any) -> ExportReport:
    """Write ``model`` (quantized, simulated or packed) to ``path`` as ONNX; returns what each layer became.

    ``example_inputs``: a tensor, a tuple (``model(*args)``) or a dict (``model(**kwargs)``); the
    batch axis (and the sequence axis of integer inputs) is dynamic unless ``dynamic_axes`` says otherwise.
    ``require_quantized=False`` also writes a model without quantized layers (fp32, pruned) as plain ONNX.
    ``options``: the fields of :class:`OnnxOptions` (``opset``, ``dynamic_axes``, ``compact``: constants as
    initializers, small equal ones stored once, short internal tensor names, :mod:`squeezer.exporters.onnx.compact`).
    """
    opts: OnnxOptions = build_options("onnx", OnnxOptions, options)
    if require_quantized or quant_layers(model):
        ensure_deployable(model, "export_onnx")
    path = Path(path)
    if path.parent and not path.parent.exists():
        raise DataError(f"ONNX output directory {path.parent} does not exist")
    report = ExportReport(str(path))
    uses_contrib = any(isinstance(layer, QuantLinear) and _weight_kind(layer) == "nbits"
                       for layer in quant_layers(model).values()) or uses_contrib_ops(model)
    args, names, axes, kwargs, has_sequence = _names_and_axes(example_inputs)
    with torch.no_grad():
        outputs = call_model(model, example_inputs if isinstance(example_inputs, (dict, tuple, list)) else (example_inputs,))
    out_tensors = output_tensors(outputs)
    out_names = ["output"] if len(out_tensors) == 1 else [f"output_{i}" for i in range(len(out_tensors))]
    axes.update({name: {0: "batch", 1: "sequence"} if has_sequence and t.dim() >= 3 else {0: "batch"}
                 for name, t in zip(out_names, out_tensors)})
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".onnx", dir=path.parent or ".")
    os.close(fd)
    was_training = model.training
    model.eval()
    try:
        with _export_forwards(model, report), warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, args + ((kwargs,) if kwargs else ()), tmp, dynamo=False, opset_version=opts.opset,
                              input_names=names, output_names=out_names, dynamic_axes=opts.dynamic_axes or axes,
                              do_constant_folding=False,
                              custom_opsets={"com.microsoft": 1} if uses_contrib else None)
        proto = onnx.load(tmp, load_external_data=False) if opts.compact else None
        if proto is not None and not any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer):
            onnx.save(compact_onnx(proto), tmp)  # a model past 2 GB (external data) keeps its layout
        os.replace(tmp, path)
    finally:
        model.train(was_training)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return report

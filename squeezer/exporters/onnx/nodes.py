"""ONNX node builders shared by the symbolic functions of :mod:`~squeezer.exporters.onnx.graph` (layers) and
:mod:`~squeezer.exporters.onnx.recurrent` (recurrent layers): constants, the u8 x u8 integer GEMM
``y = s_x ((q_x - z_x) @ (q_W^T + 128 - 128)) S_w + b`` (exact on every CPU, see ``graph``'s docstring), and a
matrix's codes dequantized in the graph (``W^ = (q - Z) S`` per tensor, row or group)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ...quant.blocks import to_blocks
from ...quant.core import QTensor
from ...quant.spec import PerChannel, PerGroup, PerTensor


def const(g: Any, t: Tensor) -> Any:
    """A ``Constant`` node holding ``t``."""
    return g.op("Constant", value_t=t.detach().contiguous())


def scalar(g: Any, value: float, dtype: torch.dtype = torch.float32) -> Any:
    """A 0-d ``Constant`` of ``dtype``."""
    return const(g, torch.tensor(value, dtype=dtype))


def uint8_zero(g: Any) -> Any:
    """The uint8 zero point 128 of signed codes stored as ``q + 128``."""
    return const(g, torch.tensor(128, dtype=torch.uint8))


def uint8_codes(codes: Tensor) -> Tensor:
    """Signed codes ``q`` as uint8 ``q + 128``: with zero point ``Z + 128``, the same values."""
    return (codes.to(torch.int16) + 128).to(torch.uint8)


def channel_scale(qt: QTensor, dims: int) -> Tensor:
    """The weight scale shaped to multiply an output with ``dims`` dims whose channels are axis 1 (conv) / -1."""
    scale = qt.qparams.scale.float().reshape(-1)
    return scale.reshape([1, -1] + [1] * (dims - 2)) if dims > 2 else scale


def uint8_gemm_weight(g: Any, qt: QTensor) -> tuple[Any, Any]:
    """Signed weight codes as the B operand of a u8 x u8 ``MatMulInteger``: ``(q_W^T + 128 (K, N), 128)``."""
    return const(g, uint8_codes(qt.codes.t())), uint8_zero(g)


def matmul_integer_u8(g: Any, xq: Any, x_scale: Any, x_zero: Any, qt: QTensor, bias: Any) -> Any:
    """``y = (MatMulInteger(q_x, q_W^T + 128; z_x, 128) as float) * (s_x * S_w) + b``: uint8 activation codes
    ``q_x (..., K)`` with per-tensor ``(s_x, z_x)``, the layer's signed weight codes ``(N, K)`` per row / tensor
    scales ``S_w``; ``bias`` a node or None."""
    w, w_zero = uint8_gemm_weight(g, qt)
    acc = g.op("MatMulInteger", xq, w, x_zero, w_zero)
    y = g.op("Mul", g.op("Cast", acc, to_i=1), g.op("Mul", x_scale, const(g, channel_scale(qt, 2))))
    return y if bias is None else g.op("Add", y, bias)


def carries_codes(qt: QTensor) -> bool:
    """Whether :func:`dequantize_codes` can carry ``qt``: uniform codes of <= 8 bits (int8 / uint8) per tensor,
    per row (axis 0) or per group of a 2-D matrix."""
    g = qt.spec.granularity
    return (qt.spec.mapping == "uniform" and qt.spec.bits <= 8 and qt.codes.dim() == 2 and qt.codes.dtype in
            (torch.int8, torch.uint8) and (isinstance(g, (PerTensor, PerGroup)) or
                                           (isinstance(g, PerChannel) and g.axis in (0, -2))))


def dequantize_codes(g: Any, qt: QTensor) -> Any:
    """``W^ (R, K)`` from ``qt``'s codes stored as one int8 / uint8 initializer (codes of < 8 bits one per byte:
    ONNX's int4 needs opset 21): ``DequantizeLinear`` of the blocks ``(B, n)`` of ``qt``'s granularity
    (``(1, R K)`` per tensor, ``(R, K)`` per row, ``(R G, g)`` per group, the last group zero-padded) with
    scales ``(B,)`` and zero points ``(B,)`` (asymmetric specs; one of each for ``B = 1``) along axis 0,
    reshaped to ``(R, G g)`` and sliced to ``K``: ``W^ = (q - Z) S``, squeezer's dequantization."""
    rows, k = qt.codes.shape
    blocks = to_blocks(qt.codes, qt.spec.granularity).data
    per_block = blocks.shape[0] > 1
    shaped = lambda t, dtype: t.reshape(-1).to(dtype) if per_block else t.reshape(()).to(dtype)  # noqa: E731
    inputs = [const(g, blocks), const(g, shaped(qt.qparams.scale, torch.float32))]
    if qt.qparams.zero_point is not None:
        inputs.append(const(g, shaped(qt.qparams.zero_point, blocks.dtype)))
    w = g.op("DequantizeLinear", *inputs, axis_i=0) if per_block else g.op("DequantizeLinear", *inputs)
    w = g.op("Reshape", w, const(g, torch.tensor([rows, -1], dtype=torch.int64)))
    if blocks.numel() != rows * k:  # the padding of the last group
        w = g.op("Slice", w, *(const(g, torch.tensor([v], dtype=torch.int64)) for v in (0, k, 1)))
    return w

"""ONNX node builders shared by the symbolic functions of :mod:`~squeezer.exporters.onnx.graph` (layers) and
:mod:`~squeezer.exporters.onnx.recurrent` (recurrent layers): constants, and the u8 x u8 integer GEMM
``y = s_x ((q_x - z_x) @ (q_W^T + 128 - 128)) S_w + b`` (exact on every CPU, see ``graph``'s docstring)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ...quant.core import QTensor


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

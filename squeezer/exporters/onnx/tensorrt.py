"""Is a QDQ ONNX file (from :func:`squeezer.export_onnx`) in TensorRT's explicit-quantization form?

TensorRT's conventions, checked without a GPU:

* ``QuantizeLinear`` / ``DequantizeLinear``: a constant positive scale and an int8 zero point equal
  to 0 (symmetric int8; no zero point means uint8, which TensorRT does not quantize to);
* weights: ``DequantizeLinear`` of an int8 constant, per tensor or per channel on the output axis
  (``MatMul`` B ``(K, N)``: the last axis; ``Gemm`` B: 0 with ``transB=1`` else 1; ``Conv``: 0;
  ``ConvTranspose``: 1); activations per tensor;
* a ``MatMul`` / ``Gemm`` / ``Conv`` with a quantized input has every data input behind a
  ``DequantizeLinear``, activations behind a ``QuantizeLinear -> DequantizeLinear`` pair;
* no integer-only or custom ops (``MatMulInteger``, ``ConvInteger``, ``QLinear*``,
  ``DynamicQuantizeLinear``, ``com.microsoft`` ops such as ``MatMulNBits``), no uint8 constants
  (codes decoded in the graph).

What squeezer's presets give: ``w8a8-static`` has asymmetric uint8 activations (rejected: TensorRT
has no zero point, and making the grid symmetric would change squeezer's accuracy); ``w8`` /
``w4g128`` become ``MatMulNBits`` and ``w8a8`` ``MatMulInteger`` (rejected); codebook and 2/3-bit
formats decode uint8 codes (rejected). :data:`TENSORRT_CONFIG` (int8 symmetric per-channel weights,
int8 symmetric static per-tensor activations) exports in TensorRT's form as it is.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import numpy_helper

from ...config import QuantConfig
from ...errors import ModelError
from ...quant.spec import PerChannel, PerTensor, QuantSpec

TENSORRT_CONFIG = QuantConfig(QuantSpec(bits=8, granularity=PerChannel(0)), QuantSpec(bits=8, granularity=PerTensor()),
                              activation_mode="static", name="w8a8-tensorrt")
"""Weights int8 symmetric per output channel, activations int8 symmetric static per tensor."""

UNSUPPORTED = {"MatMulInteger", "ConvInteger", "QLinearMatMul", "QLinearConv", "DynamicQuantizeLinear"}
GEMMS = {"MatMul", "Gemm", "Conv", "ConvTranspose"}


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def _label(node: onnx.NodeProto) -> str:
    return f"{node.op_type} {node.name or node.output[0]!r}"


def _attribute(node: onnx.NodeProto, name: str, default: int) -> int:
    return next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _qdq_problems(node: onnx.NodeProto, consts: dict[str, np.ndarray]) -> list[str]:
    """Scale constant and positive, zero point int8 and 0."""
    problems = []
    scale = consts.get(node.input[1])
    if scale is None or not (np.isfinite(scale).all() and (scale > 0).all()):
        problems.append(f"{_label(node)}: the scale must be a constant, finite and positive")
    zero = consts.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if zero is None or zero.dtype != np.int8:
        kind = "missing (uint8)" if zero is None else f"{zero.dtype}"
        problems.append(f"{_label(node)}: zero point {kind}; TensorRT needs int8 with zero point 0 (symmetric)")
    elif zero.any():
        problems.append(f"{_label(node)}: zero point {zero.reshape(-1)[:4].tolist()} is not 0 (asymmetric)")
    return problems


def _weight_axis(node: onnx.NodeProto, rank: int) -> int:
    if node.op_type == "MatMul":
        return rank - 1
    if node.op_type == "Gemm":
        return 0 if _attribute(node, "transB", 0) else 1
    return 1 if node.op_type == "ConvTranspose" else 0


def _gemm_problems(node: onnx.NodeProto, producer: dict[str, onnx.NodeProto], consts: dict[str, np.ndarray]) -> list[str]:
    """Q/DQ in front of both data inputs; weights per channel on the output axis; activations per tensor."""
    sources = [producer.get(name) for name in node.input[:2]]
    if not any(s is not None and s.op_type == "DequantizeLinear" for s in sources):
        return []  # a float layer: TensorRT runs it in float / half
    problems = []
    for i, (name, dq) in enumerate(zip(node.input[:2], sources)):
        if dq is None or dq.op_type != "DequantizeLinear":
            problems.append(f"{_label(node)}: input {i} ({name!r}) has no Q/DQ in front")
            continue
        codes, scale = consts.get(dq.input[0]), consts.get(dq.input[1])
        if codes is not None:  # a weight
            axis = _attribute(dq, "axis", 1) % codes.ndim
            if scale is not None and scale.size > 1 and axis != _weight_axis(node, codes.ndim):
                problems.append(f"{_label(node)}: weight {dq.input[0]!r} is quantized per channel on axis {axis}, "
                                f"not on the output axis {_weight_axis(node, codes.ndim)}")
            continue
        q = producer.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear":
            problems.append(f"{_label(node)}: input {i} ({name!r}) is dequantized without a QuantizeLinear in front")
        if scale is not None and scale.size > 1:
            problems.append(f"{_label(node)}: activation {name!r} is quantized per channel; TensorRT needs per tensor")
    return problems


def tensorrt_violations(model: str | Path | onnx.ModelProto) -> list[str]:
    """Every way ``model`` (an ONNX path or proto) breaks TensorRT's QDQ conventions; empty = ready."""
    if not isinstance(model, onnx.ModelProto):
        try:
            model = onnx.load(str(model))
        except (OSError, DecodeError) as exc:
            raise ModelError(f"cannot read ONNX file {model}: {exc}") from None
    graph = model.graph
    consts = _constants(graph)
    producer = {out: node for node in graph.node for out in node.output}
    problems = []
    for node in graph.node:
        if node.domain not in ("", "ai.onnx") or node.op_type in UNSUPPORTED:
            problems.append(f"{_label(node)}: {node.domain or 'integer'} op outside TensorRT's Q/DQ form")
        elif node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            problems += _qdq_problems(node, consts)
        elif node.op_type in GEMMS:
            problems += _gemm_problems(node, producer, consts)
    return problems + [f"constant {name!r} is uint8 (packed or codebook codes); TensorRT takes int8 Q/DQ weights"
                       for name, value in consts.items() if value.dtype == np.uint8 and value.size > 1]


def check_tensorrt(model: str | Path | onnx.ModelProto) -> None:
    """Raise :class:`ModelError` listing the violations of :func:`tensorrt_violations`, if any."""
    problems = tensorrt_violations(model)
    if problems:
        name = model.graph.name if isinstance(model, onnx.ModelProto) else str(model)
        shown = "; ".join(problems[:8]) + (f"; ... {len(problems) - 8} more" if len(problems) > 8 else "")
        raise ModelError(f"{name} is not ready for TensorRT ({len(problems)} problem(s)): {shown}")

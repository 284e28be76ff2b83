"""Rewrite float32 weight constants of a TFLite model as squeezer's int8 codes + ``DEQUANTIZE``.

A layer that the TFLite exporter writes as a float op (its output has no squeezer grid, see
:func:`squeezer.exporters.tflite.convert.export_tflite`) reads ``W^ = q * s`` as a float32 constant: 4 bytes
a weight in a quantized file. This stores ``q`` (int8, zero point 0, a scale per output channel)
and a ``DEQUANTIZE`` op that turns it back into the same float tensor (TFLite
computes ``(q - 0) * s`` in float32, the product squeezer's ``W^`` is); the interpreter evaluates a
``DEQUANTIZE`` of a constant once. The float op and its arithmetic are unchanged; the weight takes
one byte a value.

Layouts: a ``FULLY_CONNECTED`` weight is ``(N, K)`` as in PyTorch, a ``CONV_2D`` filter
``(O, H, W, I)`` (PyTorch's ``(O, I, H, W)`` permuted), a ``DEPTHWISE_CONV_2D`` one (one input
channel) ``(1, H, W, O)``, its channels on axis 3. The constant is found by its shape and values:
``V = q * c`` per output channel, ``c`` = squeezer's scale, or that scale times a factor the converter
folded in (a following BatchNorm's ``gamma / sqrt(var + eps)``), to float32 rounding (relative
1e-6); the file then stores ``q`` with scales ``c``. A layer the converter stored another way stays
float32 (the caller warns).
"""

from __future__ import annotations

import numpy as np

from ..qdq import Int8Weight

FLOAT32, INT8 = 0, 9  # TensorType
DEQUANTIZE = 6  # BuiltinOperator
DEQUANTIZE_VERSION = {True: 5, False: 2}  # per-channel int8 input: version 5 (TFLite's op_version table)


def _layouts(codes: np.ndarray) -> list[tuple[np.ndarray, int]]:
    """``(codes in a TFLite layout, axis of the output channel)`` candidates."""
    found = [(codes, 0)]
    if codes.ndim == 4:
        found.append((codes.transpose(0, 2, 3, 1), 0))
        if codes.shape[1] == 1:
            found.append((codes.transpose(1, 2, 3, 0), 3))
    return found


def channel_scales(values: np.ndarray, codes: np.ndarray, axis: int) -> np.ndarray | None:
    """``c`` (float32, one per slice along ``axis``) with ``values = codes * c`` to relative 1e-6, else None."""
    n = codes.shape[axis]
    v = np.moveaxis(values, axis, 0).reshape(n, -1).astype(np.float64)
    q = np.moveaxis(codes, axis, 0).reshape(n, -1).astype(np.float64)
    if np.any((q == 0) & (v != 0)):
        return None
    at = np.abs(q).argmax(axis=1)
    rows = np.arange(n)
    pivot = q[rows, at]
    c = np.where(pivot != 0, v[rows, at] / np.where(pivot != 0, pivot, 1.0), 1.0)
    if np.any(c <= 0) or not np.allclose(q * c[:, None], v, rtol=1e-6, atol=0.0):
        return None
    return c.astype(np.float32)


def _find(model: object, sg: object, weight: Int8Weight) -> tuple[int, np.ndarray, int, np.ndarray] | None:
    """The float32 constant tensor holding ``weight``'s values (see the module doc): its index, the
    codes in its layout, the axis of their channels and the per-channel scales."""
    codes = weight.codes.numpy()
    for i, t in enumerate(sg.tensors):
        data = model.buffers[t.buffer].data
        if t.type != FLOAT32 or data is None or t.shape is None:
            continue
        for laid, axis in _layouts(codes):
            if tuple(t.shape) != laid.shape:
                continue
            values = np.frombuffer(np.asarray(data, dtype=np.uint8).tobytes(), dtype=np.float32).reshape(laid.shape)
            scales = channel_scales(values, laid, axis)
            if scales is not None:
                return i, laid, axis, scales
    return None


def store_int8_weights(content: bytes, weights: dict[str, Int8Weight]) -> tuple[bytes, dict[str, str]]:
    """``content`` with each named layer's float32 weight constant stored as int8 + ``DEQUANTIZE``
    (see the module doc), and per layer what was found: ``"rewritten"``; ``"float32"`` (a float32
    constant of its size is left, in a layout not rewritten); ``"none"`` (no float32 constant of its
    size: the converter fused the layer into an int8 kernel, e.g. with a BatchNorm and the next
    layer's input quantizer)."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as fb

    model = fb.ModelT.InitFromObj(fb.Model.GetRootAsModel(content, 0))
    float_sizes = {int(np.prod(t.shape)) for sg in model.subgraphs for t in sg.tensors
                   if t.type == FLOAT32 and t.shape is not None and model.buffers[t.buffer].data is not None}
    found = {name: "float32" if w.codes.numel() in float_sizes else "none" for name, w in weights.items()}
    if len(model.subgraphs) != 1 or any(b.offset for b in model.buffers):  # several graphs, or data past 2 GB
        return content, found
    sg = model.subgraphs[0]
    new_ops = []
    for name, weight in weights.items():
        hit = _find(model, sg, weight)
        if hit is None:
            continue
        found[name] = "rewritten"
        index, codes, axis, scales = hit
        buffer = fb.BufferT()
        buffer.data = np.ascontiguousarray(codes).view(np.uint8).reshape(-1)
        model.buffers.append(buffer)
        model.buffers[sg.tensors[index].buffer].data = None  # the float tensor is now the op's output
        quant = fb.QuantizationParametersT()
        quant.scale = scales.tolist()
        quant.zeroPoint = [0] * len(quant.scale)
        quant.quantizedDimension = axis
        tensor = fb.TensorT()
        tensor.shape, tensor.type, tensor.buffer = list(codes.shape), INT8, len(model.buffers) - 1
        tensor.name, tensor.quantization = f"{name}.weight_int8".encode(), quant
        sg.tensors.append(tensor)
        op = fb.OperatorT()
        op.opcodeIndex = _dequantize_opcode(model, fb, DEQUANTIZE_VERSION[len(scales) > 1])
        op.inputs, op.outputs = [len(sg.tensors) - 1], [index]
        new_ops.append(op)
    if not new_ops:
        return content, found
    sg.operators = new_ops + list(sg.operators)  # constants first: every op after them may read them
    builder = flatbuffers.Builder(len(content))
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output()), found


def _dequantize_opcode(model: object, fb: object, version: int) -> int:
    """Index of the model's ``DEQUANTIZE`` operator code (added if absent), at least ``version``."""
    for i, code in enumerate(model.operatorCodes):
        if max(code.builtinCode, code.deprecatedBuiltinCode) == DEQUANTIZE:
            code.version = max(code.version, version)
            return i
    code = fb.OperatorCodeT()
    code.builtinCode, code.deprecatedBuiltinCode, code.version = DEQUANTIZE, DEQUANTIZE, version
    model.operatorCodes.append(code)
    return len(model.operatorCodes) - 1

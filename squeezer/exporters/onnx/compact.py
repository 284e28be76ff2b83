"""Compact an exported ONNX graph without changing what it computes.

For a small model the graph's bookkeeping is a large share of the file: PyTorch's exporter
stores every weight, scale and zero point as a ``Constant`` node and names each tensor after its
module path (``/conv2/Constant_3_output_0``). :func:`compact_onnx`

1. turns every ``Constant`` node of the main graph into an initializer of the same name (its
   tensor; what ONNX Runtime's graph optimiser does on load);
2. keeps one copy of equal small initializers (at most ``SHARED_MAX_ELEMENTS`` elements, same type,
   shape and bytes: the repeated scalars and shapes of the dynamic-quantization subgraphs) and points
   every user at it; larger ones stay per node, so that a runtime that repacks a weight for its
   kernel at load (ONNX Runtime's ``MatMulNBits``, ``MatMulInteger``) never meets a shared one,
   except equal tensors used only by float ``MatMul`` nodes (the Hadamard matrices ``H_b`` of rotated
   layers: one copy per block size);
3. renames the internal tensors to short names (``t0``, ``t1``, ...) and each node after the module
   it came from, in squeezer's dotted form (``/encoder/layer.0/attention/self/query/MatMul`` ->
   ``encoder.layer.0.attention.self.query``, then ``...query#1``, ... for its further nodes; nodes
   outside any module lose their name), so that messages about a node still name the layer.
   The graph's inputs and outputs keep their names; so do all names when a node holds a
   subgraph (``If`` / ``Loop`` / ``Scan``), whose bodies may refer to outer tensors by name.

Zero points and every other input stay as they are (TensorRT wants its int8 zero points).
"""

from __future__ import annotations

import math

import onnx
from onnx import numpy_helper

SHARED_MAX_ELEMENTS = 64


def _io_names(graph: onnx.GraphProto) -> set[str]:
    return {v.name for v in graph.input} | {v.name for v in graph.output}


def _constants_to_initializers(graph: onnx.GraphProto) -> None:
    kept = []
    for node in graph.node:
        attr = node.attribute[0] if len(node.attribute) == 1 else None
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and attr is not None and attr.name == "value":
            tensor = onnx.TensorProto()
            tensor.CopyFrom(attr.t)
            tensor.name = node.output[0]
            graph.initializer.append(tensor)
        else:
            kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)


def _deduplicate_initializers(graph: onnx.GraphProto) -> None:
    outer = _io_names(graph)
    users: dict[str, set[str]] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, set()).add(node.op_type)
    first: dict[tuple, str] = {}
    alias: dict[str, str] = {}
    kept = []
    for tensor in graph.initializer:
        if math.prod(tensor.dims) > SHARED_MAX_ELEMENTS and users.get(tensor.name) != {"MatMul"}:
            kept.append(tensor)
            continue
        key = (tensor.data_type, tuple(tensor.dims), numpy_helper.to_array(tensor).tobytes())
        if key in first and tensor.name not in outer:
            alias[tensor.name] = first[key]
        else:
            first.setdefault(key, tensor.name)
            kept.append(tensor)
    del graph.initializer[:]
    graph.initializer.extend(kept)
    for node in graph.node:
        node.input[:] = [alias.get(name, name) for name in node.input]


def _has_subgraph(graph: onnx.GraphProto) -> bool:
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node for a in n.attribute)


def module_of(node_name: str) -> str:
    """The module path of an exported node's scoped name: ``/a/b.0/MatMul_2`` -> ``a.b.0`` ("" at top level)."""
    return ".".join(part for part in node_name.strip("/").split("/")[:-1] if part)


def _short_names(graph: onnx.GraphProto) -> None:
    outer = _io_names(graph)
    names: dict[str, str] = {}
    per_module: dict[str, int] = {}

    def short(name: str) -> str:
        if not name or name in outer:
            return name
        return names.setdefault(name, f"t{len(names)}")

    for node in graph.node:
        module = module_of(node.name)
        count = per_module.get(module, 0)
        per_module[module] = count + 1
        node.name = "" if not module else module if count == 0 else f"{module}#{count}"
        node.input[:] = [short(n) for n in node.input]
        node.output[:] = [short(n) for n in node.output]
    for tensor in graph.initializer:
        tensor.name = short(tensor.name)
    for info in graph.value_info:
        info.name = short(info.name)


def compact_onnx(model: onnx.ModelProto) -> onnx.ModelProto:
    """Compact ``model`` in place (see the module docstring) and return it."""
    graph = model.graph
    _constants_to_initializers(graph)
    _deduplicate_initializers(graph)
    if not _has_subgraph(graph):
        _short_names(graph)
    return model

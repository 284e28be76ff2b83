"""Recurrent layers (:class:`~squeezer.modules.QuantRecurrent`) in ONNX.

* weight-only: ONNX's ``LSTM`` / ``GRU`` (``linear_before_reset=1``, torch's GRU) / ``RNN`` ops, one node per
  layer (:func:`_layers_symbolic`), whose ``W (D, G H, in)`` and ``R (D, G H, H)`` are ``DequantizeLinear`` of
  squeezer's codes (:func:`~squeezer.exporters.onnx.nodes.dequantize_codes`: int8 / uint8 initializers, one
  code per byte also at 4 bits, scales per tensor / gate row / group, zero points where asymmetric) in ONNX's
  gate order (:data:`ONNX_GATES`); the biases ``B (D, 2 G H)`` stay float. Grouped codes are dequantized on
  their ``(rows x groups, group)`` view, one scale per group (no float expansion is stored). Matrices with
  other codes (codebooks, more than 8 bits, another axis) are written as torch's op on the dequantized
  matrices ``W^`` (float initializers, :func:`dequantized_twin`; a warning says so). Every torch option maps
  onto them (layers, bidirectional, batch_first, a given initial state) but ``proj_size``, which ONNX's
  ``LSTM`` lacks: refused by name.
* dynamic int8 LSTM (``w8a8``, ``w8a8-tensor``): one ``com.microsoft.DynamicQuantizeLSTM`` per layer
  (:func:`lstm_tensors`) holding squeezer's int8 codes of ``W_ih`` / ``W_hh`` (per gate row or per
  matrix) and their scales. ONNX Runtime quantizes the activations itself: the input sequence as one
  asymmetric uint8 tensor, ``h_{t-1}`` per step as one asymmetric uint8 tensor (``scale = (max(x, 0) -
  min(x, 0)) / 255``); squeezer's activation grid is not the kernel's (a warning says so).
  The codes are stored as uint8 ``q + 128`` with zero point 128 so that its GEMMs are u8 x u8
  (exact on every CPU; a u8 x s8 GEMM saturates int16 pair sums on x86 without VNNI).
* dynamic GRU / RNN: ONNX Runtime has no dynamic quantized op for them; written as weight-only
  (the ``GRU`` / ``RNN`` op on ``DequantizeLinear`` of the codes, float activations), with a warning.
* static activations (``w8a8-static``): the step loop unrolled for the example's sequence length (the file
  takes that length only; a warning says so), traced through
  :func:`~squeezer.modules.recurrent_steps.run_recurrent` with :class:`StaticOnnxOps`: each product
  ``x W^T + b`` as ``QuantizeLinear`` of its input (``x``, ``h_{t-1}``, ``m``) on the state's 8-bit grid
  stored as uint8 (signed codes ``+ 128``), ``MatMulInteger`` with the matrix's int8 codes (uint8 ``+ 128``:
  u8 x u8), ``* (s_x S_w) + b`` (:func:`~squeezer.exporters.onnx.nodes.matmul_integer_u8`, the form of
  integer Linear layers); each state on its grid: ``QuantizeLinear`` / ``DequantizeLinear`` (uint8) for a
  full-range 8-bit grid, else (the int16 ``gates``, ``candidate``, ``c``: ONNX's int16 ``QuantizeLinear``
  needs opset 21, past the exporter's) float arithmetic ``(clip(round(t / S) + Z, qmin, qmax) - Z) S``,
  the same numbers. Matrices without int8 codes are refused by name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ...errors import ConfigError
from ...modules import QuantLSTM, QuantRecurrent, quant_layers
from ...modules.base import QuantMixin
from ...modules.recurrent_steps import run_recurrent
from ...quant.core import QTensor, rows_qparams
from ...quant.formats import INT8_WEIGHTS, weight_format
from ...quant.spec import PerChannel, PerTensor
from ..base import ExportReport
from ..qdq_recurrent import StateGrid, float_skeleton, static_state_grids
from .nodes import carries_codes, const, dequantize_codes, matmul_integer_u8, scalar, uint8_codes

ONNX_GATES = {"LSTM": [0, 3, 1, 2], "GRU": [1, 0, 2], "RNN": [0]}
"""ONNX's gate order as indices of torch's: LSTM torch ``i f g o`` -> ONNX ``i o f c``; GRU ``r z n`` -> ``z r h``."""


def _gate_rows(t: Tensor, gates: list[int]) -> Tensor:
    """Torch's gate blocks along axis 0 (``(G H, ...)``) in ONNX's order."""
    blocks = t.reshape(len(gates), -1, *t.shape[1:])
    return blocks[gates].reshape(t.shape)


def _per_row(qt: QTensor) -> Tensor:
    """The matrix's scale per row ``(G H,)`` (a per-matrix scale repeated)."""
    return qt.qparams.scale.float().reshape(-1).expand(qt.codes.shape[0]).contiguous()


def _gate_order(qt: QTensor, gates: list[int]) -> QTensor | None:
    """``qt``'s rows in ONNX's gate order (codes and their parameters); None when its parameters are not per row."""
    rows = _gate_rows(torch.arange(qt.codes.shape[0]), gates)
    qparams = rows_qparams(qt.qparams, qt.spec.granularity, rows)
    return None if qparams is None else QTensor(qt.codes[rows], qparams, qt.spec)


def _suffixes(layer: QuantRecurrent) -> list[str]:
    return ["", "_reverse"] if layer.bidirectional else [""]


def _onnx_bias(layer: QuantRecurrent, index: int, gates: list[int]) -> Tensor | None:
    """ONNX's ``B (D, 2 G H)`` of layer ``index``: ``[b_ih, b_hh]`` per direction in ONNX's gate order, or None."""
    if not layer.bias:
        return None
    return torch.stack([torch.cat([_gate_rows(getattr(layer, f"{b}_l{index}{s}").detach().float(), gates)
                                   for b in ("bias_ih", "bias_hh")]) for s in _suffixes(layer)])


@dataclass
class LstmTensors:
    """``DynamicQuantizeLSTM`` inputs of one layer (``D`` directions): ``W (D, in, 4H)`` and ``R (D, H, 4H)``
    uint8 codes ``q^T + 128``, scales ``(D, 4H)``, zero points ``(D, 4H)`` (128), bias ``(D, 8H)`` or None."""

    w: Tensor
    r: Tensor
    w_scale: Tensor
    r_scale: Tensor
    zero: Tensor
    bias: Tensor | None


def lstm_tensors(layer: QuantLSTM, index: int) -> LstmTensors:
    """Layer ``index``'s matrices in ONNX's layout: gates ``i o f c``, transposed, directions stacked."""
    qts = layer.matrix_qtensors()
    gates = ONNX_GATES["LSTM"]
    codes = lambda name: torch.stack([uint8_codes(_gate_rows(qts[f"{name}_l{index}{s}"].codes, gates)).t()  # noqa: E731
                                      for s in _suffixes(layer)])
    scales = lambda name: torch.stack([_gate_rows(_per_row(qts[f"{name}_l{index}{s}"]), gates)  # noqa: E731
                                       for s in _suffixes(layer)])
    w_scale = scales("weight_ih")
    return LstmTensors(codes("weight_ih").contiguous(), codes("weight_hh").contiguous(), w_scale, scales("weight_hh"),
                       torch.full(w_scale.shape, 128, dtype=torch.uint8), _onnx_bias(layer, index, gates))


def _ints(g: Any, values: list[int]) -> Any:
    return const(g, torch.tensor(values, dtype=torch.int64))


def _absent(g: Any) -> Any:
    """An omitted optional input (an empty name in the node's input list)."""
    value = g.op("prim::Constant")
    value.setType(torch._C.OptionalType.ofTensor())
    return value


LayerNodes = Callable[[Any, Any, int, list[Any]], tuple[Any, ...]]
"""``(g, x (T, N, in), layer index, initial states (h[, c]) of that layer) -> (Y (T, D, N, H), h_n[, c_n])``."""


def _layers_symbolic(g: Any, x: Any, states: list[Any], layer: QuantRecurrent, nodes: LayerNodes) -> tuple[Any, ...]:
    """``num_layers`` recurrent nodes (``nodes``), each output ``Y (T, D, N, H)`` reshaped to the next input
    ``(T, N, D H)``; ``batch_first`` by transposes around them; the final states concatenated over layers.
    ``states``: the given initial states ``(L D, N, H)`` (h, and c for an LSTM), None where not given."""
    d = len(_suffixes(layer))
    if layer.batch_first:
        x = g.op("Transpose", x, perm_i=[1, 0, 2])
    finals: list[list[Any]] = [[] for _ in states]
    for k in range(layer.num_layers):
        initial = [_absent(g) if s is None else
                   g.op("Slice", s, _ints(g, [k * d]), _ints(g, [(k + 1) * d]), _ints(g, [0])) for s in states]
        y, *ends = nodes(g, x, k, initial)
        x = g.op("Reshape", g.op("Transpose", y, perm_i=[0, 2, 1, 3]), _ints(g, [0, 0, -1]))
        for parts, end in zip(finals, ends):
            parts.append(end)
    if layer.batch_first:
        x = g.op("Transpose", x, perm_i=[1, 0, 2])
    return x, *(p[0] if len(p) == 1 else g.op("Concat", *p, axis_i=0) for p in finals)


def _direction(layer: QuantRecurrent) -> str:
    return "bidirectional" if layer.bidirectional else "forward"


def _dynamic_lstm_nodes(layer: QuantLSTM) -> LayerNodes:
    """One ``DynamicQuantizeLSTM`` per layer on :func:`lstm_tensors`."""

    def nodes(g: Any, x: Any, k: int, initial: list[Any]) -> tuple[Any, ...]:
        t = lstm_tensors(layer, k)
        inputs = [x, const(g, t.w), const(g, t.r), _absent(g) if t.bias is None else const(g, t.bias),
                  _absent(g), *initial,
                  _absent(g), const(g, t.w_scale), const(g, t.zero), const(g, t.r_scale), const(g, t.zero)]
        return g.op("com.microsoft::DynamicQuantizeLSTM", *inputs, hidden_size_i=layer.hidden_size,
                    direction_s=_direction(layer), outputs=3)

    return nodes


def _dequantized_nodes(layer: QuantRecurrent, qts: dict[str, QTensor]) -> LayerNodes:
    """One ONNX ``LSTM`` / ``GRU`` / ``RNN`` per layer whose ``W`` / ``R`` are ``DequantizeLinear`` of the codes
    ``qts`` already in ONNX's gate order (:func:`~squeezer.exporters.onnx.nodes.dequantize_codes`, one per
    matrix and direction, stacked to ``(D, G H, K)``); ``B`` float."""
    op = layer.float_class.__name__.upper()
    attrs: dict[str, Any] = {"hidden_size_i": layer.hidden_size, "direction_s": _direction(layer)}
    if op == "GRU":
        attrs["linear_before_reset_i"] = 1  # torch's n = tanh(W_in x + b_in + r (W_hn h + b_hn))
    if op == "RNN":
        attrs["activations_s"] = [layer.nonlinearity.capitalize()] * len(_suffixes(layer))

    def stacked(g: Any, name: str) -> Any:
        parts = [g.op("Reshape", dequantize_codes(g, qts[f"{name}{s}"]), _ints(g, [1, *qts[f"{name}{s}"].codes.shape]))
                 for s in _suffixes(layer)]
        return parts[0] if len(parts) == 1 else g.op("Concat", *parts, axis_i=0)

    def nodes(g: Any, x: Any, k: int, initial: list[Any]) -> tuple[Any, ...]:
        bias = _onnx_bias(layer, k, ONNX_GATES[op])
        inputs = [x, stacked(g, f"weight_ih_l{k}"), stacked(g, f"weight_hh_l{k}"),
                  _absent(g) if bias is None else const(g, bias), _absent(g), *initial]
        return g.op(op, *inputs, outputs=len(initial) + 1, **attrs)

    return nodes


class _RecurrentOp(torch.autograd.Function):
    """Runs squeezer's layer for tracing; ``symbolic`` writes its nodes (:func:`_layers_symbolic`)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, h0: Tensor | None, c0: Tensor | None,  # type: ignore[override]
                layer: QuantRecurrent, nodes: LayerNodes) -> tuple[Tensor, ...]:
        tracing = torch._C._get_tracing_state()
        torch._C._set_tracing_state(None)  # the symbolic below stands for this computation
        try:
            with torch.no_grad():
                hx = h0 if h0 is None or not isinstance(layer, QuantLSTM) else (h0, c0)
                y, ends = type(layer).forward(layer, x, hx)
            return tuple(t.detach() for t in (y, *(ends if isinstance(ends, tuple) else (ends,))))
        finally:
            torch._C._set_tracing_state(tracing)

    @staticmethod
    def symbolic(g: Any, x: Any, h0: Any, c0: Any, layer: QuantRecurrent, nodes: LayerNodes) -> tuple[Any, ...]:
        none = lambda v: v is None or (hasattr(v, "node") and v.node().mustBeNone())  # noqa: E731
        states = [h0, c0] if isinstance(layer, QuantLSTM) else [h0]
        return _layers_symbolic(g, x, [None if none(s) else s for s in states], layer, nodes)


def _op_forward(layer: QuantRecurrent, nodes: LayerNodes) -> Callable[..., Any]:
    """The layer's ``forward(input, hx)`` as one :class:`_RecurrentOp` writing ``nodes``."""
    lstm = isinstance(layer, QuantLSTM)

    def forward(input: Tensor, hx: Any = None) -> Any:
        h0, c0 = (None, None) if hx is None else (hx if lstm else (hx, None))
        y, *ends = _RecurrentOp.apply(input, h0, c0, layer, nodes)
        return y, (tuple(ends) if lstm else ends[0])

    return forward


def _onnx_codes(layer: QuantRecurrent) -> dict[str, QTensor] | None:
    """The layer's matrices in ONNX's gate order when :func:`~squeezer.exporters.onnx.nodes.dequantize_codes` can
    carry every one of them, else None."""
    gates = ONNX_GATES[layer.float_class.__name__.upper()]
    ordered = {n: _gate_order(qt, gates) for n, qt in layer.matrix_qtensors().items()}
    return ordered if all(qt is not None and carries_codes(qt) for qt in ordered.values()) else None


def _dynamic_int8_lstm(layer: QuantMixin) -> bool:
    """Whether ``layer`` is written as ``DynamicQuantizeLSTM``: an LSTM with dynamic activations whose
    matrices have int8 codes per row or per matrix."""
    spec = layer.weight_spec
    return (isinstance(layer, QuantLSTM) and layer.scheme.activation_mode == "dynamic" and not layer.proj_size
            and isinstance(spec.granularity, (PerChannel, PerTensor)) and weight_format(spec) in INT8_WEIGHTS)


def uses_contrib_ops(model: nn.Module) -> bool:
    """Whether the export of ``model`` writes ``com.microsoft`` recurrent ops."""
    return any(_dynamic_int8_lstm(layer) for layer in quant_layers(model).values())


def recurrent_forward(layer: QuantRecurrent, name: str, report: ExportReport) -> Callable[..., Any]:
    """The ``forward`` a recurrent layer runs while being exported (static: the unrolled integer step loop;
    ``DynamicQuantizeLSTM``, or torch's op on ``W^``: :func:`dequantized_twin`), with ``report`` told what it
    becomes; refuses what ONNX cannot carry, naming the layer."""
    cell = layer.float_class.__name__
    mode = layer.scheme.activation_mode
    if mode == "static":
        return _static_forward(layer, name, report)
    if getattr(layer, "proj_size", 0):
        raise ConfigError(f"layer {name!r}: ONNX has no LSTM with projections (proj_size={layer.proj_size}): "
                          f"quantize with ignore=[{name!r}] and export without proj_size, or keep it simulated")
    if _dynamic_int8_lstm(layer):
        report.layers[name] = f"DynamicQuantizeLSTM (int8 codes of {layer.weight_spec.describe()}, uint8 + 128)"
        report.warnings.append(f"layer {name!r}: ONNX Runtime's DynamicQuantizeLSTM quantizes the input sequence "
                               "and each h_(t-1) as one asymmetric uint8 tensor, not with squeezer's "
                               f"{layer.act_spec and layer.act_spec.describe()} activations")
        return _op_forward(layer, _dynamic_lstm_nodes(layer))
    if mode == "dynamic":
        report.warnings.append(f"layer {name!r}: ONNX Runtime has no dynamic quantized {cell}; its activations run "
                               "in float (squeezer's dynamic activation quantization is not in the file)")
    qts = _onnx_codes(layer)
    if qts is not None:
        dtypes = sorted({str(qt.codes.dtype).removeprefix("torch.") for qt in qts.values()})
        report.layers[name] = (f"{cell} (DequantizeLinear of {'/'.join(dtypes)} codes of "
                               f"{layer.weight_spec.describe()}, float biases)")
        return _op_forward(layer, _dequantized_nodes(layer, qts))
    report.layers[name] = f"{cell} (dequantized {layer.weight_spec.describe()} weights)"
    report.warnings.append(f"layer {name!r}: recurrent weights of this format (codebook, more than 8 bits or not per "
                           "tensor / row / group) have no ONNX integer form here; stored as float")
    return dequantized_twin(layer).forward  # a method, not a module (which would become a submodule)


def dequantized_twin(layer: QuantRecurrent) -> nn.RNNBase:
    """The torch layer of ``layer``'s options on its dequantized matrices ``W^`` and float biases (torch's own
    op, which the ONNX exporter writes as ``LSTM`` / ``GRU`` / ``RNN``)."""
    twin = float_skeleton(layer, device="cpu")
    values = {**{n: p.detach() for n, p in layer.named_parameters(recurse=False)}, **layer.quantized_matrices()}
    with torch.no_grad():
        for n, p in twin.named_parameters():
            p.copy_(values[n]).requires_grad_(False)  # traced as constants
    return twin


def _on_grid(g: Any, t: Any, grid: StateGrid) -> Any:
    """``t`` on a static state grid ``(S, Z, qmin, qmax)`` (signed codes): ``QuantizeLinear`` / ``DequantizeLinear``
    uint8 (``Z + 128``) when the grid is the whole int8 range, else ``(clip(round(t / S) + Z, qmin, qmax) - Z) S``."""
    scale, zero, qmin, qmax = grid
    if (qmin, qmax) == (-128, 127):
        s, z = scalar(g, scale), scalar(g, zero + 128, torch.uint8)
        return g.op("DequantizeLinear", g.op("QuantizeLinear", t, s, z), s, z)
    q = g.op("Clip", g.op("Add", g.op("Round", g.op("Div", t, scalar(g, scale))), scalar(g, float(zero))),
             scalar(g, float(qmin)), scalar(g, float(qmax)))
    return g.op("Mul", g.op("Sub", q, scalar(g, float(zero))), scalar(g, scale))


@dataclass(frozen=True, eq=False)
class _StaticLayer:
    """A static recurrent layer being exported: its module, state grids and the int8 codes of its matrices."""

    layer: QuantRecurrent
    grids: dict[str, dict[str, StateGrid]]
    matrices: dict[str, QTensor]


class _StateOp(torch.autograd.Function):
    """``state`` ``name`` of ``key`` on its grid: squeezer's fake quantization for tracing;
    ``symbolic``: :func:`_on_grid`."""

    @staticmethod
    def forward(ctx: Any, t: Tensor, static: _StaticLayer, name: str, key: str) -> Tensor:  # type: ignore[override]
        tracing = torch._C._get_tracing_state()
        torch._C._set_tracing_state(None)  # the symbolic below stands for this computation
        try:
            with torch.no_grad():
                return static.layer.quantize_state(name, key, t).detach()
        finally:
            torch._C._set_tracing_state(tracing)

    @staticmethod
    def symbolic(g: Any, t: Any, static: _StaticLayer, name: str, key: str) -> Any:
        return _on_grid(g, t, static.grids[key][name])


class _ProductOp(torch.autograd.Function):
    """``x W^T + b`` of matrix ``matrix`` on ``x`` already on the grid of state ``name``: ``F.linear`` for tracing;
    ``symbolic``: ``QuantizeLinear`` (uint8) + ``MatMulInteger`` + scales + bias."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, static: _StaticLayer, matrix: str, name: str,  # type: ignore[override]
                key: str) -> Tensor:
        tracing = torch._C._get_tracing_state()
        torch._C._set_tracing_state(None)
        try:
            with torch.no_grad():
                bias = getattr(static.layer, matrix.replace("weight", "bias"), None)
                return torch.nn.functional.linear(x, static.matrices[matrix].dequantize().to(x.dtype), bias).detach()
        finally:
            torch._C._set_tracing_state(tracing)

    @staticmethod
    def symbolic(g: Any, x: Any, static: _StaticLayer, matrix: str, name: str, key: str) -> Any:
        scale, zero, _, _ = static.grids[key][name]
        s, z = scalar(g, scale), scalar(g, zero + 128, torch.uint8)
        bias = getattr(static.layer, matrix.replace("weight", "bias"), None)
        return matmul_integer_u8(g, g.op("QuantizeLinear", x, s, z), s, z, static.matrices[matrix],
                                 None if bias is None else const(g, bias.detach().float()))


class StaticOnnxOps:
    """:class:`~squeezer.modules.recurrent_steps.StepOps` of a static layer whose products and state hooks
    trace into ONNX's integer nodes (:class:`_ProductOp`, :class:`_StateOp`)."""

    def __init__(self, static: _StaticLayer) -> None:
        self.static = static

    def input_projection(self, key: str, x: Tensor) -> Tensor:
        return _ProductOp.apply(x, self.static, f"weight_ih_{key}", "x", key)

    def hidden_projection(self, key: str, h: Tensor) -> Tensor:
        return _ProductOp.apply(h, self.static, f"weight_hh_{key}", "h", key)

    def output_projection(self, key: str, h: Tensor) -> Tensor:
        return _ProductOp.apply(h, self.static, f"weight_hr_{key}", "m", key)

    def state(self, name: str, key: str, t: Tensor) -> Tensor:
        return _StateOp.apply(t, self.static, name, key)


def _integer_matrices(layer: QuantRecurrent, name: str) -> dict[str, QTensor]:
    """The layer's matrices, each with symmetric signed codes of <= 8 bits per row or per matrix (the int8
    operand of ``MatMulInteger``); else a :class:`ConfigError` naming the layer and the matrix."""
    qts = layer.matrix_qtensors()
    for matrix, qt in qts.items():
        fmt = weight_format(qt.spec, qt.qparams.levels)
        if fmt not in INT8_WEIGHTS or qt.spec.mapping != "uniform" or \
                not isinstance(qt.spec.granularity, (PerChannel, PerTensor)):
            raise ConfigError(f"layer {name!r}: matrix {matrix} has format {fmt} ({qt.spec.describe()}); a "
                              f"{type(layer).__name__} with static activations is exported to ONNX on int8 codes "
                              "per row or per matrix only: quantize it with w8a8-static, or export it to TFLite / "
                              "ExecuTorch")
    return qts


def _static_forward(layer: QuantRecurrent, name: str, report: ExportReport) -> Callable[..., Any]:
    """The unrolled integer step loop of a static layer (:class:`StaticOnnxOps`), with ``report`` told."""
    static = _StaticLayer(layer, static_state_grids(layer, name), _integer_matrices(layer, name))
    cell = layer.float_class.__name__
    states = ", ".join(dict.fromkeys(s for grids in static.grids.values() for s in grids))
    report.layers[name] = (f"{cell} unrolled (MatMulInteger on int8 codes of {layer.weight_spec.describe()}, "
                           f"static states {states})")
    report.warnings.append(f"layer {name!r}: {cell} unrolled over the time steps of the example input: the ONNX "
                           "file takes that sequence length only")
    skeleton = float_skeleton(layer)

    def forward(input: Tensor, hx: Any = None) -> Any:
        return run_recurrent(skeleton, StaticOnnxOps(static), input, hx)

    return forward

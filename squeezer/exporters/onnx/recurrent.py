"""Recurrent layers (:class:`~squeezer.modules.QuantRecurrent`) in ONNX.

* weight-only: torch's own ``LSTM`` / ``GRU`` / ``RNN`` ops with the dequantized matrices ``W^`` as float
  initializers (ONNX has no integer form of these ops' weights; a warning says so). Every torch option
  maps onto them (layers, bidirectional, batch_first, a given initial state) but ``proj_size``, which
  ONNX's ``LSTM`` lacks: refused by name.
* dynamic int8 LSTM (``w8a8``, ``w8a8-tensor``): one ``com.microsoft.DynamicQuantizeLSTM`` per layer
  (:func:`lstm_tensors`) holding squeezer's int8 codes of ``W_ih`` / ``W_hh`` (per gate row or per
  matrix) and their scales. ONNX Runtime quantizes the activations itself: the input sequence as one
  asymmetric uint8 tensor, ``h_{t-1}`` per step as one asymmetric uint8 tensor (``scale = (max(x, 0) -
  min(x, 0)) / 255``); squeezer's activation grid is not the kernel's (a warning says so).
  The codes are stored as uint8 ``q + 128`` with zero point 128 so that its GEMMs are u8 x u8
  (exact on every CPU; a u8 x s8 GEMM saturates int16 pair sums on x86 without VNNI).
* dynamic GRU / RNN: ONNX Runtime has no dynamic quantized op for them; written as weight-only
  (the ``GRU`` / ``RNN`` op on ``W^``, float activations), with a warning.
* static activations: refused by name (no ONNX form of calibrated state grids here).
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
from ...quant.core import QTensor
from ...quant.formats import INT8_WEIGHTS, weight_format
from ...quant.spec import PerChannel, PerTensor
from ..base import ExportReport
from ..qdq_recurrent import float_skeleton

ONNX_GATES = {"LSTM": [0, 3, 1, 2], "GRU": [1, 0, 2], "RNN": [0]}
"""ONNX's gate order as indices of torch's: LSTM torch ``i f g o`` -> ONNX ``i o f c``; GRU ``r z n`` -> ``z r h``."""


def _gate_rows(t: Tensor, gates: list[int]) -> Tensor:
    """Torch's gate blocks along axis 0 (``(G H, ...)``) in ONNX's order."""
    blocks = t.reshape(len(gates), -1, *t.shape[1:])
    return blocks[gates].reshape(t.shape)


def _per_row(qt: QTensor) -> Tensor:
    """The matrix's scale per row ``(G H,)`` (a per-matrix scale repeated)."""
    return qt.qparams.scale.float().reshape(-1).expand(qt.codes.shape[0]).contiguous()


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
    suffixes = ["", "_reverse"] if layer.bidirectional else [""]
    codes = lambda name: torch.stack([uint8_codes(_gate_rows(qts[f"{name}_l{index}{s}"].codes, gates)).t()  # noqa: E731
                                      for s in suffixes])
    scales = lambda name: torch.stack([_gate_rows(_per_row(qts[f"{name}_l{index}{s}"]), gates)  # noqa: E731
                                       for s in suffixes])
    bias = None
    if layer.bias:
        bias = torch.stack([torch.cat([_gate_rows(getattr(layer, f"{b}_l{index}{s}").detach().float(), gates)
                                       for b in ("bias_ih", "bias_hh")]) for s in suffixes])
    w_scale = scales("weight_ih")
    return LstmTensors(codes("weight_ih").contiguous(), codes("weight_hh").contiguous(), w_scale, scales("weight_hh"),
                       torch.full(w_scale.shape, 128, dtype=torch.uint8), bias)


def _ints(g: Any, values: list[int]) -> Any:
    return const(g, torch.tensor(values, dtype=torch.int64))


def _absent(g: Any) -> Any:
    """An omitted optional input (an empty name in the node's input list)."""
    value = g.op("prim::Constant")
    value.setType(torch._C.OptionalType.ofTensor())
    return value


def _lstm_symbolic(g: Any, x: Any, h0: Any, c0: Any, layer: QuantLSTM) -> tuple[Any, Any, Any]:
    """``num_layers`` ``DynamicQuantizeLSTM`` nodes, each output ``Y (T, D, N, H)`` reshaped to the next
    input ``(T, N, D H)``; ``batch_first`` by transposes around them; ``h_n`` / ``c_n`` concatenated."""
    d, hidden = 2 if layer.bidirectional else 1, layer.hidden_size
    if layer.batch_first:
        x = g.op("Transpose", x, perm_i=[1, 0, 2])
    hs, cs = [], []
    for k in range(layer.num_layers):
        t = lstm_tensors(layer, k)
        state = []
        for s in (h0, c0):
            state.append(_absent(g) if s is None else g.op("Slice", s, _ints(g, [k * d]), _ints(g, [(k + 1) * d]), _ints(g, [0])))
        inputs = [x, const(g, t.w), const(g, t.r), _absent(g) if t.bias is None else const(g, t.bias),
                  _absent(g), *state,
                  _absent(g), const(g, t.w_scale), const(g, t.zero), const(g, t.r_scale), const(g, t.zero)]
        y, h, c = g.op("com.microsoft::DynamicQuantizeLSTM", *inputs, hidden_size_i=hidden,
                       direction_s="bidirectional" if d == 2 else "forward", outputs=3)
        x = g.op("Reshape", g.op("Transpose", y, perm_i=[0, 2, 1, 3]), _ints(g, [0, 0, d * hidden]))
        hs.append(h)
        cs.append(c)
    if layer.batch_first:
        x = g.op("Transpose", x, perm_i=[1, 0, 2])
    concat = lambda parts: parts[0] if len(parts) == 1 else g.op("Concat", *parts, axis_i=0)  # noqa: E731
    return x, concat(hs), concat(cs)


class _DynamicLstmOp(torch.autograd.Function):
    """Runs squeezer's LSTM for tracing; ``symbolic`` writes its ``DynamicQuantizeLSTM`` nodes."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, h0: Tensor | None, c0: Tensor | None,  # type: ignore[override]
                layer: QuantLSTM) -> tuple[Tensor, Tensor, Tensor]:
        tracing = torch._C._get_tracing_state()
        torch._C._set_tracing_state(None)  # the symbolic below stands for this computation
        try:
            with torch.no_grad():
                y, (h, c) = type(layer).forward(layer, x, None if h0 is None else (h0, c0))
            return y.detach(), h.detach(), c.detach()
        finally:
            torch._C._set_tracing_state(tracing)

    @staticmethod
    def symbolic(g: Any, x: Any, h0: Any, c0: Any, layer: QuantLSTM) -> tuple[Any, Any, Any]:
        none = lambda v: v is None or (hasattr(v, "node") and v.node().mustBeNone())  # noqa: E731
        return _lstm_symbolic(g, x, None if none(h0) else h0, None if none(c0) else c0, layer)


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
    """The ``forward`` a recurrent layer runs while being exported (``DynamicQuantizeLSTM``, or torch's op on
    ``W^``: :func:`dequantized_twin`), with ``report`` told what it becomes; refuses what ONNX cannot carry,
    naming the layer."""
    cell = layer.float_class.__name__
    mode = layer.scheme.activation_mode
    if getattr(layer, "proj_size", 0):
        raise ConfigError(f"layer {name!r}: ONNX has no LSTM with projections (proj_size={layer.proj_size}): "
                          f"quantize with ignore=[{name!r}] and export without proj_size, or keep it simulated")
    if mode == "static":
        raise ConfigError(f"layer {name!r}: a {type(layer).__name__} with static activations has no ONNX form; "
                          "export it to TFLite / ExecuTorch (unrolled integer steps), or quantize it with a "
                          "weight-only or dynamic preset")
    if _dynamic_int8_lstm(layer):
        report.layers[name] = f"DynamicQuantizeLSTM (int8 codes of {layer.weight_spec.describe()}, uint8 + 128)"
        report.warnings.append(f"layer {name!r}: ONNX Runtime's DynamicQuantizeLSTM quantizes the input sequence "
                               "and each h_(t-1) as one asymmetric uint8 tensor, not with squeezer's "
                               f"{layer.act_spec and layer.act_spec.describe()} activations")

        def forward(input: Tensor, hx: tuple[Tensor, Tensor] | None = None) -> Any:
            h0, c0 = (None, None) if hx is None else hx
            y, h, c = _DynamicLstmOp.apply(input, h0, c0, layer)
            return y, (h, c)

        return forward
    report.layers[name] = f"{cell} (dequantized {layer.weight_spec.describe()} weights)"
    report.warnings.append(f"layer {name!r}: recurrent weights have no ONNX integer form; stored as float")
    if mode == "dynamic":
        report.warnings.append(f"layer {name!r}: ONNX Runtime has no dynamic quantized {cell}; its activations run "
                               "in float (squeezer's dynamic activation quantization is not in the file)")
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

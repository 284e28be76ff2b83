"""Recurrent layers (:class:`~squeezer.modules.QuantRecurrent`) in the QDQ form of the ``torch.export``-based formats.

A :class:`QdqRecurrent` runs :func:`~squeezer.modules.recurrent_steps.run_recurrent` (the explicit step loop)
with :class:`QdqStepOps`: every product is ``F.linear(x, dequantize(q, S), b)`` on squeezer's int8 codes of that
matrix (per gate row or per matrix, as :func:`~squeezer.exporters.qdq.int8_codes`; ``fold_weight``: the float
``W^`` quantized in the graph, for a converter to fold), and each state hook applies the layer's static grid
(``dequantize(quantize(t))``, int8 or int16) where it has one. ``torch.export`` unrolls the loop: the graph
holds one input projection per layer and direction and one hidden projection per step, for the sequence
length of the example input (a fixed length: another length is refused by the runtime's shape check).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..modules import QuantRecurrent
from ..modules.recurrent_steps import layer_keys, run_recurrent
from ..quant.formats import INT8_WEIGHTS, weight_format
from .base import ExportReport
from .qdq import Int8Weight, Unsupported, dequantize_codes, int8_codes, qd

StateGrid = tuple[float, int, int, int]
"""A static state grid ``(scale, zero, qmin, qmax)`` on int8 or int16 codes."""
StateGrids = dict[str, dict[str, StateGrid]]
"""``{key: {state: grid}}``, ``key`` = ``l0``, ``l0_reverse``, ... (as :attr:`QuantRecurrent.state_qparams`)."""


def static_state_grids(layer: QuantRecurrent, name: str) -> StateGrids:
    """The layer's calibrated state grids on signed codes: an unsigned 8-bit grid (codes 0..255, zero ``Z``)
    as int8 ``[-128, 127]`` with zero ``Z - 128`` (the same real values)."""
    if not layer.activations_calibrated:
        raise ConfigError(f"layer {name!r}: static activations are not calibrated")
    grids: StateGrids = {}
    for key, states in layer.state_qparams.items():
        for state, qp in states.items():
            spec = layer.state_spec(state)
            zero = 0 if qp.zero_point is None else int(qp.zero_point.reshape(-1)[0])
            shift = 0 if spec.signed else 2 ** (spec.bits - 1)
            grids.setdefault(key, {})[state] = (float(qp.scale.reshape(-1)[0]), zero - shift,
                                                spec.qmin - shift, spec.qmax - shift)
    return grids


def float_skeleton(layer: QuantRecurrent, device: str = "meta") -> nn.RNNBase:
    """A torch layer with ``layer``'s options (eval mode), its parameters uninitialized on ``device`` (``meta``: no
    weights, what :func:`run_recurrent` reads: cell kind, sizes, options, the input checks)."""
    options: dict[str, Any] = {"num_layers": layer.num_layers, "bias": layer.bias, "batch_first": layer.batch_first,
                               "dropout": layer.dropout, "bidirectional": layer.bidirectional, "device": device}
    if layer.rnn_mode == "LSTM":
        options["proj_size"] = layer.proj_size
    elif layer.rnn_mode.startswith("RNN"):
        options["nonlinearity"] = layer.nonlinearity
    return layer.float_class(layer.input_size, layer.hidden_size, **options).eval()


def fake_quant_state(t: Tensor, grid: StateGrid) -> Tensor:
    """``dequantize(quantize(t))`` per tensor on ``grid`` (int8 or int16 codes)."""
    scale, zero, qmin, qmax = grid
    dtype = torch.int8 if qmin >= -128 else torch.int16
    q = qd().quantize_per_tensor(t, scale, zero, qmin, qmax, dtype)
    return qd().dequantize_per_tensor(q, scale, zero, qmin, qmax, dtype)


class QdqStepOps(nn.Module):
    """:class:`~squeezer.modules.recurrent_steps.StepOps` on stored matrices: for each ``weight_*`` name, the
    buffer ``name`` (int8 codes, or the float ``W^`` when ``fold_weight`` or when it has no int8 form) and
    ``name_scale`` (``(rows,)`` per row, ``()`` per matrix; None: ``W^`` in float32); biases as buffers."""

    def __init__(self, layer: QuantRecurrent, weights: dict[str, Int8Weight | None], fold_weight: bool,
                 grids: StateGrids) -> None:
        super().__init__()
        self.fold_weight, self.grids = fold_weight, grids
        self.tensor_scales: dict[str, float] = {}
        self.zero_start: set[str] = set()  # keys whose next hidden projection is of h0 = 0 (no hx given)
        quantized = layer.quantized_matrices()
        for name, weight in weights.items():
            if weight is None:
                self.register_buffer(name, quantized[name].detach().float().clone())
                self.register_buffer(f"{name}_scale", None)
                continue
            per_row = weight.scale.dim() == 1
            stored = weight.codes.float() * weight.scale.reshape(-1, 1) if fold_weight and per_row else \
                weight.codes.float() * weight.scale if fold_weight else weight.codes
            self.register_buffer(name, stored.contiguous())
            self.register_buffer(f"{name}_scale", weight.scale)
            self.register_buffer(f"{name}_zero", torch.zeros(weight.scale.shape, dtype=torch.int64))
            self.tensor_scales[name] = 0.0 if per_row else float(weight.scale)
        for name, p in layer.named_parameters(recurse=False):
            if name.startswith("bias"):
                self.register_buffer(name, p.detach().float().clone())

    def matrix(self, name: str) -> Tensor:
        """``W^`` of matrix ``name`` in the graph: ``dequantize(q, S)``, or the stored float32 ``W^``."""
        scale = getattr(self, f"{name}_scale")
        if scale is None:
            return getattr(self, name)
        return dequantize_codes(getattr(self, name), scale, getattr(self, f"{name}_zero"), self.tensor_scales[name],
                                self.fold_weight)

    def _bias(self, name: str) -> Tensor | None:
        return getattr(self, name, None)

    def input_projection(self, key: str, x: Tensor) -> Tensor:
        return F.linear(x, self.matrix(f"weight_ih_{key}"), self._bias(f"bias_ih_{key}"))

    def hidden_projection(self, key: str, h: Tensor) -> Tensor:
        """``h W_hh^T + b_hh``; for the first step from a zero state, ``b_hh`` alone (no product with a
        constant zero state, which a converter would fold into a constant integer input of the GEMM)."""
        bias = self._bias(f"bias_hh_{key}")
        if key in self.zero_start:
            self.zero_start.discard(key)
            rows = getattr(self, f"weight_hh_{key}").shape[0]
            return (h.new_zeros(rows) if bias is None else bias).expand(h.shape[0], rows)
        return F.linear(h, self.matrix(f"weight_hh_{key}"), bias)

    def weight_scales(self) -> list[Tensor]:
        """The scales of the matrices stored as int8 codes."""
        return [b for n, b in self.named_buffers() if n.endswith("_scale")]

    def output_projection(self, key: str, h: Tensor) -> Tensor:
        return F.linear(h, self.matrix(f"weight_hr_{key}"))

    def state(self, name: str, key: str, t: Tensor) -> Tensor:
        grid = self.grids.get(key, {}).get(name)
        return t if grid is None else fake_quant_state(t, grid)


class QdqRecurrent(nn.Module):
    """A squeezer recurrent layer in QDQ form: ``run_recurrent(skeleton, QdqStepOps, input, hx)``, the layer's
    ``(output, h_n)`` (LSTM: ``(output, (h_n, c_n))``)."""

    def __init__(self, layer: QuantRecurrent, weights: dict[str, Int8Weight | None], *, fold_weight: bool,
                 grids: StateGrids | None = None) -> None:
        super().__init__()
        self.ops = QdqStepOps(layer, weights, fold_weight, grids or {})
        self.__dict__["skeleton"] = float_skeleton(layer)  # options only: not a submodule, no parameters exported

    def forward(self, input: Tensor, hx: Any = None) -> Any:
        self.ops.zero_start = set(layer_keys(self.skeleton)) if hx is None else set()
        return run_recurrent(self.skeleton, self.ops, input, hx)


def recurrent_weights(layer: QuantRecurrent, name: str, backend: str, unsupported: Unsupported,
                      report: ExportReport) -> dict[str, Int8Weight | None]:
    """Each matrix's :func:`int8_codes`; a matrix without an int8 form is refused naming the layer and the
    matrix (``unsupported="error"``) or kept as float32 ``W^`` with a warning (``"float"``)."""
    if unsupported not in ("error", "float"):
        raise ConfigError(f"unsupported must be 'error' or 'float', got {unsupported!r}")
    weights = {}
    for matrix, qt in layer.matrix_qtensors().items():
        weights[matrix] = int8_codes(qt)
        if weights[matrix] is not None:
            continue
        fmt = weight_format(qt.spec, qt.qparams.levels)
        if unsupported == "error":
            raise ConfigError(f"layer {name!r}: matrix {matrix} has format {fmt} ({qt.spec.describe()}), which "
                              f"{backend} cannot store as int8; supported: {', '.join(sorted(INT8_WEIGHTS))}; quantize "
                              "it with an int8 preset, or pass unsupported='float' to store its dequantized weights "
                              "in float32")
        report.warnings.append(f"layer {name!r}: matrix {matrix} ({fmt}) has no {backend} int8 form; stored as float32")
    return weights


def qdq_recurrent(layer: QuantRecurrent, name: str, backend: str, unsupported: Unsupported, report: ExportReport,
                  *, fold_weight: bool, float_states: frozenset[str] = frozenset()) -> QdqRecurrent:
    """``layer`` as a :class:`QdqRecurrent` (:func:`recurrent_weights`; a static layer's state grids but those
    named in ``float_states``, left in float with a warning), with ``report`` told what it became. Dynamic activations are refused: their grids, computed per call, have no
    QDQ form here (ONNX's ``DynamicQuantizeLSTM`` carries them for an LSTM)."""
    if layer.scheme.activation_mode == "dynamic":
        raise ConfigError(f"layer {name!r}: a {type(layer).__name__} with dynamic activations has no {backend} form; "
                          "quantize it weight-only or with static activations (w8a8-static), or export it to ONNX")
    grids = static_state_grids(layer, name) if layer.scheme.activation_mode == "static" else None
    if grids is not None:
        dropped = sorted({s for g in grids.values() for s in g} & float_states)
        grids = {key: {s: g for s, g in states.items() if s not in float_states} for key, states in grids.items()}
        if dropped:
            report.warnings.append(f"layer {name!r}: state(s) {', '.join(dropped)} left in float in the {backend} "
                                   "file (its integer kernel of the nonlinearity that consumes them needs a grid "
                                   "on its output, which squeezer's model does not have)")
    weights = recurrent_weights(layer, name, backend, unsupported, report)
    stored = "int8 codes" if all(w is not None for w in weights.values()) else \
        "float32" if all(w is None for w in weights.values()) else "int8 codes / float32"
    states = f", static states {', '.join(sorted({s for g in grids.values() for s in g}))}" if grids else ""
    report.layers[name] = f"{layer.float_class.__name__} unrolled ({stored} of {layer.weight_spec.describe()}{states})"
    report.warnings.append(f"layer {name!r}: {layer.float_class.__name__} unrolled over the time steps of the example "
                           f"input: the {backend} file takes that sequence length only")
    return QdqRecurrent(layer, weights, fold_weight=fold_weight, grids=grids)

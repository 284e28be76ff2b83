"""Quantized ``nn.LSTM``, ``nn.GRU`` and ``nn.RNN`` (tanh / relu): weight-only, one :class:`QParams` per matrix.

A recurrent layer holds several weight matrices: ``weight_ih_l{k}{_reverse}`` (``(G H, in)``, ``G`` gates:
4 for LSTM, 3 for GRU, 1 for RNN), ``weight_hh_l{k}{_reverse}`` (``(G H, H_out)``) and, for an LSTM with
``proj_size``, ``weight_hr_l{k}{_reverse}`` (``(P, H)``). Each is quantized with the layer's weight spec on
its own grid (per output row = per gate row, or per group along its input), ``W^ = fq_w(W)``; biases stay float.

In ``simulate`` mode the torch layer's own forward runs with every ``W`` replaced by ``W^`` (its flat weight
list, which ``torch._VF.lstm`` / ``gru`` / ``rnn_tanh`` / ``rnn_relu`` read), so every torch option works as
is: ``num_layers``, ``bidirectional``, ``batch_first``, ``dropout``, ``proj_size``, packed sequences and a
given initial state. Activations are not quantized: a scheme with activations is refused
(:data:`WEIGHT_ONLY`), and :func:`squeezer.modules.swap_layers` leaves such a layer in float with that reason.

For the whole-layer figures every quantized layer has (reports, weight error), ``weight`` is all matrices
flattened and concatenated, ``quantized_weight()`` the same of ``W^``, and ``ensured_weight_qparams()``
the matrices' parameters concatenated (their count is what the packed size counts).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from ..errors import ConfigError
from ..quant.core import QParams, QTensor, compute_qparams, fake_quantize, quantize
from ..quant.scheme import LayerScheme
from .base import QuantMixin

WEIGHT_ONLY = "recurrent layers take weight-only schemes"
"""Why a recurrent layer is refused a scheme with activation quantization."""


def _concat(parts: list[Tensor | None]) -> Tensor | None:
    return None if parts[0] is None else torch.cat([p.reshape(-1) for p in parts])


class QuantRecurrent(QuantMixin):
    """Mixed in first into a subclass of a torch recurrent layer (``float_class``): ``y, h = rnn(x, h0; W^)``."""

    float_class: type[nn.RNNBase]
    _run_weights: list[Tensor | None] | None = None  # the flat weights of the run in progress (None: torch's own)

    @classmethod
    def from_float(cls, layer: nn.RNNBase, scheme: LayerScheme, copy: bool = True) -> "QuantRecurrent":
        """The layer with its attributes as they are and its parameters adopted: copies (``copy=True``) or the
        same storage. Raises :class:`ConfigError` for a scheme with activations."""
        if scheme.activation is not None:
            raise ConfigError(f"{type(layer).__name__}: {WEIGHT_ONLY}, got activations "
                              f"{scheme.activation.describe()} {scheme.activation_mode}")
        new = cls.__new__(cls)  # its registries (parameters, buffers, submodules, hooks) copied, not shared
        new.__dict__.update({k: type(v)(v) if isinstance(v, (dict, set)) else v for k, v in layer.__dict__.items()})
        own = (lambda t: t.detach().clone()) if copy else (lambda t: t.detach())
        for name, p in layer.named_parameters(recurse=False):
            new._parameters[name] = nn.Parameter(own(p), requires_grad=p.requires_grad)
        new.rnn_mode = layer.mode
        new._init_flat_weights()
        new._init_quant(scheme)
        return new

    def _init_quant(self, scheme: LayerScheme) -> None:
        super()._init_quant(scheme)
        self.matrix_qparams: dict[str, QParams] = {}
        self._fq_cache: dict[str, tuple[int, Tensor]] = {}  # name -> (W's version, fq_w(W))

    # ------------------------------------------------------------------ the matrices
    @property
    def matrix_names(self) -> tuple[str, ...]:
        """``weight_ih_l0``, ``weight_hh_l0``, ... in torch's flat-weight order."""
        return tuple(n for n in self._flat_weights_names if n.startswith("weight_"))

    def matrices(self) -> dict[str, nn.Parameter]:
        """Name -> float weight matrix ``W``."""
        return {n: self._parameters[n] for n in self.matrix_names}

    @property
    def weight(self) -> Tensor:  # type: ignore[override]
        """Every matrix flattened and concatenated, ``(sum numel,)`` (detached): the layer's weights as one."""
        return _concat([w.detach() for w in self.matrices().values()])

    def calibrate_weight(self, qparams: dict[str, QParams] | None = None) -> None:
        """Fix each matrix's parameters: given (name -> QParams) or round-to-nearest from the matrix."""
        self.matrix_qparams = dict(qparams) if qparams is not None else \
            {n: compute_qparams(w, self.weight_spec) for n, w in self.matrices().items()}
        self._fq_cache = {}

    def ensured_matrix_qparams(self) -> dict[str, QParams]:
        """Name -> the matrix's parameters; round-to-nearest when none were fixed yet."""
        if not self.matrix_qparams:
            self.calibrate_weight()
        return self.matrix_qparams

    def ensured_weight_qparams(self) -> QParams:
        """The matrices' parameters flattened and concatenated (what their packed size counts)."""
        qps = list(self.ensured_matrix_qparams().values())
        return QParams(_concat([q.scale for q in qps]), _concat([q.zero_point for q in qps]),
                       _concat([q.levels for q in qps]))

    def quantized_matrices(self) -> dict[str, Tensor]:
        """Name -> ``fq_w(W)``, STE gradients while ``W`` trains, else cached while ``W`` is unchanged."""
        qps = self.ensured_matrix_qparams()
        out: dict[str, Tensor] = {}
        for name, w in self.matrices().items():
            if w.requires_grad and torch.is_grad_enabled():
                out[name] = fake_quantize(w, self.weight_spec, qps[name])
                continue
            cached = self._fq_cache.get(name)
            if cached is None or cached[0] != w._version:
                cached = (w._version, fake_quantize(w.detach(), self.weight_spec, qps[name]))
                self._fq_cache[name] = cached
            out[name] = cached[1]
        return out

    def quantized_weight(self) -> Tensor:
        """``fq_w`` of every matrix, flattened and concatenated like :attr:`weight`."""
        return _concat([w.detach() for w in self.quantized_matrices().values()])

    def matrix_qtensors(self) -> dict[str, QTensor]:
        """Name -> the matrix's integer codes (``QTensor``)."""
        qps = self.ensured_matrix_qparams()
        return {n: quantize(w.detach(), self.weight_spec, qps[n]) for n, w in self.matrices().items()}

    def weight_qtensor(self) -> QTensor:
        raise TypeError(f"{type(self).__name__} has one QTensor per matrix: use matrix_qtensors()")

    def set_matrices(self, qtensors: dict[str, QTensor]) -> None:
        """Adopt stored codes: each ``W = dequantize(codes)`` on its own parameters (a checkpoint's)."""
        with torch.no_grad():
            for name, w in self.matrices().items():
                w.copy_(qtensors[name].dequantize(w.dtype))
        self.calibrate_weight({n: qt.qparams for n, qt in qtensors.items()})

    # ------------------------------------------------------------------ forward
    @contextlib.contextmanager
    def _torch_mode(self) -> Iterator[None]:
        """``self.mode`` reads torch's cell kind (``rnn_mode``: ``LSTM`` / ``GRU`` / ``RNN_TANH`` / ``RNN_RELU``,
        the same attribute name as the quantization mode) while torch's own code runs."""
        quant_mode, self.mode = self.mode, self.rnn_mode
        try:
            yield
        finally:
            self.mode = quant_mode

    def flatten_parameters(self) -> None:
        with self._torch_mode():
            super().flatten_parameters()

    def _update_flat_weights(self) -> None:
        """torch's re-sync with the parameters, then the weights of the current run (``_run``) when given."""
        super()._update_flat_weights()
        if self._run_weights is not None:
            self._flat_weights = self._run_weights

    def _run(self, weights: dict[str, Tensor] | None, *args: Any) -> Any:
        """``float_class.forward(*args)`` reading ``weights`` (name -> matrix) instead of the parameters."""
        if weights is not None:
            self._run_weights = [weights.get(n, self._parameters.get(n)) for n in self._flat_weights_names]
        try:
            with self._torch_mode():
                return self.float_class.forward(self, *args)
        finally:
            if weights is not None:
                self._run_weights = None
                self._init_flat_weights()

    def forward(self, input: Tensor | PackedSequence, hx: Any = None) -> Any:  # type: ignore[override]
        """The torch layer's ``(output, h_n)`` (LSTM: ``(output, (h_n, c_n))``); float weights in ``float`` /
        ``observe``, ``W^`` in ``simulate``; ``compare`` returns the float result and records the output error."""
        if self.mode in ("float", "observe"):
            return self._run(None, input, hx)
        quantized = self._run(self.quantized_matrices(), input, hx)
        if self.mode == "simulate":
            return quantized
        reference = self._run(None, input, hx)
        data = lambda out: out.data if isinstance(out, PackedSequence) else out  # noqa: E731
        self.output_error.update(data(reference[0]), data(quantized[0]))
        return reference

    def extra_repr(self) -> str:  # type: ignore[override]
        return f"{super().extra_repr()}, matrices={len(self.matrix_names)}"


class QuantLSTM(QuantRecurrent, nn.LSTM):
    """``nn.LSTM`` on ``fq_w(W_ih)``, ``fq_w(W_hh)`` (and ``fq_w(W_hr)`` with ``proj_size``), 4 gates per row block."""

    float_class = nn.LSTM


class QuantGRU(QuantRecurrent, nn.GRU):
    """``nn.GRU`` on ``fq_w(W_ih)``, ``fq_w(W_hh)``, 3 gates per row block."""

    float_class = nn.GRU


class QuantRNN(QuantRecurrent, nn.RNN):
    """``nn.RNN`` (tanh or relu) on ``fq_w(W_ih)``, ``fq_w(W_hh)``."""

    float_class = nn.RNN

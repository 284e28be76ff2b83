"""Quantized ``nn.LSTM``, ``nn.GRU`` and ``nn.RNN`` (tanh / relu): one :class:`QParams` per matrix, quantized states.

A recurrent layer holds several weight matrices: ``weight_ih_l{k}{_reverse}`` (``(G H, in)``, ``G`` gates:
4 for LSTM, 3 for GRU, 1 for RNN), ``weight_hh_l{k}{_reverse}`` (``(G H, H_out)``) and, for an LSTM with
``proj_size``, ``weight_hr_l{k}{_reverse}`` (``(P, H)``). Each is quantized with the layer's weight spec on
its own grid (per output row = per gate row, or per group along its input), ``W^ = fq_w(W)``; biases stay float.

A weight-only scheme runs, in ``simulate`` mode, the torch layer's own forward with every ``W`` replaced by
``W^`` (its flat weight list, which ``torch._VF.lstm`` / ``gru`` / ``rnn_tanh`` / ``rnn_relu`` read), so every
torch option works as is: ``num_layers``, ``bidirectional``, ``batch_first``, ``dropout``, ``proj_size``,
packed sequences and a given initial state.

A scheme with activations runs the explicit step loop of :mod:`squeezer.modules.recurrent_steps` (the same
options), whose state hooks fake-quantize (STE) the layer's states, :meth:`QuantRecurrent.quantize_state`:

* dynamic (``w8a8``: per token, ``w8a8-tensor``: per tensor): the layer input ``x`` (all steps at once, as
  ONNX Runtime's ``DynamicQuantizeLSTM`` does) and the hidden state ``h_{t-1}`` at each step, right before
  their products with ``W_ih`` / ``W_hh``, on grids computed per call (:data:`DYNAMIC_STATES`);
* static (``w8a8-static``): every state of the step loop on a calibrated grid, frozen from the observers of
  ``observe`` mode: ``x``, ``h`` (and ``m``, an LSTM's cell output before ``W_hr``) on the scheme's int8 grid,
  the gate pre-activations ``gates``, a GRU's ``candidate`` and the cell state ``c`` on symmetric int16
  (:data:`STATE16`, min-max; the cell state's scale a power of two), TFLite's integer LSTM scheme.
  :attr:`QuantRecurrent.state_qparams` holds the grids, ``{key: {state: QParams}}`` (``key`` = ``l0``,
  ``l0_reverse``, ...), each on its own spec (:func:`static_state_spec`); a checkpoint stores each by name. The
  one input grid of other layers (``act_qparams``) stays None: ``activations_calibrated`` says whether every
  state grid is fixed.

Other activation schemes are refused (:func:`activation_refusal`); :func:`squeezer.modules.swap_layers`
leaves such a layer in float with that reason.

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

from ..errors import ConfigError, DataError
from ..quant.core import QParams, QTensor, compute_qparams, fake_quantize, quantize
from ..quant.observers import Observer, make_observer
from ..quant.scheme import LayerScheme
from ..quant.spec import PerTensor, PerToken, QuantSpec
from .base import QuantMixin
from .recurrent_steps import STATE_NAMES, FloatOps, layer_keys, run_recurrent

DYNAMIC_STATES = ("x", "h")
"""The states dynamic activations quantize: the inputs of ``W_ih`` and ``W_hh`` (an LSTM's projection input ``m``
stays float, as in the dynamic LSTMs of torch.ao and ONNX Runtime, which have no projection)."""
STATE16 = QuantSpec(bits=16, symmetric=True, signed=True, granularity=PerTensor())
"""The grid of the static int16 states: symmetric, per tensor."""
INT16_STATES = frozenset({"gates", "candidate", "c"})
"""The static states on :data:`STATE16`: gate pre-activations, a GRU's candidate, the cell state."""


def static_state_spec(state: str, activation: QuantSpec) -> QuantSpec:
    """The grid spec of static ``state``: :data:`STATE16` for :data:`INT16_STATES`, else ``activation``."""
    return STATE16 if state in INT16_STATES else activation


def activation_refusal(scheme: LayerScheme) -> str | None:
    """Why a recurrent layer cannot take ``scheme``'s activations, else None: they must be dynamic per token /
    per tensor, or static per tensor."""
    spec, mode = scheme.activation, scheme.activation_mode
    allowed = (PerToken, PerTensor) if mode == "dynamic" else (PerTensor,)
    if spec is None or isinstance(spec.granularity, allowed):
        return None
    return (f"recurrent layers take dynamic per-token / per-tensor or static per-tensor activations, "
            f"got {spec.describe()} {mode}")


def _concat(parts: list[Tensor | None]) -> Tensor | None:
    return None if parts[0] is None else torch.cat([p.reshape(-1) for p in parts])


class QuantRecurrent(QuantMixin):
    """Mixed in first into a subclass of a torch recurrent layer (``float_class``): ``y, h = rnn(x, h0; W^)``."""

    float_class: type[nn.RNNBase]
    _run_weights: list[Tensor | None] | None = None  # the flat weights of the run in progress (None: torch's own)

    @classmethod
    def from_float(cls, layer: nn.RNNBase, scheme: LayerScheme, copy: bool = True) -> "QuantRecurrent":
        """The layer with its attributes as they are and its parameters adopted: copies (``copy=True``) or the
        same storage. Raises :class:`ConfigError` for activations it cannot take (:func:`activation_refusal`)."""
        refusal = activation_refusal(scheme)
        if refusal is not None:
            raise ConfigError(f"{type(layer).__name__}: {refusal}")
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
        self.state_qparams: dict[str, dict[str, QParams]] = {}  # key -> state -> static grid
        super()._init_quant(scheme)
        self.matrix_qparams: dict[str, QParams] = {}
        self.matrix_specs: dict[str, QuantSpec] = {}  # name -> its own weight spec (mixed precision), else the scheme's
        self.simulated_matrices: frozenset[str] | None = None  # simulate only these (the others float), None: all
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

    def matrix_spec(self, name: str) -> QuantSpec:
        """The weight spec of matrix ``name``: its own (``matrix_specs``) or the scheme's."""
        return self.matrix_specs.get(name, self.weight_spec)

    def calibrate_weight(self, qparams: dict[str, QParams] | None = None) -> None:
        """Fix each matrix's parameters: given (name -> QParams) or round-to-nearest from the matrix."""
        self.matrix_qparams = dict(qparams) if qparams is not None else \
            {n: compute_qparams(w, self.matrix_spec(n)) for n, w in self.matrices().items()}
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
        """Name -> ``fq_w(W)``, STE gradients while ``W`` trains, else cached while ``W`` is unchanged; once
        packed, the runtime's codes dequantized."""
        if self.is_packed:
            return {n: qt.dequantize() for n, qt in self.matrix_qtensors().items()}
        qps = self.ensured_matrix_qparams()
        learned = self._modules.get("matrix_fake_quant")  # QAT's learned step sizes, name -> quantizer
        out: dict[str, Tensor] = {}
        for name, w in self.matrices().items():
            if learned is not None and name in learned:
                out[name] = learned[name](w)
                continue
            if w.requires_grad and torch.is_grad_enabled():
                out[name] = fake_quantize(w, self.matrix_spec(name), qps[name])
                continue
            cached = self._fq_cache.get(name)
            if cached is None or cached[0] != w._version:
                cached = (w._version, fake_quantize(w.detach(), self.matrix_spec(name), qps[name]))
                self._fq_cache[name] = cached
            out[name] = cached[1]
        return out

    def quantized_weight(self) -> Tensor:
        """``fq_w`` of every matrix, flattened and concatenated like :attr:`weight`."""
        return _concat([w.detach() for w in self.quantized_matrices().values()])

    def matrix_qtensors(self) -> dict[str, QTensor]:
        """Name -> the matrix's integer codes (``QTensor``); once packed, the runtime's."""
        if self.is_packed:
            return self.runtime.matrix_qtensors()
        qps = self.ensured_matrix_qparams()
        return {n: quantize(w.detach(), self.matrix_spec(n), qps[n]) for n, w in self.matrices().items()}

    def packed_nbytes(self) -> int:
        """Bytes of every matrix packed, each in its own spec (codes, scales, zero points)."""
        return sum(qt.nbytes() for qt in self.matrix_qtensors().values())

    def weight_qtensor(self) -> QTensor:
        raise TypeError(f"{type(self).__name__} has one QTensor per matrix: use weight_qtensors()")

    def weight_qtensors(self) -> dict[str, QTensor]:
        """Each matrix's codes by its name (:meth:`matrix_qtensors`)."""
        return self.matrix_qtensors()

    def set_matrices(self, qtensors: dict[str, QTensor]) -> None:
        """Adopt stored codes: each ``W = dequantize(codes)`` on its own parameters (a checkpoint's)."""
        with torch.no_grad():
            for name, w in self.matrices().items():
                w.copy_(qtensors[name].dequantize(w.dtype))
        self.calibrate_weight({n: qt.qparams for n, qt in qtensors.items()})

    def install_runtime(self, runtime: Any) -> None:
        """Switch to ``packed`` mode: ``runtime(input, hx)`` computes the layer's result; every float matrix is
        freed (torch's flat-weight list too); the float biases stay, the runtime adds them."""
        self.runtime = runtime
        for name in self.matrix_names:
            self.register_parameter(name, None)
        self._init_flat_weights()
        self._fq_cache = {}
        self.mode = "packed"
        self.forward = runtime  # the hot path: nn.Module.__call__ goes straight to the runtime

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

    def _init_flat_weights(self) -> None:
        """torch's list of the parameters; once packed, an empty float32 tensor stands for each freed matrix (torch's
        input check reads the first one's dtype: the runtime's)."""
        super()._init_flat_weights()
        if getattr(self, "runtime", None) is not None:
            self._flat_weights = [torch.empty(0) if w is None else w for w in self._flat_weights]

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
        ``observe`` (static: the step loop, the observers recording every state), ``W^`` and quantized states
        in ``simulate``; ``compare`` returns the float result and records the output error."""
        if self.mode == "float" or (self.mode == "observe" and self.act_observer is None):
            return self._run(None, input, hx)
        if self.mode == "observe":
            return run_recurrent(self, _ObservedStates(self), input, hx)
        weights = self.quantized_matrices()
        if self.simulated_matrices is not None:
            weights = {n: w for n, w in weights.items() if n in self.simulated_matrices}
        if self.quantized_states:
            quantized = run_recurrent(self, _QuantizedStates(self, weights), input, hx)
        else:
            quantized = self._run(weights, input, hx)
        if self.mode == "simulate":
            return quantized
        reference = self._run(None, input, hx)
        data = lambda out: out.data if isinstance(out, PackedSequence) else out  # noqa: E731
        self.output_error.update(data(reference[0]), data(quantized[0]))
        return reference

    # ------------------------------------------------------------------ the states
    @property
    def quantized_states(self) -> tuple[str, ...]:
        """The states the scheme quantizes: none (weight-only), :data:`DYNAMIC_STATES` (dynamic) or every state
        of the step loop (static; ``m`` with ``proj_size`` only)."""
        mode = self.scheme.activation_mode
        if mode != "static":
            return () if mode == "none" else DYNAMIC_STATES
        return tuple(s for s in STATE_NAMES[self.rnn_mode] if s != "m" or self.proj_size)

    def state_spec(self, state: str) -> QuantSpec:
        """The grid spec of ``state``: :func:`static_state_spec` for static activations, else the activation spec."""
        return static_state_spec(state, self.act_spec) if self.scheme.activation_mode == "static" else self.act_spec

    def state_grids(self) -> list[tuple[str, str]]:
        """``(key, state)`` of every static grid: keys in torch's order, states in the step loop's."""
        if self.scheme.activation_mode != "static":
            return []
        return [(key, state) for key in layer_keys(self) for state in self.quantized_states]

    def quantize_state(self, state: str, key: str, t: Tensor) -> Tensor:
        """``fq(t)`` (STE) on the grid of ``state`` of layer / direction ``key``: computed from ``t`` (dynamic) or
        ``state_qparams[key][state]`` (static); a state the scheme does not quantize as it is."""
        if state not in self.quantized_states:
            return t
        if self.scheme.activation_mode == "dynamic":
            return fake_quantize(t, self.act_spec)
        qparams = self.state_qparams.get(key, {}).get(state)
        if qparams is None:
            raise RuntimeError(f"{type(self).__name__}: static activations need calibration data before use")
        return fake_quantize(t, self.state_spec(state), qparams)

    def reset_observer(self) -> None:
        """Fresh observers of every static grid (:class:`StateObservers`), forgetting what was observed."""
        if self.scheme.activation_mode == "static":
            self.act_observer = StateObservers({g: self.state_spec(g[1]) for g in self.state_grids()},
                                               self.scheme.observer)

    def freeze_activation(self) -> None:
        """The observed ranges -> :attr:`state_qparams`; the cell state's scale rounded up to a power of two."""
        if self.act_observer is None:
            return
        grids = self.act_observer.qparams()
        for states in grids.values():
            if "c" in states:
                states["c"] = QParams(torch.exp2(torch.ceil(torch.log2(states["c"].scale))))
        self.state_qparams = grids

    @property
    def activations_calibrated(self) -> bool:
        """Whether :attr:`state_qparams` holds every grid of :meth:`state_grids` (none needed unless static)."""
        return all(state in self.state_qparams.get(key, {}) for key, state in self.state_grids())

    def extra_repr(self) -> str:  # type: ignore[override]
        return f"{super().extra_repr()}, matrices={len(self.matrix_names)}"


class StateObservers:
    """The observers of a recurrent layer's static grids, one per ``(key, state)``: the scheme's observer on
    the activation spec, min-max on :data:`STATE16` (16 bits hold the whole range)."""

    def __init__(self, specs: dict[tuple[str, str], QuantSpec], observer: str) -> None:
        self.observers: dict[tuple[str, str], Observer] = {
            grid: make_observer("minmax" if spec == STATE16 else observer, spec) for grid, spec in specs.items()}

    def update(self, state: str, key: str, t: Tensor) -> None:
        """Record ``t``, a value of ``state`` of layer / direction ``key`` (ignored when it has no grid)."""
        observer = self.observers.get((key, state))
        if observer is not None:
            observer.update(t)

    def qparams(self) -> dict[str, dict[str, QParams]]:
        """``{key: {state: QParams}}``; :class:`DataError` naming the grid when one has seen no data."""
        out: dict[str, dict[str, QParams]] = {}
        for (key, state), observer in self.observers.items():
            try:
                out.setdefault(key, {})[state] = observer.qparams()
            except DataError as exc:
                raise DataError(f"state {state!r} of {key}: {exc}") from None
        return out


class _QuantizedStates(FloatOps):
    """The step loop's products on the given matrices (the layer's own for those missing), each state
    through :meth:`QuantRecurrent.quantize_state`."""

    def state(self, name: str, key: str, t: Tensor) -> Tensor:
        return self.layer.quantize_state(name, key, t)


class _ObservedStates(FloatOps):
    """The float step loop, each state recorded by the layer's :class:`StateObservers`."""

    def state(self, name: str, key: str, t: Tensor) -> Tensor:
        self.layer.act_observer.update(name, key, t)
        return t


class QuantLSTM(QuantRecurrent, nn.LSTM):
    """``nn.LSTM`` on ``fq_w(W_ih)``, ``fq_w(W_hh)`` (and ``fq_w(W_hr)`` with ``proj_size``), 4 gates per row block."""

    float_class = nn.LSTM


class QuantGRU(QuantRecurrent, nn.GRU):
    """``nn.GRU`` on ``fq_w(W_ih)``, ``fq_w(W_hh)``, 3 gates per row block."""

    float_class = nn.GRU


class QuantRNN(QuantRecurrent, nn.RNN):
    """``nn.RNN`` (tanh or relu) on ``fq_w(W_ih)``, ``fq_w(W_hh)``."""

    float_class = nn.RNN

"""Explicit time-step recurrence of ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN``: torch's function, its products pluggable.

:func:`run_recurrent` computes what the torch layer computes (every option: ``num_layers``, ``bidirectional``,
``batch_first``, ``dropout`` between layers in training, ``proj_size``, packed sequences with unsorted lengths,
a given ``h0`` / ``c0``, unbatched 2-D input) with the weight products and the states left to a
:class:`StepOps`. Per layer ``l`` and direction (``key`` = torch's parameter suffix ``l0``, ``l0_reverse``, ...)
with ``G`` gates of ``H`` rows (LSTM 4: ``i f g o``, GRU 3: ``r z n``, RNN 1)::

    X  = input_projection(state("x", X))                  (N, G H)   all N = T B steps at once
    A  = X_t + hidden_projection(state("h", h_{t-1}))      (B, G H)   one step
    LSTM: i f g o = state("gates", A);  c_t = state("c", s(f) c_{t-1} + s(i) tanh(g))
          h_t = s(o) tanh(c_t);  with proj_size: h_t = output_projection(state("m", h_t))
    GRU:  r z = s(state("gates", A_rz));  n = tanh(state("candidate", X_n + r (W_hn h + b_hn)))
          h_t = (1 - z) n + z state("h", h_{t-1})
    RNN:  h_t = tanh / relu(state("gates", A))

``s`` is the sigmoid. Each :meth:`StepOps.state` hook sees a value where it is consumed — ``x`` before the
input projection, ``h`` before the hidden projection (so ``h0`` too), ``gates`` / ``candidate`` before their
nonlinearities, ``m`` before the output projection — except ``c``, hooked where it is stored (``c0`` and each
``c_t``), so the cell state carried from step to step is the hooked one. The layer's outputs ``y_t`` and
``h_n`` are the unhooked ``h_t``. A hook returns its value quantized (or as is, :class:`FloatOps`).

A caller may hand :func:`run_recurrent` a :data:`LoopFinder`: a direction whose steps all hold the whole batch
then runs the finder's loop (one call for all ``T`` steps, e.g. TorchScript) instead of the Python loop, which
it must equal bit for bit (the packed runtime's compiled loops: :mod:`squeezer.kernels.recurrent_loops`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}
"""Torch's cell kind -> the number ``G`` of gate row blocks of its matrices."""

STATE_NAMES = {"LSTM": ("x", "h", "gates", "c", "m"), "GRU": ("x", "h", "gates", "candidate"),
               "RNN_TANH": ("x", "h", "gates"), "RNN_RELU": ("x", "h", "gates")}
"""Torch's cell kind -> the names its steps pass to :meth:`StepOps.state` (``m``: LSTM with ``proj_size`` only)."""


DirectionLoop = Callable[[Tensor, Tensor, "Tensor | None", bool], "tuple[Tensor, Tensor, Tensor | None]"]
"""``(X (T, B, G H), h (B, H_out), c (B, H) or None, reverse) -> (y (T B, H_out), h_T, c_T)``: the steps of one
direction in one call, computing exactly what the Python loop of :func:`run_recurrent` computes with the same
:class:`StepOps` (a compiled loop: :mod:`squeezer.kernels.recurrent_loops`)."""
LoopFinder = Callable[[str, int, torch.dtype], "DirectionLoop | None"]
"""``(key, batch, dtype) -> DirectionLoop or None``: the compiled loop of direction ``key`` at ``batch`` rows of
``dtype`` (the input projection's), if any."""


class StepOps(Protocol):
    """The products of one recurrent layer. ``key``: torch's parameter suffix of the layer and direction,
    ``"l0"``, ``"l0_reverse"``, ``"l1"``, ..."""

    def input_projection(self, key: str, x: Tensor) -> Tensor:
        """``(N, in) -> (N, G H)``: ``x W_ih^T + b_ih``, all time steps at once (``N = T B``)."""
        ...

    def hidden_projection(self, key: str, h: Tensor) -> Tensor:
        """``(B, H_out) -> (B, G H)``: ``h W_hh^T + b_hh`` (one step)."""
        ...

    def output_projection(self, key: str, h: Tensor) -> Tensor:
        """LSTM with ``proj_size``: ``(B, H) -> (B, P)``: ``h W_hr^T``."""
        ...

    def state(self, name: str, key: str, t: Tensor) -> Tensor:
        """A hook on each state / intermediate (``name`` in :data:`STATE_NAMES`): it quantized, or as is."""
        ...


def cell_kind(layer: nn.RNNBase) -> str:
    """Torch's cell kind of ``layer``: ``LSTM`` / ``GRU`` / ``RNN_TANH`` / ``RNN_RELU`` (a quantized layer keeps
    it in ``rnn_mode``, its ``mode`` being the quantization mode)."""
    return getattr(layer, "rnn_mode", layer.mode)


def layer_keys(layer: nn.RNNBase) -> list[str]:
    """``["l0", "l0_reverse", "l1", ...]``: one key per layer and direction, in torch's order."""
    suffixes = ["", "_reverse"] if layer.bidirectional else [""]
    return [f"l{k}{s}" for k in range(layer.num_layers) for s in suffixes]


class FloatOps:
    """:class:`StepOps` in float: the layer's own parameters, or the given matrices (name -> ``W``, e.g.
    ``"weight_ih_l0"``; a missing name reads the layer's); biases are the layer's; states pass as they are."""

    def __init__(self, layer: nn.RNNBase, weights: dict[str, Tensor] | None = None) -> None:
        self.layer = layer
        self.weights = weights or {}

    def _param(self, name: str) -> Tensor | None:
        w = self.weights.get(name)
        return w if w is not None else getattr(self.layer, name, None)

    def input_projection(self, key: str, x: Tensor) -> Tensor:
        return F.linear(x, self._param(f"weight_ih_{key}"), self._param(f"bias_ih_{key}"))

    def hidden_projection(self, key: str, h: Tensor) -> Tensor:
        return F.linear(h, self._param(f"weight_hh_{key}"), self._param(f"bias_hh_{key}"))

    def output_projection(self, key: str, h: Tensor) -> Tensor:
        return F.linear(h, self._param(f"weight_hr_{key}"))

    def state(self, name: str, key: str, t: Tensor) -> Tensor:
        return t


def _lstm_step(ops: StepOps, key: str, x_t: Tensor, h: Tensor, c: Tensor,
               proj: bool) -> tuple[Tensor, Tensor]:
    # one sigmoid over all 4 H gate rows (the g rows' is unused: one op instead of three), f c + i g in one addcmul
    a = ops.state("gates", key, x_t + ops.hidden_projection(key, ops.state("h", key, h)))
    i, f, _, o = torch.sigmoid(a).chunk(4, 1)
    rows = c.shape[1]
    c = ops.state("c", key, torch.addcmul(f * c, i, torch.tanh(a[:, 2 * rows:3 * rows])))
    h = o * torch.tanh(c)
    return (ops.output_projection(key, ops.state("m", key, h)) if proj else h), c


def _gru_step(ops: StepOps, key: str, x_t: Tensor, h: Tensor) -> Tensor:
    hq = ops.state("h", key, h)
    a = ops.hidden_projection(key, hq)
    n_rows = a.shape[1] // 3
    r, z = torch.sigmoid(ops.state("gates", key, x_t[:, :2 * n_rows] + a[:, :2 * n_rows])).chunk(2, 1)
    n = torch.tanh(ops.state("candidate", key, torch.addcmul(x_t[:, 2 * n_rows:], r, a[:, 2 * n_rows:])))
    return torch.lerp(n, hq, z)  # (1 - z) n + z h in one op


def _rnn_step(ops: StepOps, key: str, x_t: Tensor, h: Tensor, relu: bool) -> Tensor:
    a = ops.state("gates", key, x_t + ops.hidden_projection(key, ops.state("h", key, h)))
    return torch.relu(a) if relu else torch.tanh(a)


def _direction(layer: nn.RNNBase, kind: str, ops: StepOps, key: str, data: Tensor, sizes: list[int],
               h: Tensor, c: Tensor | None, reverse: bool,
               loops: LoopFinder | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """One layer and direction over the steps: ``data`` (N, in) step-major (step ``t`` holds ``sizes[t]`` rows,
    the first ones of the batch), ``h`` (B, H_out), ``c`` (B, H) -> ``(y (N, H_out), h_n, c_n)``; the loop of
    ``loops(key, B, dtype)`` when every step holds the whole batch and it gives one."""
    projected = ops.input_projection(key, ops.state("x", key, data))  # every x_t in one call
    batch, proj = h.shape[0], layer.proj_size > 0
    if c is not None:
        c = ops.state("c", key, c)
    whole = loops is not None and bool(sizes) and all(n == batch for n in sizes)
    loop = loops(key, batch, projected.dtype) if whole else None
    if loop is not None:
        return loop(projected.reshape(len(sizes), batch, -1), h, c, reverse)
    steps = projected.split(sizes)  # x_t: views
    outputs: list[Tensor] = list(steps)
    for t in (reversed(range(len(sizes))) if reverse else range(len(sizes))):
        n, x_t = sizes[t], steps[t]
        h_prev = h if n == batch else h[:n]
        if kind == "LSTM":
            h_t, c_t = _lstm_step(ops, key, x_t, h_prev, c if n == batch else c[:n], proj)
            c = c_t if n == batch else torch.cat([c_t, c[n:]])
        elif kind == "GRU":
            h_t = _gru_step(ops, key, x_t, h_prev)
        else:
            h_t = _rnn_step(ops, key, x_t, h_prev, kind == "RNN_RELU")
        h = h_t if n == batch else torch.cat([h_t, h[n:]])
        outputs[t] = h_t
    return torch.cat(outputs), h, c


def _initial_state(layer: nn.RNNBase, kind: str, hx: Any, data: Tensor, batch: int,
                   unbatched: bool, order: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """``(h0 (L D, B, H_out), c0 (L D, B, H) or None)``: the given state (batch rows in the run's order) or zeros."""
    rows = layer.num_layers * (2 if layer.bidirectional else 1)
    h_out = layer.proj_size or layer.hidden_size
    if hx is None:
        zeros = lambda size: torch.zeros(rows, batch, size, dtype=data.dtype, device=data.device)  # noqa: E731
        return zeros(h_out), (zeros(layer.hidden_size) if kind == "LSTM" else None)
    states = list(hx) if kind == "LSTM" else [hx]
    if unbatched:
        if any(s.dim() != 2 for s in states):
            raise RuntimeError(f"For unbatched 2-D input, hx should also be 2-D but got "
                               f"{[s.dim() for s in states]}-D tensor")
        states = [s.unsqueeze(1) for s in states]
    if order is not None:
        states = [s.index_select(1, order) for s in states]
    return states[0], (states[1] if kind == "LSTM" else None)


def run_recurrent(layer: nn.RNNBase, ops: StepOps, input: Tensor | PackedSequence, hx: Any = None,
                  loops: LoopFinder | None = None) -> Any:
    """The torch layer's result, ``(output, h_n)`` (LSTM: ``(output, (h_n, c_n))``), with its products and
    states computed by ``ops``: one input projection per layer and direction over all steps, a loop over steps
    (a direction's compiled loop where ``loops`` gives one: :data:`LoopFinder`).
    ``layer`` supplies the cell kind, sizes and options (``training`` for the dropout between layers)."""
    kind = cell_kind(layer)
    packed = isinstance(input, PackedSequence)
    unbatched = not packed and input.dim() == 2
    if packed:
        data, batch_sizes, sorted_indices, unsorted_indices = input
        sizes = batch_sizes.tolist()
    else:
        seq = input.unsqueeze(1) if unbatched else (input.transpose(0, 1) if layer.batch_first else input)
        sizes, sorted_indices, unsorted_indices = [seq.shape[1]] * seq.shape[0], None, None
        data = seq.reshape(seq.shape[0] * seq.shape[1], seq.shape[2])
    h0, c0 = _initial_state(layer, kind, hx, data, sizes[0] if sizes else 0, unbatched, sorted_indices)
    batched = data if packed else seq.transpose(0, 1) if layer.batch_first else seq  # the layer's own layout
    layer.check_forward_args(batched, (h0, c0) if kind == "LSTM" else h0, batch_sizes if packed else None)
    h_n, c_n = [], []
    keys = layer_keys(layer)
    per_layer = 2 if layer.bidirectional else 1
    for k in range(layer.num_layers):
        outputs = []
        for d in range(per_layer):
            i = k * per_layer + d
            y, h, c = _direction(layer, kind, ops, keys[i], data, sizes, h0[i], None if c0 is None else c0[i],
                                 d == 1, loops)
            outputs.append(y)
            h_n.append(h)
            c_n.append(c)
        data = torch.cat(outputs, 1) if per_layer == 2 else outputs[0]
        if layer.dropout and layer.training and k < layer.num_layers - 1:
            data = F.dropout(data, layer.dropout, training=True)
    h_state = torch.stack(h_n)
    c_state = torch.stack(c_n) if kind == "LSTM" else None
    if packed:
        output: Tensor | PackedSequence = PackedSequence(data, batch_sizes, sorted_indices, unsorted_indices)
        if unsorted_indices is not None:
            h_state = h_state.index_select(1, unsorted_indices)
            c_state = None if c_state is None else c_state.index_select(1, unsorted_indices)
    else:
        out = data.reshape(len(sizes), -1, data.shape[1])
        if unbatched:
            output, h_state = out.squeeze(1), h_state.squeeze(1)
            c_state = None if c_state is None else c_state.squeeze(1)
        else:
            output = out.transpose(0, 1) if layer.batch_first else out
    return (output, (h_state, c_state)) if kind == "LSTM" else (output, h_state)

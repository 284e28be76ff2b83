"""The weight matrices of a recurrent layer, each seen by the algorithms as one linear layer.

A recurrent layer (:class:`~squeezer.modules.QuantRecurrent`) holds per layer and direction ``key`` the
matrices ``weight_ih_{key}`` (input ``x_t``), ``weight_hh_{key}`` (input ``h_{t-1}``) and, for an LSTM with
``proj_size``, ``weight_hr_{key}`` (input ``m_t = o * tanh(c_t)``, before the projection). Each computes a
product ``x W^T`` like a linear layer, so every linear-layer algorithm (GPTQ, clipping, AdaRound, HQQ, bias
correction) runs on it unchanged through a :class:`MatrixView`, with the :class:`LayerStats` of that matrix's
own inputs: :func:`record_matrix_inputs` runs the layer's recurrence step by step
(:func:`~squeezer.modules.recurrent_steps.run_recurrent` with float matrices) and adds, per matrix, the rows
it multiplies: all ``x_t`` of a direction for ``W_ih``, each step's ``h_{t-1}`` (``h_0`` included) for
``W_hh``, each ``m_t`` for ``W_hr``. So ``H = 2 X^T X / n`` of ``W_hh`` is that of the states
the calibration data drives through the recurrence.

A view takes no input transform: the recurrence feeds each matrix itself, so there is no place for
``x / s`` or a rotation of its input (AWQ keeps ``s = 1`` there: its clipping step only).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..modules.recurrent import QuantRecurrent
from ..modules.recurrent_steps import FloatOps, run_recurrent
from ..quant.core import QParams, compute_qparams, fake_quantize
from ..quant.spec import QuantSpec
from .stats import LayerStats


class MatrixView:
    """Matrix ``name`` of a recurrent ``layer`` as a linear layer ``y = x W^T + b`` for an algorithm:
    ``weight`` is the layer's own parameter (an algorithm's ``set_quantized`` writes it), ``weight_spec``
    the matrix's, ``bias`` the matching ``bias_ih`` / ``bias_hh`` parameter (None for ``W_hr``)."""

    input_scale = None
    input_rotation = 1
    act_spec = None

    def __init__(self, layer: QuantRecurrent, name: str) -> None:
        self.layer = layer
        self.name = name

    @property
    def weight(self) -> nn.Parameter:
        return self.layer.matrices()[self.name]

    @property
    def bias(self) -> nn.Parameter | None:
        return self.layer._parameters.get(self.name.replace("weight_", "bias_", 1))

    @property
    def weight_spec(self) -> QuantSpec:
        return self.layer.matrix_spec(self.name)

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    def rotation_matrix(self) -> None:
        return None

    def calibrate_weight(self, qparams: QParams | None = None) -> None:
        """Fix this matrix's parameters (given, or round-to-nearest); the other matrices keep theirs."""
        qps = dict(self.layer.ensured_matrix_qparams())
        qps[self.name] = qparams if qparams is not None else compute_qparams(self.weight, self.weight_spec)
        self.layer.calibrate_weight(qps)

    def set_quantized(self, weight: Tensor, qparams: QParams) -> None:
        """Adopt an algorithm's result: ``quantize(weight, qparams)`` gives the chosen codes."""
        with torch.no_grad():
            self.weight.copy_(weight.to(self.weight.dtype).reshape(self.weight.shape))
        self.calibrate_weight(qparams)

    def ensured_weight_qparams(self) -> QParams:
        return self.layer.ensured_matrix_qparams()[self.name]

    def quantized_weight(self) -> Tensor:
        return fake_quantize(self.weight.detach(), self.weight_spec, self.ensured_weight_qparams())

    def __repr__(self) -> str:
        return f"MatrixView({self.name}, {tuple(self.weight.shape)}, {self.weight_spec.describe()})"


def matrix_views(layer: QuantRecurrent) -> dict[str, MatrixView]:
    """Name -> view, every matrix of ``layer`` in torch's order."""
    return {name: MatrixView(layer, name) for name in layer.matrix_names}


class _RecordingOps(FloatOps):
    """Float products of ``layer`` that add each matrix's input rows to ``stats`` (name -> LayerStats)."""

    def __init__(self, layer: QuantRecurrent, stats: dict[str, LayerStats | None], max_rows: int) -> None:
        super().__init__(layer)
        self.stats = stats
        self.max_rows = max_rows

    def _record(self, name: str, rows: Tensor) -> None:
        if self.stats.get(name) is None:
            self.stats[name] = LayerStats(rows.shape[-1], max_rows=self.max_rows)
        self.stats[name].update(rows.reshape(-1, rows.shape[-1]))

    def input_projection(self, key: str, x: Tensor) -> Tensor:
        self._record(f"weight_ih_{key}", x)
        return super().input_projection(key, x)

    def hidden_projection(self, key: str, h: Tensor) -> Tensor:
        self._record(f"weight_hh_{key}", h)
        return super().hidden_projection(key, h)

    def output_projection(self, key: str, h: Tensor) -> Tensor:
        self._record(f"weight_hr_{key}", h)
        return super().output_projection(key, h)


def record_matrix_inputs(layer: QuantRecurrent, args: tuple[Any, ...], stats: dict[str, LayerStats | None],
                         max_rows: int) -> None:
    """Run ``layer(*args)`` (input and optional initial state) step by step in float and add every matrix's
    input rows to ``stats`` (name -> LayerStats, created on first use)."""
    with torch.no_grad():
        run_recurrent(layer, _RecordingOps(layer, stats, max_rows), *args[:2])

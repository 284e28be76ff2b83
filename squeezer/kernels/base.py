"""The one interface every execution path implements, and the packed weight it starts from.

A path turns a layer's packed weight into its own prepared state once (``prepare``) and
then computes ``y = x W^T + b`` from it (``run``). ``eligible`` says whether the path
reproduces the layer's quantization (format, shape, activation mode) for a given number of
rows ``m``; only eligible paths are timed and chosen (see :mod:`squeezer.kernels.select`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..config import QuantConfig
from ..quant.core import QParams, QTensor, dequantize
from ..quant.packing import pack_codes, unpack_codes
from ..quant.spec import QuantSpec


@dataclass
class PackedWeight:
    """Bit-packed codes (``uint8``) + parameters of one weight; ``nbytes`` is its real size."""

    packed: Tensor
    qparams: QParams
    spec: QuantSpec
    shape: tuple[int, ...]

    @classmethod
    def from_qtensor(cls, qt: QTensor) -> "PackedWeight":
        return cls(pack_codes(qt.codes, qt.spec), qt.qparams, qt.spec, tuple(qt.shape))

    def qtensor(self) -> QTensor:
        return QTensor(unpack_codes(self.packed, self.spec, self.shape), self.qparams, self.spec)

    def dequantize(self) -> Tensor:
        return dequantize(self.qtensor())

    @property
    def nbytes(self) -> int:
        qp = self.qparams
        extra = [t for t in (qp.scale, qp.zero_point, qp.levels) if t is not None]
        return self.packed.numel() + sum(t.numel() * t.element_size() for t in extra)


@dataclass
class LinearProblem:
    """What a path needs to know about a linear layer: its weight, bias and config."""

    weight: PackedWeight
    bias: Tensor | None
    config: QuantConfig
    act_qparams: QParams | None
    input_scale: Tensor | None = None
    rotation: Tensor | None = None  # H_b of a Hadamard input rotation (applied before input_scale)

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]


class KernelPath:
    """A way to compute ``x W^T + b`` from a packed weight."""

    name: str = "abstract"
    integer: bool = True  # False: dequantize and multiply in float (no integer kernel)
    note: str = ""

    def eligible(self, problem: LinearProblem, m: int) -> bool:
        raise NotImplementedError

    def prepare(self, problem: LinearProblem) -> Any:
        raise NotImplementedError

    def run(self, state: Any, x: Tensor) -> Tensor:
        """``x: (m, K)`` float -> ``(m, N)`` float32."""
        raise NotImplementedError


def available(op: str) -> bool:
    """True when ``torch.ops.aten.<op>`` exists in this torch build."""
    return hasattr(torch.ops.aten, op)

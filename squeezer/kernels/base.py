"""The one interface every execution path implements, and the packed weight it starts from.

A path turns a layer's packed weight into its own prepared state once (``prepare``) and
then computes ``y = x W^T + b`` from it (``run``). ``supports`` says whether the path runs the
layer's classified format (:func:`squeezer.quant.formats.classify`: one lookup in the path's
``weights`` / ``activations`` name sets); ``eligible`` adds the shape and rows ``m`` conditions. Only
eligible paths are timed and chosen (see :mod:`squeezer.kernels.select`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from torch import Tensor

from ..quant.core import QParams, QTensor, dequantize
from ..quant.formats import Format, classify
from ..quant.packing import pack_codes, unpack_codes
from ..quant.scheme import LayerScheme
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
    """What a path needs to know about a linear layer: its weight, bias and scheme."""

    weight: PackedWeight
    bias: Tensor | None
    scheme: LayerScheme
    act_qparams: QParams | None
    input_scale: Tensor | None = None
    rotation: Tensor | None = None  # H_b of a Hadamard input rotation (applied before input_scale)

    @cached_property
    def format(self) -> Format:
        """The layer's classified format (k-means levels taken from the packed weight)."""
        return classify(self.scheme, self.weight.qparams.levels)

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
    weights: frozenset[str] | None = None
    """Weight format names the path runs (None: any)."""
    activations: frozenset[str] | None = None
    """Activation format names the path runs (None: any)."""

    def supports(self, fmt: Format) -> bool:
        """True when the path runs layers of format ``fmt`` (at some shape and number of rows)."""
        return ((self.weights is None or fmt.weight in self.weights)
                and (self.activations is None or fmt.activation in self.activations))

    def eligible(self, problem: LinearProblem, m: int) -> bool:
        """``supports(problem.format)`` and the path's shape / rows conditions for ``m`` rows."""
        raise NotImplementedError

    def prepare(self, problem: LinearProblem) -> Any:
        raise NotImplementedError

    def run(self, state: Any, x: Tensor) -> Tensor:
        """``x: (m, K)`` float -> ``(m, N)`` float32."""
        raise NotImplementedError


def supported_formats(paths: Iterable[KernelPath]) -> set[str]:
    """The format names the ``paths`` run (``any`` for a path that runs every format)."""
    names: set[str] = set()
    for p in paths:
        if p.weights is None or p.activations is None:
            names.add("any")
        else:
            names.update(Format(w, a).name for w in p.weights for a in p.activations)
    return names


def available(op: str) -> bool:
    """True when ``torch.ops.aten.<op>`` exists in this torch build."""
    return hasattr(torch.ops.aten, op)

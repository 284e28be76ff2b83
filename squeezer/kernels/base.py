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

from ..quant.core import QParams, QTensor, code_dtype, dequantize
from ..quant.formats import Format, classify
from ..quant.packing import pack_codes, unpack_codes
from ..quant.scheme import LayerScheme
from ..quant.spec import QuantSpec


class CodeLayout:
    """How a :class:`PackedWeight` holds its codes in one tensor ``data``: ``hold(codes) -> data`` and its exact
    inverse ``codes(data, spec, shape)``; ``hold`` returns None where the inverse would not be exact."""

    name: str = "abstract"

    def hold(self, codes: Tensor, spec: QuantSpec) -> Tensor | None:
        raise NotImplementedError

    def codes(self, data: Tensor, spec: QuantSpec, shape: tuple[int, ...]) -> Tensor:
        raise NotImplementedError


class BitPacked(CodeLayout):
    """``ceil(n b / 8)`` bytes (:func:`squeezer.quant.packing.pack_codes`): the smallest layout, any format."""

    name = "bit_packed"

    def hold(self, codes: Tensor, spec: QuantSpec) -> Tensor:
        return pack_codes(codes, spec)

    def codes(self, data: Tensor, spec: QuantSpec, shape: tuple[int, ...]) -> Tensor:
        return unpack_codes(data, spec, shape)


class OneByte(CodeLayout):
    """The codes themselves, ``shape``, in :func:`code_dtype` (int8 ``(N, K)`` for 8-bit signed formats: what the
    int8 kernels read)."""

    name = "one_byte"

    def hold(self, codes: Tensor, spec: QuantSpec) -> Tensor:
        return codes.to(code_dtype(spec)).contiguous()

    def codes(self, data: Tensor, spec: QuantSpec, shape: tuple[int, ...]) -> Tensor:
        return data


BIT_PACKED, ONE_BYTE = BitPacked(), OneByte()


@dataclass
class PackedWeight:
    """Codes + parameters of one weight, the codes held once as ``data`` in ``layout`` (bit-packed by default, or
    a kernel's own layout that the codes are recovered from exactly); ``nbytes`` is its real size."""

    data: Tensor
    qparams: QParams
    spec: QuantSpec
    shape: tuple[int, ...]
    layout: CodeLayout = BIT_PACKED

    @classmethod
    def from_qtensor(cls, qt: QTensor, layout: CodeLayout = BIT_PACKED) -> "PackedWeight":
        return cls(layout.hold(qt.codes, qt.spec), qt.qparams, qt.spec, tuple(qt.shape), layout)

    def relaid(self, layout: CodeLayout) -> "PackedWeight | None":
        """The same weight held in ``layout`` (itself when already so), None where ``layout`` can't hold it exactly."""
        if layout is self.layout:
            return self
        data = layout.hold(self.codes(), self.spec)
        return None if data is None else PackedWeight(data, self.qparams, self.spec, self.shape, layout)

    def codes(self) -> Tensor:
        """The integer codes, ``shape``, in :func:`code_dtype` (a view of ``data`` for :class:`OneByte`)."""
        return self.layout.codes(self.data, self.spec, self.shape)

    @property
    def packed(self) -> Tensor:
        """The bit-packed bytes (``data`` itself when held bit-packed)."""
        return self.data if self.layout is BIT_PACKED else pack_codes(self.codes(), self.spec)

    def qtensor(self) -> QTensor:
        return QTensor(self.codes(), self.qparams, self.spec)

    def dequantize(self) -> Tensor:
        return dequantize(self.qtensor())

    def tensors(self) -> list[Tensor]:
        """Every tensor held: the codes' ``data`` and the parameters."""
        qp = self.qparams
        return [t for t in (self.data, qp.scale, qp.zero_point, qp.levels) if t is not None]

    @property
    def nbytes(self) -> int:
        return storage_bytes(self.tensors())


def storage_bytes(tensors: Iterable[Tensor]) -> int:
    """Bytes of the storages behind ``tensors``, each storage counted once (views and shared tensors included)."""
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
    return sum(seen.values())


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
    layout: CodeLayout | None = None
    """The layout whose ``data`` the path's state reads as is (no copy of the codes), None: the state has its own."""

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

    def held(self, state: Any) -> list[Tensor]:
        """The tensors ``state`` holds (a dict's tensor values, a problem's weight and transforms)."""
        if isinstance(state, LinearProblem):
            return [*state.weight.tensors(), *(t for t in (state.input_scale, state.rotation) if t is not None)]
        return [t for t in state.values() if isinstance(t, Tensor)] if isinstance(state, dict) else []


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

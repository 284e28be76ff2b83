"""Packed runtimes: what a quantized layer calls in ``packed`` mode.

* linear: ``x (..., K)`` is flattened to ``(m, K)`` and sent to the path chosen for ``m``'s
  bucket; only the chosen paths' prepared weights are kept, and the codes are held once: in the layout
  of a chosen path that reads them as they are (int8 ``(N, K)``, the int4 CPU kernel's tensor), from
  which fallbacks and saving recover them exactly, else bit-packed (:func:`held_once`). A layer whose format no given path
  supports is refused (:func:`squeezer.quant.formats.unsupported_format`), as is one that some bucket
  has no eligible path for (its shape).
* conv: the packed weight is reconstructed per call and convolved in fp32 (no integer conv
  kernel here); activations are fake-quantized as configured.
* embedding bag: the packed table is reconstructed per call and reduced by the layer's own op.
* embedding: codes are kept one byte each so rows can be gathered, then only the gathered
  rows are reconstructed: ``out = (codes[idx] - Z[idx]) * S[idx]`` (or ``levels[codes[idx]]``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError
from ..modules.layers import BagInput
from ..quant.core import QParams, QTensor, dequantize
from ..quant.formats import unsupported_format
from ..quant.rotation import rotate
from ..quant.spec import PerChannel, PerGroup, PerTensor
from .base import BIT_PACKED, ONE_BYTE, KernelPath, LinearProblem, PackedWeight, storage_bytes, supported_formats
from .paths import PATHS
from .select import BUCKETS, bucket_label, bucket_of


@dataclass
class PackedLinear:
    """Chosen path per rows-bucket for one linear layer."""

    problem: LinearProblem
    choice: list[str]
    states: dict[str, Any]
    paths: dict[str, KernelPath] = field(default_factory=lambda: {p.name: p for p in PATHS})

    @classmethod
    def build(cls, problem: LinearProblem, choose: Callable[[LinearProblem], list[str]],
              paths: tuple[KernelPath, ...] = PATHS, layer: str = "") -> "PackedLinear":
        """Check that ``paths`` run the layer, then prepare the ones ``choose(problem)`` names (one per
        rows-bucket, :mod:`squeezer.kernels.select`); ``layer``: the name errors give."""
        names = ", ".join(p.name for p in paths)
        if not any(p.supports(problem.format) for p in paths):
            raise unsupported_format(f"the kernels ({names})", layer, problem.format.name, supported_formats(paths),
                                     problem.weight.spec.describe())
        empty = next((m for _, m in BUCKETS if not any(p.eligible(problem, m) for p in paths)), None)
        if empty is not None:
            raise ConfigError(f"layer {layer!r}: no kernel of ({names}) runs format {problem.format.name} with "
                              f"{problem.out_features}x{problem.in_features} weights on {empty} rows")
        choice = choose(problem)
        by_name = {p.name: p for p in paths}
        chosen = [by_name[name] for name in dict.fromkeys(choice)]
        problem = replace(problem, weight=held_once(problem.weight, chosen))
        return cls(problem, choice, {p.name: p.prepare(problem) for p in chosen}, by_name)

    def __post_init__(self) -> None:
        # (run, state) per bucket, resolved once: the call below is on the hot path.
        self._calls = [(self.paths[name].run, self.states[name]) for name in self.choice]

    def __call__(self, x: Tensor) -> Tensor:
        if self.problem.rotation is not None:
            x = rotate(x, self.problem.rotation)
        if self.problem.input_scale is not None:
            x = x * self.problem.input_scale
        m = x.numel() // x.shape[-1]
        run, state = self._calls[bucket_of(m)]
        if x.dim() == 2:
            y = run(state, x)
        else:
            y = run(state, x.reshape(m, x.shape[-1]))
            y = y.reshape(*x.shape[:-1], y.shape[-1])
        return y if y.dtype == x.dtype else y.to(x.dtype)

    @property
    def weight(self) -> PackedWeight:
        return self.problem.weight

    def describe(self) -> dict[str, str]:
        return {bucket_label(b): name for b, name in enumerate(self.choice)}

    def nbytes(self) -> int:
        """Bytes held at run time: the storages of the packed weight and of every chosen state, each once (a
        state that reads the weight's own codes adds nothing for them); the bias is the layer's parameter."""
        bias = self.problem.bias
        held = [*self.weight.tensors(), *(t for name, state in self.states.items()
                                          for t in self.paths[name].held(state))]
        skip = None if bias is None else bias.untyped_storage().data_ptr()
        return storage_bytes(t for t in held if t.untyped_storage().data_ptr() != skip)


def held_once(weight: PackedWeight, chosen: list[KernelPath]) -> PackedWeight:
    """``weight`` held in the layout of the first chosen path that reads its codes as they are (so that path's
    state and the weight share one copy), else bit-packed (fallbacks and saving derive the codes from it)."""
    for path in chosen:
        held = None if path.layout is None else weight.relaid(path.layout)
        if held is not None:
            return held
    return weight.relaid(BIT_PACKED)


@dataclass
class PackedConv:
    """Reconstruct the packed weight and run the layer's own conv op."""

    layer: Any
    weight: PackedWeight

    def __call__(self, x: Tensor) -> Tensor:
        return self.layer._op(self.layer.quantize_input(x), self.weight.dequantize().to(x.dtype))

    def describe(self) -> dict[str, str]:
        return {"all": "dequant_conv"}

    def nbytes(self) -> int:
        return self.weight.nbytes


@dataclass
class PackedEmbeddingBag:
    """Reconstruct the packed table and run the layer's bag reduction on it (no integer kernel): called as
    the layer, ``(input, offsets=None, per_sample_weights=None)``."""

    layer: Any
    weight: PackedWeight

    def __call__(self, input: Tensor, offsets: Tensor | None = None, per_sample_weights: Tensor | None = None) -> Tensor:
        return self.layer._op(BagInput(input, offsets, per_sample_weights), self.weight.dequantize())

    def describe(self) -> dict[str, str]:
        return {"all": "dequant_bag"}

    def nbytes(self) -> int:
        return self.weight.nbytes


@dataclass
class PackedEmbedding:
    """Gather one-byte codes by index and reconstruct only those rows. Uniform per-row formats (the
    presets' int8 tables) keep ``(N, 1)`` views of the scale / zero point for a direct
    ``(codes[idx] - Z[idx]) * S[idx]``."""

    layer: Any
    weight: PackedWeight
    codes: Tensor
    row_scale: Tensor | None = None
    row_zero: Tensor | None = None

    @classmethod
    def build(cls, layer: Any, qt: QTensor) -> "PackedEmbedding":
        g, qp = qt.spec.granularity, qt.qparams
        per_row = qt.spec.mapping == "uniform" and isinstance(g, PerChannel) and g.axis in (0, -2)
        scale = qp.scale.reshape(-1, 1).float() if per_row else None
        zero = qp.zero_point.reshape(-1, 1).float() if per_row and qp.zero_point is not None else None
        weight = PackedWeight.from_qtensor(qt, ONE_BYTE)  # the gathered codes are the weight's one copy
        return cls(layer, weight, weight.data, scale, zero)

    def __call__(self, idx: Tensor) -> Tensor:
        rows = idx.reshape(-1)
        if self.row_scale is not None:  # int8 codes promote to float32 inside the arithmetic: no extra copy
            codes = self.codes.index_select(0, rows)
            centred = codes if self.row_zero is None else codes - self.row_zero.index_select(0, rows)
            return (centred * self.row_scale.index_select(0, rows)).reshape(*idx.shape, -1)
        spec, qp = self.weight.spec, self.weight.qparams
        g = spec.granularity
        per_row = (isinstance(g, PerChannel) and g.axis == 0) or isinstance(g, PerGroup)
        if isinstance(g, PerTensor) or (per_row and (qp.levels is None or qp.levels.dim() == 1)):
            if per_row:  # parameters of the gathered rows only: (rows,) per channel, (rows, G) per group
                zero = None if qp.zero_point is None else qp.zero_point[rows]
                qp = QParams(qp.scale[rows], zero, qp.levels)
            out = dequantize(QTensor(self.codes[rows], qp, spec))
        else:
            out = F.embedding(rows, self.weight.dequantize())
        return out.reshape(*idx.shape, out.shape[-1])

    def describe(self) -> dict[str, str]:
        return {"all": "gather_rows"}

    def nbytes(self) -> int:
        return storage_bytes([*self.weight.tensors(), *(t for t in (self.row_scale, self.row_zero) if t is not None)])

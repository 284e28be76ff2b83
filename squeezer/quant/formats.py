"""One classifier from a layer's scheme to a named format, which every backend consults.

A :class:`Format` is a weight format name plus an activation format name; each backend (the kernel
paths of :mod:`squeezer.kernels.paths`, the exporters) keeps the set of names it runs, so "does this
backend run this layer" is a set lookup, and a refusal is :func:`unsupported_format` (one message shape).

Weight formats (``b`` = bits):

* uniform: ``<type>-<granularity>``; type ``int<b>`` (symmetric, signed codes, zero point 0), ``uint<b>``
  (asymmetric, unsigned codes and a zero point), ``int<b>-asym`` (asymmetric, signed codes), ``uint<b>-sym``
  (symmetric, unsigned codes: no negative level); granularity ``tensor``, ``channel`` (output channel,
  axis 0), ``channel:<axis>`` (any other axis), ``group`` (the group size is a parameter, not the format),
  e.g. ``w8`` -> ``int8-channel``, ``w4g128`` -> ``uint4-group``;
* ``codebook-int8-<granularity>``: every level an integer in [-127, 127] (binary ``{-1, 1}``, ternary and
  2-bit log2 / exp ``{-1, 0, 1}``), so ``levels[code]`` are int8 codes with zero point 0;
* ``codebook-<granularity>``: one shared table of float levels (log2, exp, per-tensor k-means);
* ``kmeans-<granularity>``: one learned table per block (per-channel / per-group k-means).

Activation formats: ``none``, or ``<mode>-<granularity>-<type>`` with the same vocabulary plus ``token``,
e.g. ``dynamic-token-int8`` (``w8a8``), ``dynamic-tensor-uint8`` (``w8a8-tensor``), ``static-tensor-uint8``.

The levels of binary, ternary, log2 and exp follow from the spec; k-means levels are data. So
:func:`classify` takes the layer's ``QParams.levels`` as an optional input: given, a k-means table is
classified by its values (one table of integers in [-127, 127] is ``codebook-int8``; ``(1, L)`` is one
table); without it, by the spec alone (a per-tensor k-means table is ``codebook``, never ``codebook-int8``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ConfigError
from .scheme import LayerScheme
from .spec import Granularity, PerChannel, PerGroup, PerTensor, PerToken, QuantSpec

AXIS0: tuple[str, ...] = ("tensor", "channel")
"""Granularities with parameters per tensor or per output channel (what int8 QDQ weights carry)."""


def integer_type(spec: QuantSpec) -> str:
    """``int8`` / ``uint8`` / ``int8-asym`` / ``uint8-sym``: the codes and zero point of a uniform spec."""
    if spec.symmetric:
        return f"int{spec.bits}" if spec.signed else f"uint{spec.bits}-sym"
    return f"int{spec.bits}-asym" if spec.signed else f"uint{spec.bits}"


def granularity_label(g: Granularity) -> str:
    """``tensor`` / ``channel`` (axis 0) / ``channel:<axis>`` / ``group`` / ``token``."""
    if isinstance(g, PerChannel):
        return "channel" if g.axis == 0 else f"channel:{g.axis}"
    if isinstance(g, PerGroup):
        return "group"
    return "token" if isinstance(g, PerToken) else "tensor"


def integer_types(bits: int) -> tuple[str, ...]:
    """The four integer type names of a width: ``int8``, ``uint8``, ``int8-asym``, ``uint8-sym``."""
    return f"int{bits}", f"uint{bits}", f"int{bits}-asym", f"uint{bits}-sym"


def uniform_formats(bits: Iterable[int], granularities: Iterable[str]) -> frozenset[str]:
    """Every uniform weight format name of these widths and granularities (all four integer types)."""
    grans = tuple(granularities)
    return frozenset(f"{t}-{g}" for b in bits for t in integer_types(b) for g in grans)


def _integer_levels(spec: QuantSpec, levels: Tensor | None) -> bool:
    if spec.mapping in ("binary", "ternary") or (spec.mapping in ("log2", "exp") and spec.bits == 2):
        return True  # levels within {-1, 0, 1}
    if spec.mapping != "kmeans" or levels is None:
        return False
    return bool(torch.equal(levels, levels.round()) and levels.abs().max() <= 127)


def _one_table(spec: QuantSpec, levels: Tensor | None) -> bool:
    if spec.mapping != "kmeans":
        return True
    if levels is None:
        return isinstance(spec.granularity, PerTensor)
    return levels.dim() == 1 or levels.shape[0] == 1


def weight_format(spec: QuantSpec, levels: Tensor | None = None) -> str:
    """The weight format name of ``spec`` (see the module doc); ``levels``: the weight's ``QParams.levels``."""
    g = granularity_label(spec.granularity)
    if spec.mapping == "uniform":
        return f"{integer_type(spec)}-{g}"
    if not _one_table(spec, levels):
        return f"kmeans-{g}"
    return f"codebook-int8-{g}" if _integer_levels(spec, levels) else f"codebook-{g}"


def activation_format(mode: str, spec: QuantSpec | None) -> str:
    """``none`` or ``<mode>-<granularity>-<type>``, e.g. ``dynamic-token-int8``."""
    return "none" if spec is None or mode == "none" else f"{mode}-{granularity_label(spec.granularity)}-{integer_type(spec)}"


@dataclass(frozen=True)
class Format:
    """A layer's format: weight and activation format names (``name``: ``int8-channel/dynamic-token-int8``)."""

    weight: str
    activation: str = "none"

    @property
    def name(self) -> str:
        return self.weight if self.activation == "none" else f"{self.weight}/{self.activation}"


def classify(scheme: LayerScheme, levels: Tensor | None = None) -> Format:
    """The :class:`Format` of ``scheme``; ``levels`` (optional, the weight's ``QParams.levels``) decides
    whether a k-means table is integral and shared (see the module doc)."""
    return Format(weight_format(scheme.weight, levels), activation_format(scheme.activation_mode, scheme.activation))


INT8_WEIGHTS: frozenset[str] = frozenset(f"{t}-{g}" for t in (*(f"int{b}" for b in range(2, 9)), "codebook-int8")
                                         for g in AXIS0)
"""Weight formats with an int8 form, ``W^ = q S`` with int8 codes ``q``, zero point 0 and ``S`` per output
channel or per tensor: symmetric signed codes of 2..8 bits as they are, integer codebooks as ``levels[code]``."""

STATIC_INT8: frozenset[str] = frozenset(f"static-tensor-{t}" for t in integer_types(8))
"""Static activation formats with one 8-bit grid per tensor (``QuantizeLinear`` / int8 q/dq of the input)."""


def unsupported_format(backend: str, layer: str, fmt: str, supported: Iterable[str], detail: str = "",
                       hint: str = "") -> ConfigError:
    """The one refusal every backend raises: ``layer 'fc1': format uint4-group (uint4 asym group(64)) is not
    supported by TFLite; supported: int8-channel, ...`` (``detail``: the spec in words; ``hint``: what to do)."""
    what = f"{fmt} ({detail})" if detail else fmt
    message = f"layer {layer!r}: format {what} is not supported by {backend}; supported: {', '.join(sorted(supported))}"
    return ConfigError(message + (f"; {hint}" if hint else ""))

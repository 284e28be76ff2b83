"""Candidate formats of a mixed-precision search: preset names plus ``"fp32"`` (keep float).

A format ``f`` for a weight ``W`` (``n`` elements: a layer's, or one matrix of a recurrent layer) costs ``bytes(f)``: the packed size of
``quantize(W, spec_f)`` (codes + scales + zero points, :func:`squeezer.quant.core.packed_nbytes`), or
``n * element_size`` for ``fp32``; its nominal width ``bits(f)`` is the spec's code width (32 for fp32).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ..config import QuantConfig
from ..resolve import resolve_config
from ..errors import ConfigError
from ..quant.core import compute_qparams, packed_nbytes

FLOAT = "fp32"
DEFAULT_FORMATS: tuple[str, ...] = ("w8", "w4g128", "w3g128", "w2g64", FLOAT)


def format_config(name: str) -> QuantConfig | None:
    """The preset behind a format name (``None`` for ``fp32``); a clear error for unknown names."""
    if name == FLOAT:
        return None
    try:
        cfg = resolve_config(name)
    except ConfigError as exc:
        raise ConfigError(f"unknown search format {name!r}: {exc}") from None
    if cfg.algorithm != "rtn":
        raise ConfigError(f"search format {name!r} names an algorithm: pass the algorithm separately")
    return cfg


def check_formats(formats: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Validate a list of format names (non-empty, no duplicates, each known)."""
    formats = tuple(formats)
    if not formats:
        raise ConfigError("formats must name at least one candidate format")
    if len(set(formats)) != len(formats):
        raise ConfigError(f"formats contain duplicates: {list(formats)}")
    for name in formats:
        format_config(name)
    return formats


def format_bits(name: str, weight: Tensor) -> int:
    """Nominal code width of ``name`` (the float element width for ``fp32``)."""
    cfg = format_config(name)
    return 8 * weight.element_size() if cfg is None else cfg.weight.bits


def format_bytes(name: str, weight: Tensor) -> int:
    """Packed bytes of ``weight`` in format ``name`` (round-to-nearest parameters)."""
    w = weight.detach()
    cfg = format_config(name)
    if cfg is None:
        return w.numel() * w.element_size()
    spec = cfg.weight
    return packed_nbytes(spec, w.numel(), compute_qparams(w.float(), spec))


def format_override(name: str) -> dict[str, Any]:
    """The ``QuantConfig.overrides`` entry that gives a layer format ``name``."""
    cfg = format_config(name)
    assert cfg is not None
    return {"weight": cfg.weight.to_dict(), "activation": None if cfg.activation is None else cfg.activation.to_dict(),
            "activation_mode": cfg.activation_mode, "observer": cfg.observer}

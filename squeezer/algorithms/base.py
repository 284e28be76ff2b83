"""The interface of a weight-quantization algorithm and the registry of algorithms.

An algorithm looks at one quantized layer (float weight, spec, current qparams) and the
statistics of that layer's calibration inputs, then decides the integer grid and rounding:
it ends by calling ``layer.set_quantized(weight, qparams)``, where ``weight`` is the float
tensor whose quantization (with ``qparams``) gives the chosen codes. Algorithms may also set
``layer.input_scale`` (a function-preserving per-input-channel factor, SmoothQuant / AWQ).
Every algorithm reuses :mod:`squeezer.quant.core`.
"""

from __future__ import annotations

from typing import Any, ClassVar

from ..errors import ConfigError
from ..modules.base import QuantMixin
from .stats import LayerStats


class Algorithm:
    """Base class; subclasses are dataclasses whose fields are the config's ``algorithm_options``."""

    name: ClassVar[str] = "abstract"
    needs_stats: ClassVar[bool] = True

    def applies_to(self, layer: QuantMixin) -> bool:
        """False for layers the algorithm cannot treat (they keep round-to-nearest)."""
        return True

    def quantize_layer(self, layer: QuantMixin, stats: LayerStats | None) -> None:
        raise NotImplementedError


ALGORITHMS: dict[str, type[Algorithm]] = {}


def register(cls: type[Algorithm]) -> type[Algorithm]:
    """Class decorator: make ``cls`` selectable by its ``name`` in configs and preset suffixes."""
    ALGORITHMS[cls.name] = cls
    return cls


def make_algorithm(name: str, options: dict[str, Any] | None = None) -> Algorithm:
    if name not in ALGORITHMS:
        raise ConfigError(f"unknown algorithm {name!r}; valid: {', '.join(sorted(ALGORITHMS))}")
    try:
        return ALGORITHMS[name](**(options or {}))
    except TypeError as exc:
        raise ConfigError(f"algorithm {name!r}: bad options {options}: {exc}") from None

"""`LayerScheme`: how one layer is quantized (what a quantized layer holds instead of the whole config).

A scheme is the weight :class:`QuantSpec`, the activation spec (or None) with its mode (``none``: weight
only; ``dynamic``: activation parameters computed per call; ``static``: calibrated once by the named
observer) and that observer's name. ``QuantConfig.for_layer`` resolves a model-wide config into one
scheme per layer; :func:`squeezer.quant.formats.classify` names the format a scheme stands for.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Literal

from ..errors import ConfigError
from .observers import OBSERVERS
from .spec import PerToken, QuantSpec

ActivationMode = Literal["none", "dynamic", "static"]
ACTIVATION_MODES: tuple[str, ...] = ("none", "dynamic", "static")


@dataclass(frozen=True)
class LayerScheme:
    """One layer's quantization; invalid combinations raise :class:`ConfigError`. Specs may be given as dicts."""

    weight: QuantSpec = field(default_factory=QuantSpec)
    activation: QuantSpec | None = None
    activation_mode: ActivationMode = "none"
    observer: str = "minmax"

    def __post_init__(self) -> None:
        if isinstance(self.weight, dict):
            object.__setattr__(self, "weight", QuantSpec.from_dict(self.weight))
        if isinstance(self.activation, dict):
            object.__setattr__(self, "activation", QuantSpec.from_dict(self.activation))
        if self.activation_mode not in ACTIVATION_MODES:
            raise ConfigError(f"activation_mode must be none, dynamic or static, got {self.activation_mode!r}")
        if (self.activation is None) != (self.activation_mode == "none"):
            raise ConfigError("activation spec and activation_mode must be given together (mode 'none' has no spec)")
        if self.activation is not None and self.activation.mapping != "uniform":
            raise ConfigError(f"activations support the uniform mapping only, got {self.activation.mapping!r}")
        if self.activation_mode == "static" and isinstance(self.activation.granularity, PerToken):
            raise ConfigError("static activations need per-tensor (or per-channel) ranges, not per-token")
        if self.observer not in OBSERVERS:
            raise ConfigError(f"unknown observer {self.observer!r}; valid: {', '.join(OBSERVERS)}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; ``LayerScheme.from_dict(s.to_dict()) == s``."""
        return {"weight": self.weight.to_dict(), "activation": None if self.activation is None else self.activation.to_dict(),
                "activation_mode": self.activation_mode, "observer": self.observer}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LayerScheme":
        """Build from a dict (JSON / YAML); unknown keys are an error naming the key."""
        if not isinstance(data, dict):
            raise ConfigError(f"a layer scheme must be a mapping, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown layer scheme field(s) {unknown}; known: {sorted(known)}")
        return cls(**data)

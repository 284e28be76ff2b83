"""`QuantSpec`: how one tensor is quantized.

Vocabulary (small frozen dataclasses, validated on construction):

* granularity -- which elements share quantization parameters
  - ``PerTensor()``: one set for the whole tensor;
  - ``PerChannel(axis)``: one set per index along ``axis`` (weights: axis 0 = output channel);
  - ``PerToken()``: activations, one set per row of the last dimension;
  - ``PerGroup(size)``: per row (axis 0), in consecutive groups of ``size`` along the flattened
    input dimension; ``K % size != 0`` gives a shorter last group.
* mapping -- how a block of real numbers becomes integers
  - ``uniform``: ``q = clip(round(x / S) + Z, qmin, qmax)``, ``x^ = (q - Z) * S``;
  - ``log2``: levels ``{0, +-S * 2^-k}``; ``exp``: levels ``{0, +-S * b^-k}`` with base ``b``
    fitted to the tensor; ``kmeans``: ``2^bits`` learned centroids (weight sharing);
  - ``binary``: ``x^ = alpha * sign(x)``, ``alpha = mean |x|`` (0 maps to ``-alpha``: no zero level);
  - ``ternary``: ``x^ = alpha * sign(x) * [|x| > delta]``, ``delta = 0.7 mean |x|``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Union

from ..errors import ConfigError

Mapping = Literal["uniform", "log2", "exp", "kmeans", "binary", "ternary"]
MAPPINGS: tuple[str, ...] = ("uniform", "log2", "exp", "kmeans", "binary", "ternary")


@dataclass(frozen=True)
class PerTensor:
    """One scale (and zero point / codebook) for the whole tensor."""

    def describe(self) -> str:
        return "tensor"


@dataclass(frozen=True)
class PerChannel:
    """One set of parameters per index along ``axis``."""

    axis: int = 0

    def describe(self) -> str:
        return f"channel(axis={self.axis})"


@dataclass(frozen=True)
class PerGroup:
    """Per row, in groups of ``size`` consecutive input elements (last group may be shorter)."""

    size: int = 128

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or isinstance(self.size, bool) or self.size <= 0:
            raise ConfigError(f"group size must be a positive integer, got {self.size!r}")

    def describe(self) -> str:
        return f"group({self.size})"


@dataclass(frozen=True)
class PerToken:
    """Activations: one set per row of the last dimension (all leading dims are tokens)."""

    def describe(self) -> str:
        return "token"


Granularity = Union[PerTensor, PerChannel, PerGroup, PerToken]


def granularity_from(value: Any) -> Granularity:
    """Parse ``"tensor"``, ``"channel"``, ``"channel:1"``, ``"group:128"``, an int (group size)
    or a mapping ``{"group": 128}`` / ``{"channel": 0}`` into a granularity object."""
    if isinstance(value, (PerTensor, PerChannel, PerGroup, PerToken)):
        return value
    if isinstance(value, bool):
        raise ConfigError(f"granularity must be tensor, token, channel[:axis] or group:SIZE, got {value!r}")
    if isinstance(value, int):
        return PerGroup(value)
    if isinstance(value, dict) and len(value) == 1:
        (key, arg), = value.items()
        return granularity_from(f"{key}:{arg}")
    if isinstance(value, str):
        kind, _, arg = value.partition(":")
        if kind == "tensor" and not arg:
            return PerTensor()
        if kind == "token" and not arg:
            return PerToken()
        number = arg.lstrip("-")
        if kind == "channel" and (not arg or number.isdigit()):
            return PerChannel(int(arg) if arg else 0)
        if kind == "group" and number.isdigit():
            return PerGroup(int(arg))
    raise ConfigError(f"granularity must be tensor, token, channel[:axis] or group:SIZE, got {value!r}")


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize one tensor.

    Args:
        bits: integer width, 1..16 (binary forces 1, ternary 2).
        symmetric: uniform only; ``Z = 0`` and ``S = max|x| / qmax`` when True,
            else ``S = (max - min) / (qmax - qmin)`` and an integer zero point.
        signed: integer range ``[-2^(b-1), 2^(b-1)-1]`` when True, else ``[0, 2^b - 1]``.
            ``None`` picks the usual choice: signed for symmetric, unsigned for asymmetric.
        granularity: ``PerTensor()``, ``PerChannel(axis)`` or ``PerGroup(size)``.
        mapping: one of ``uniform, log2, exp, kmeans, binary, ternary``.
        base: ``exp`` mapping only: fixed base ``b > 1``; ``None`` fits it by MSE.
    """

    bits: int = 8
    symmetric: bool = True
    signed: bool | None = None
    granularity: Granularity = field(default_factory=PerChannel)
    mapping: Mapping = "uniform"
    base: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or isinstance(self.bits, bool) or not 1 <= self.bits <= 16:
            raise ConfigError(f"bits must be an integer in 1..16, got {self.bits!r}")
        if self.mapping not in MAPPINGS:
            raise ConfigError(f"mapping must be one of {', '.join(MAPPINGS)}, got {self.mapping!r}")
        object.__setattr__(self, "granularity", granularity_from(self.granularity))
        if self.mapping == "binary" and self.bits != 1:
            raise ConfigError(f"binary mapping uses bits=1, got bits={self.bits}")
        if self.mapping == "ternary" and self.bits != 2:
            raise ConfigError(f"ternary mapping uses bits=2, got bits={self.bits}")
        if self.mapping in ("log2", "exp") and self.bits < 2:
            raise ConfigError(f"{self.mapping} mapping needs bits >= 2 (sign + exponent), got {self.bits}")
        if self.mapping == "uniform" and self.bits == 1 and self.symmetric and self.signed is not False:
            raise ConfigError("bits=1 symmetric uniform has no non-zero level; use mapping='binary'")
        if self.base is not None and (self.mapping != "exp" or not self.base > 1.0):
            raise ConfigError(f"base applies to mapping='exp' only and must be > 1, got {self.base!r}")
        if self.signed is None:
            object.__setattr__(self, "signed", bool(self.symmetric))

    @property
    def qmin(self) -> int:
        """Smallest integer code (uniform). Symmetric signed drops -2^(b-1) so the grid is symmetric."""
        if self.signed:
            return -(2 ** (self.bits - 1)) + (1 if self.symmetric else 0)
        return 0

    @property
    def qmax(self) -> int:
        """Largest integer code (uniform)."""
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def is_codebook(self) -> bool:
        """True for the non-uniform mappings (codes index a table of levels)."""
        return self.mapping != "uniform"

    def describe(self) -> str:
        """Short human label, e.g. ``int4 asym group(128)`` or ``kmeans4 tensor``."""
        if self.mapping == "uniform":
            kind = f"{'int' if self.signed else 'uint'}{self.bits} {'sym' if self.symmetric else 'asym'}"
        elif self.mapping in ("binary", "ternary"):
            kind = self.mapping
        else:
            kind = f"{self.mapping}{self.bits}"
        return f"{kind} {self.granularity.describe()}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; ``QuantSpec.from_dict(spec.to_dict()) == spec``."""
        data = asdict(self)
        g = self.granularity
        data["granularity"] = (
            g.describe().replace("(axis=", ":").replace("(", ":").rstrip(")")
        )
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "QuantSpec":
        """Build from a dict (YAML / JSON); unknown keys are an error naming the key."""
        if not isinstance(data, dict):
            raise ConfigError(f"a quant spec must be a mapping, got {type(data).__name__}")
        known = {"bits", "symmetric", "signed", "granularity", "mapping", "base"}
        unknown = sorted(map(str, set(data) - known))
        if unknown:
            raise ConfigError(f"unknown quant spec field(s) {unknown[:10]}; known: {sorted(known)}")
        return cls(**data)

"""The interface of a weight-quantization algorithm and the registry of algorithms.

An algorithm looks at one quantized layer (float weight, spec, current qparams) and the
statistics of that layer's calibration inputs, then decides the integer grid and rounding:
it ends by calling ``layer.set_quantized(weight, qparams)``, where ``weight`` is the float
tensor whose quantization (with ``qparams``) gives the chosen codes. Algorithms may also set
``layer.input_scale`` (a function-preserving per-input-channel factor, SmoothQuant / AWQ).
Every algorithm reuses :mod:`squeezer.quant.core`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from ..errors import ConfigError
from ..modules.base import QuantMixin
from .stats import LayerStats


class Algorithm:
    """Base class; subclasses are dataclasses whose fields are the config's ``algorithm_options``."""

    name: ClassVar[str] = "abstract"
    needs_stats: ClassVar[bool] = True
    first_only: ClassVar[str | None] = None
    """Why the algorithm must be the first step of a chain (e.g. it changes the layer's input), or None."""
    sample_rows: ClassVar[int] = 512
    """Calibration input rows kept per layer (``LayerStats.max_rows``): the report's layer-output error
    is measured on them; algorithms that search on rows (not only on ``X^T X``) keep more."""

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


class Chain(Algorithm):
    """Several algorithms on each layer, in order, e.g. ``"smoothquant+gptq"``: SmoothQuant moves
    activation outliers into the weight (``W' = W diag(s)``, inputs ``x / s``), then GPTQ rounds
    ``W'`` against the Hessian of the *smoothed* inputs. A step that changes ``input_scale`` by a
    factor ``d`` (per input column) hands the next steps :meth:`LayerStats.scaled` ``(d)``; one that
    rotates the input (``hadamard``, only as the first step) :meth:`LayerStats.rotated`.
    Each step treats the layers it applies to; the others pass through."""

    def __init__(self, steps: list[Algorithm]) -> None:
        self.steps = steps
        self.name = "+".join(step.name for step in steps)  # type: ignore[misc]
        self.needs_stats = any(step.needs_stats for step in steps)  # type: ignore[misc]
        self.sample_rows = max(step.sample_rows for step in steps)  # type: ignore[misc]

    def applies_to(self, layer: QuantMixin) -> bool:
        return any(step.applies_to(layer) for step in self.steps)

    def quantize_layer(self, layer: QuantMixin, stats: LayerStats | None) -> None:
        for step in self.steps:
            if not step.applies_to(layer):
                continue
            before, rotation = layer.input_scale, layer.input_rotation
            step.quantize_layer(layer, stats)
            after = layer.input_scale
            if stats is not None and layer.input_rotation != rotation:
                stats = stats.rotated(layer.rotation_matrix())
            if stats is not None and after is not None and after is not before:
                stats = stats.scaled(after if before is None else after / before)


def algorithm_names(name: object, where: str = "") -> list[str]:
    """The registered algorithms a name stands for (``"smoothquant+gptq"`` -> both); ConfigError
    naming the unknown part, prefixed by ``where`` (the field or preset that holds the name)."""
    prefix = f"{where}: " if where else ""
    if not isinstance(name, str):
        raise ConfigError(f"{prefix}an algorithm is named by a string, got {name!r}")
    parts = name.split("+")
    unknown = [p for p in parts if p not in ALGORITHMS]
    late = None if unknown else next((p for p in parts[1:] if ALGORITHMS[p].first_only), None)
    if late is not None:
        raise ConfigError(f"{prefix}algorithm {name!r}: {late!r} {ALGORITHMS[late].first_only} and must be the first "
                          f"step (e.g. {late}+gptq)")
    if unknown or len(set(parts)) != len(parts):
        what = (f"unknown algorithm {unknown[0]!r}" + (f" in {name!r}" if len(parts) > 1 else "") if unknown
                else f"algorithm {name!r} repeats a step")
        raise ConfigError(f"{prefix}{what}; valid: {', '.join(sorted(ALGORITHMS))}, "
                          "or several joined by '+' (e.g. smoothquant+gptq)")
    return parts


AlgorithmSpelling = str | Sequence[str | Mapping[str, Mapping[str, Any] | None]]
"""``"smoothquant+gptq"`` (a preset suffix) or the same chain as a list of algorithm steps:
``["smoothquant", {"gptq": {"act_order": True}}]``."""


def split_algorithms(spelling: AlgorithmSpelling, options: Mapping[str, Any] | None = None,
                     where: str = "") -> list[tuple[str, dict[str, Any]]]:
    """The ``(name, options)`` steps of an algorithm chain, in order. A ``"a+b"`` string takes
    ``options`` as a config's ``algorithm_options`` (one algorithm: its fields; a chain: per step,
    ``{"gptq": {...}}``); a list carries each step's options itself. Names are checked by
    :func:`algorithm_names`; errors are prefixed by ``where``."""
    prefix = f"{where}: " if where else ""
    if isinstance(spelling, str):
        parts = algorithm_names(spelling, where)
        options = dict(options or {})
        if len(parts) == 1:
            return [(spelling, options)]
        stray = [k for k in options if k not in parts]
        if stray or not all(isinstance(v, Mapping) for v in options.values()):
            raise ConfigError(f"{prefix}algorithm {spelling!r}: options are given per step, e.g. "
                              f"{{{parts[-1]!r}: {{...}}}}; got {options}")
        return [(p, dict(options.get(p) or {})) for p in parts]
    if options:
        raise ConfigError(f"{prefix}a list of algorithm steps carries its own options, got options={dict(options)}")
    if not isinstance(spelling, Sequence) or not spelling:
        raise ConfigError(f"{prefix}an algorithm is a name such as 'smoothquant+gptq' or a non-empty list of "
                          f"steps, got {spelling!r}")
    steps = [_listed_step(item, prefix) for item in spelling]
    algorithm_names("+".join(name for name, _ in steps), where)
    return steps


def _listed_step(item: Any, prefix: str) -> tuple[str, dict[str, Any]]:
    """``"gptq"`` or ``{"gptq": {...}}`` -> ``("gptq", {...})``."""
    if isinstance(item, str):
        return item, {}
    if isinstance(item, Mapping) and len(item) == 1:
        (name, options), = item.items()
        if isinstance(name, str) and (options is None or isinstance(options, Mapping)):
            return name, dict(options or {})
    raise ConfigError(f"{prefix}an algorithm step is a name or {{name: options}}, got {item!r}")


def algorithm_spelling(steps: list[tuple[str, dict[str, Any]]]) -> tuple[str, dict[str, Any]]:
    """``(algorithm, algorithm_options)`` of a :class:`QuantConfig` for the steps of a chain."""
    name = "+".join(n for n, _ in steps)
    return name, steps[0][1] if len(steps) == 1 else {n: o for n, o in steps if o}


def make_algorithm(name: AlgorithmSpelling, options: Mapping[str, Any] | None = None) -> Algorithm:
    """One algorithm with ``options`` (its fields), or a :class:`Chain` of the typed algorithm
    steps that :func:`split_algorithms` reads from ``name``."""
    steps = [_algorithm(n, o) for n, o in split_algorithms(name, options)]
    return steps[0] if len(steps) == 1 else Chain(steps)


def _algorithm(name: str, options: dict[str, Any]) -> Algorithm:
    try:
        return ALGORITHMS[name](**options)
    except TypeError as exc:
        raise ConfigError(f"algorithm {name!r}: bad options {options}: {exc}") from None

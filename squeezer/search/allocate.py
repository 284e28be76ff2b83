"""Bit allocation: one format per layer, chosen by an integer programme under a budget.

With ``x[l, f] in {0, 1}`` (layer ``l`` takes format ``f``) and a sensitivity score ``s[l, f]``:

    minimise   sum_{l,f} s[l, f] x[l, f]
    subject to sum_f x[l, f] = 1                                   (one format per layer)
               fixed_bytes + sum bytes[l, f] x[l, f] <= budget.bytes     (model bytes)
               sum bits[l, f] n_l x[l, f] <= budget.bits * sum_l n_l      (mean code bits / weight)
               sum macs_l bits[l, f] a_f x[l, f] <= budget.bops             (bit operations per row,
                                                              a_f: activation bits, 32 when float)
               latency_fixed + sum t[l, f] x[l, f] <= budget.latency_ms     (measured batch-1 ms)

               x[m, fp32] = x[m', fp32]      (the matrices m, m' of one recurrent layer: all float or none)

solved exactly by :func:`scipy.optimize.milp` (HiGHS branch and bound). A layer ``l`` is a unit of the
sensitivity table: a layer, or one weight matrix of a recurrent layer (``lstm.weight_hh_l0``), so the
matrices of one layer may take different formats. The result converts to a :class:`QuantConfig` whose
``overrides`` pin each unit's format (``fp32`` layers are ignored).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from ..config import QuantConfig
from ..errors import ConfigError
from .formats import FLOAT, format_config, format_override
from .latency import LatencyTable
from .sensitivity import Sensitivity, split_unit


@dataclass(frozen=True)
class Budget:
    """Upper bounds; at least one must be set. ``bits``: mean code bits per candidate weight."""

    bytes: float | None = None
    bits: float | None = None
    bops: float | None = None
    latency_ms: float | None = None

    def __post_init__(self) -> None:
        given = {k: v for k, v in self.__dict__.items() if v is not None}
        if not given:
            raise ConfigError("a budget needs at least one of bytes, bits, bops, latency_ms")
        for name, value in given.items():
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ConfigError(f"budget {name} must be a positive number, got {value!r}")

    @classmethod
    def parse(cls, value: Budget | dict[str, float] | float) -> Budget:
        """A :class:`Budget`, a mapping of its fields, or a number (mean bits per weight)."""
        if isinstance(value, Budget):
            return value
        if isinstance(value, dict):
            unknown = sorted(set(value) - {"bytes", "bits", "bops", "latency_ms"})
            if unknown:
                raise ConfigError(f"unknown budget field(s) {unknown}; valid: bytes, bits, bops, latency_ms")
            return cls(**value)
        if isinstance(value, (int, float)):
            return cls(bits=float(value))
        raise ConfigError(f"budget must be a Budget, a mapping or a number of bits, got {type(value).__name__}")


@dataclass
class Allocation:
    """The chosen format per layer and its cost under every measure."""

    choice: dict[str, str]
    objective: float
    bytes: int
    bits: float
    bops: float
    latency_ms: float | None
    algorithm: str = "rtn"
    score: str = "rel_mse"
    extra: dict[str, Any] = field(default_factory=dict)

    def config(self, base: QuantConfig | None = None) -> QuantConfig:
        """A config that gives every layer its chosen format (see :func:`choice_config`)."""
        return choice_config(self.choice, self.algorithm, base)

    def to_dict(self) -> dict[str, Any]:
        return {"choice": self.choice, "objective": self.objective, "bytes": self.bytes, "bits": self.bits,
                "bops": self.bops, "latency_ms": self.latency_ms, "algorithm": self.algorithm, "score": self.score,
                "counts": {f: list(self.choice.values()).count(f) for f in dict.fromkeys(self.choice.values())},
                **self.extra}


def choice_config(choice: dict[str, str], algorithm: str = "rtn", base: QuantConfig | None = None) -> QuantConfig:
    """A config taking exactly the layers of ``choice``, each pinned to its format by an override (a
    recurrent layer: the layer to the format of its first matrix, each matrix to its own, read by
    :meth:`QuantConfig.for_matrix`); ``fp32`` layers are ignored. ``base`` contributes its layer types, ignore
    list and algorithm options. A :class:`ConfigError` names a recurrent layer whose matrices are partly fp32."""
    base = base or QuantConfig()
    quantized = {n: f for n, f in choice.items() if f != FLOAT}
    layers: dict[str, str] = {}
    for unit, fmt in quantized.items():
        layers.setdefault(split_unit(unit)[0], fmt)
    partly = sorted({split_unit(u)[0] for u, f in choice.items() if f == FLOAT} & set(layers))
    if partly:
        raise ConfigError(f"recurrent layer {partly[0]!r}: its matrices are all fp32 or all quantized, got "
                          f"{ {u: f for u, f in choice.items() if split_unit(u)[0] == partly[0]} }")
    pin = {f"^{re.escape(n)}$": format_override(f) for n, f in layers.items()}
    pin.update({f"^{re.escape(u)}$": format_override(f) for u, f in quantized.items() if split_unit(u)[1]})
    first = format_config(next(iter(quantized.values()))) if quantized else None
    top = {} if first is None else {"weight": first.weight, "activation": first.activation,
                                    "activation_mode": first.activation_mode, "observer": first.observer}
    include = tuple(f"^{re.escape(n)}$" for n in layers) or ("^$",)
    return replace(base, **top, include=include, overrides=pin, algorithm=algorithm, name="mixed")


def _tied_float(layers: list[str], fmts: list[str]) -> list[LinearConstraint]:
    """``x[m, fp32] = x[m', fp32]`` for consecutive matrices of each recurrent layer."""
    if FLOAT not in fmts:
        return []
    nf, col = len(fmts), fmts.index(FLOAT)
    groups: dict[str, list[int]] = {}
    for i, unit in enumerate(layers):
        layer, matrix = split_unit(unit)
        if matrix is not None:
            groups.setdefault(layer, []).append(i)
    rows = []
    for members in groups.values():
        for a, b in zip(members, members[1:]):
            row = np.zeros(len(layers) * nf)
            row[a * nf + col], row[b * nf + col] = 1, -1
            rows.append(row)
    return [LinearConstraint(np.array(rows), 0, 0)] if rows else []


def _matrix(table: dict[str, dict[str, float]], layers: list[str], fmts: list[str]) -> np.ndarray:
    """``(layers, formats)`` array of a per-layer, per-format table."""
    return np.array([[table[l][f] for f in fmts] for l in layers], dtype=np.float64)


def _act_bits(fmt: str) -> int:
    cfg = format_config(fmt)
    return 32 if cfg is None or cfg.activation is None else cfg.activation.bits


def costs(sens: Sensitivity, fmt_choice: dict[str, str], latency: LatencyTable | None = None) -> dict[str, float]:
    """Bytes, mean bits, BOPs (and latency) of a format choice."""
    params = sum(sens.params.values())
    out = {
        "bytes": sens.fixed_bytes + sum(sens.bytes[l][f] for l, f in fmt_choice.items()),
        "bits": sum(sens.bits[l][f] * sens.params[l] for l, f in fmt_choice.items()) / max(params, 1),
        "bops": sum(sens.macs[l] * sens.bits[l][f] * _act_bits(f) for l, f in fmt_choice.items()),
    }
    out["latency_ms"] = None if latency is None else latency.total(fmt_choice)
    return out


def allocate(sens: Sensitivity, budget: Budget | dict[str, float] | float, *, score: str = "rel_mse",
             latency: LatencyTable | None = None, formats: list[str] | None = None) -> Allocation:
    """Solve the integer programme above; a :class:`ConfigError` names the budget when even the
    smallest choice exceeds it."""
    budget = Budget.parse(budget)
    if budget.latency_ms is not None and latency is None:
        raise ConfigError("a latency budget needs a measured latency table (squeezer.search.measure_latency)")
    table = sens.scores(score)
    fmts = list(formats or sens.formats)
    unknown = [f for f in fmts if f not in sens.formats]
    if unknown:
        raise ConfigError(f"formats {unknown} were not measured; measured: {sens.formats}")
    layers, nl, nf = sens.layers, len(sens.layers), len(fmts)
    c = np.nan_to_num(_matrix(table, layers, fmts).reshape(-1), nan=1e30, posinf=1e30)
    rows: list[tuple[str, np.ndarray, float, float]] = []  # name, coefficients, fixed part, unit divisor
    params = sum(sens.params.values())
    if budget.bytes is not None:
        rows.append(("bytes", _matrix(sens.bytes, layers, fmts), sens.fixed_bytes, 1.0))
    if budget.bits is not None:
        rows.append(("bits", _matrix(sens.bits, layers, fmts) * np.array([[sens.params[l]] for l in layers]),
                     0.0, float(params)))
    if budget.bops is not None:
        bops = {l: {f: sens.macs[l] * sens.bits[l][f] * _act_bits(f) for f in fmts} for l in layers}
        rows.append(("bops", _matrix(bops, layers, fmts), 0.0, 1.0))
    if budget.latency_ms is not None:
        rows.append(("latency_ms", _matrix(latency.ms, layers, fmts), latency.fixed_ms, 1.0))
    for name, a, fixed, unit in rows:
        least = (fixed + a.min(axis=1).sum()) / unit
        if least > getattr(budget, name) * (1 + 1e-12):
            raise ConfigError(f"budget {name}={getattr(budget, name):g} is below the smallest possible model "
                              f"({least:.6g} {name} with formats {fmts})")
    one = np.zeros((nl, nl * nf))
    for l in range(nl):
        one[l, l * nf:(l + 1) * nf] = 1
    constraints = [LinearConstraint(one, 1, 1), *_tied_float(layers, fmts)]
    constraints += [LinearConstraint(a.reshape(1, -1), -np.inf, getattr(budget, name) * unit - fixed)
                    for name, a, fixed, unit in rows]
    res = milp(c, constraints=constraints, integrality=np.ones_like(c), bounds=Bounds(0, 1))
    if res.x is None:
        raise ConfigError(f"no format choice meets the budget {budget} ({res.message})")
    x = np.round(res.x).reshape(nl, nf)
    choice = {l: fmts[int(x[i].argmax())] for i, l in enumerate(layers)}
    cost = costs(sens, choice, latency)
    return Allocation(choice, float(res.fun), int(cost["bytes"]), cost["bits"], cost["bops"], cost["latency_ms"],
                      sens.algorithm, score)

"""Quantization error metrics between a reference ``x`` and its approximation ``y``.

* ``mse = mean((x - y)^2)``
* ``sqnr_db = 10 log10(sum x^2 / sum (x - y)^2)`` (``inf`` when exact)
* ``cosine = <x, y> / (|x| |y|)`` over the flattened tensors
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass

from torch import Tensor


_CHUNK = 1 << 20  # elements per float64 chunk (8 MiB): no full-size float64 copies of big weights


def _sums(x: Tensor, y: Tensor) -> tuple[float, float, float, float, int]:
    """``(sum (x-y)^2, sum x^2, sum x y, sum y^2, n)`` in float64, over the flattened tensors."""
    a, b = x.detach().reshape(-1), y.detach().reshape(-1)
    if a.numel() != b.numel():
        raise ValueError(f"cannot compare tensors of {a.numel()} and {b.numel()} elements")
    noise = signal = dot = approx = 0.0
    for lo in range(0, a.numel(), _CHUNK):
        u, v = a[lo:lo + _CHUNK].double(), b[lo:lo + _CHUNK].double()
        d = u - v
        noise += float(d @ d)
        signal += float(u @ u)
        dot += float(u @ v)
        approx += float(v @ v)
    return noise, signal, dot, approx, a.numel()


def _added(s: tuple[float, float, float, float, int], t: tuple[float, float, float, float, int]
           ) -> tuple[float, float, float, float, int]:
    """Sums of two parts (see :func:`_sums`) as the sums of the whole."""
    return tuple(a + b for a, b in zip(s, t))  # type: ignore[return-value]


def _mse(s: tuple[float, float, float, float, int]) -> float:
    return s[0] / s[4] if s[4] else math.nan


def _sqnr_db(s: tuple[float, float, float, float, int]) -> float:
    noise, signal = s[0], s[1]
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def _cosine(s: tuple[float, float, float, float, int]) -> float:
    denom = math.sqrt(s[1]) * math.sqrt(s[3])
    if denom == 0.0:
        return 1.0 if s[0] == 0.0 else 0.0
    return s[2] / denom


def mse(x: Tensor, y: Tensor) -> float:
    return _mse(_sums(x, y))


def sqnr_db(x: Tensor, y: Tensor) -> float:
    return _sqnr_db(_sums(x, y))


def cosine(x: Tensor, y: Tensor) -> float:
    return _cosine(_sums(x, y))


@dataclass
class ErrorStats:
    """MSE, SQNR (dB) and cosine of one comparison."""

    mse: float
    sqnr_db: float
    cosine: float

    @classmethod
    def between(cls, x: Tensor, y: Tensor) -> "ErrorStats":
        return cls.over_blocks([(x, y)])

    @classmethod
    def over_blocks(cls, pairs: Iterable[tuple[Tensor, Tensor]]) -> "ErrorStats":
        """The stats of ``x`` vs ``y`` given block by block as ``(x_b, y_b)`` pairs (float64 sums), so that
        neither needs to exist in full (e.g. a big weight table and its fake-quantized rows)."""
        total = (0.0, 0.0, 0.0, 0.0, 0)
        for x, y in pairs:
            total = _added(total, _sums(x, y))
        return cls(_mse(total), _sqnr_db(total), _cosine(total))

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


class ErrorAccumulator:
    """Running sums over many batches, so error stats of a layer's output need no stored outputs."""

    def __init__(self) -> None:
        self.sums = (0.0, 0.0, 0.0, 0.0, 0)  # as _sums: (noise, signal, dot, approx^2, count)

    @property
    def count(self) -> int:
        return self.sums[4]

    def update(self, x: Tensor, y: Tensor) -> None:
        """Add one batch (float32 dot products: this runs on every layer output of a calibration pass)."""
        a, b = x.detach().float().flatten(), y.detach().float().flatten()
        d = a - b
        batch = (float(d @ d), float(a @ a), float(a @ b), float(b @ b), a.numel())
        self.sums = _added(self.sums, batch)

    def stats(self) -> ErrorStats:
        if self.count == 0:
            raise ValueError("no batches were accumulated")
        return ErrorStats(_mse(self.sums), _sqnr_db(self.sums), _cosine(self.sums))

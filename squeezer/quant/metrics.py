"""Quantization error metrics between a reference ``x`` and its approximation ``y``.

* ``mse = mean((x - y)^2)``
* ``sqnr_db = 10 log10(sum x^2 / sum (x - y)^2)`` (``inf`` when exact)
* ``cosine = <x, y> / (|x| |y|)`` over the flattened tensors
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor


def mse(x: Tensor, y: Tensor) -> float:
    return float(((x.double() - y.double()) ** 2).mean())


def sqnr_db(x: Tensor, y: Tensor) -> float:
    noise = float(((x.double() - y.double()) ** 2).sum())
    signal = float((x.double() ** 2).sum())
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def cosine(x: Tensor, y: Tensor) -> float:
    a, b = x.double().flatten(), y.double().flatten()
    denom = float(a.norm() * b.norm())
    if denom == 0.0:
        return 1.0 if torch.equal(a, b) else 0.0
    return float(a @ b) / denom


@dataclass
class ErrorStats:
    """MSE, SQNR (dB) and cosine of one comparison."""

    mse: float
    sqnr_db: float
    cosine: float

    @classmethod
    def between(cls, x: Tensor, y: Tensor) -> "ErrorStats":
        return cls(mse(x, y), sqnr_db(x, y), cosine(x, y))

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


class ErrorAccumulator:
    """Running sums over many batches, so error stats of a layer's output need no stored outputs."""

    def __init__(self) -> None:
        self.noise = self.signal = self.dot = self.approx_sq = 0.0
        self.count = 0

    def update(self, x: Tensor, y: Tensor) -> None:
        """Add one batch (float32 dot products: this runs on every layer output of a calibration pass)."""
        a, b = x.detach().float().flatten(), y.detach().float().flatten()
        d = a - b
        self.noise += float(d @ d)
        self.signal += float(a @ a)
        self.dot += float(a @ b)
        self.approx_sq += float(b @ b)
        self.count += a.numel()

    def stats(self) -> ErrorStats:
        if self.count == 0:
            raise ValueError("no batches were accumulated")
        noise_mse = self.noise / self.count
        sq = math.inf if self.noise == 0 else (10 * math.log10(self.signal / self.noise) if self.signal else -math.inf)
        denom = math.sqrt(self.signal * self.approx_sq)
        cos = self.dot / denom if denom else (1.0 if self.noise == 0 else 0.0)
        return ErrorStats(noise_mse, sq, cos)

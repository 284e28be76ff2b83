"""Activation-range observers for static quantization calibration.

An observer sees calibration batches through ``update(x)``, proposes a range ``[lo, hi]``
and ``qparams()`` turns it into ``core.uniform_qparams(lo, hi, spec)``.

* ``minmax``: ``lo = min_t min(x_t)``, ``hi = max_t max(x_t)`` (per channel for ``PerChannel``).
* ``moving_average``: the first batch sets the range, then ``lo <- m lo + (1 - m) min(x_t)``
  (same for ``hi``).

Histogram observers (per tensor) count ``bins`` bins over the ``[min, max]`` seen so far; a
batch that widens the range moves the old counts onto the new edges through the old
piecewise-linear CDF ``F``. ``|x|`` has CDF ``F(t) - F(-t)``, so it needs no second pass.

* ``percentile``: ``[F^-1(1 - p), F^-1(p)]``, ``p = percentile / 100``; symmetric: ``+-G^-1(p)``
  with ``G`` the CDF of ``|x|``.
* ``mse``: among ``alpha [lo, hi]``, ``alpha = 0.01 .. 1`` (symmetric: ``alpha [-max|x|, max|x|]``),
  least ``sum_inside n_b S^2 / 12 + sum_outside n_b (c_b - clip(c_b))^2`` (bin counts ``n_b``,
  centres ``c_b``; ``S`` and the clip range from the candidate's uniform parameters).
* ``entropy`` (TensorRT): on the ``|x|`` histogram, for each bin ``i >= n_levels``,
  ``P = hist[:i]`` plus the outlier mass in ``P[i-1]``; ``Q = hist[:i]`` merged into
  ``n_levels`` near-equal buckets, each spread evenly over the bins where ``P > 0``. The
  least ``KL(P || Q)`` (bins where ``Q`` is 0 but ``P`` is not get ``Q = 1e-4``, as in the
  reference implementations' smoothing) gives ``t = edge[i]``; range ``[-t, t]`` (symmetric) else
  ``[max(min, -t), min(max, t)]``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import numpy as np
import torch
from scipy.special import rel_entr
from torch import Tensor

from ..distributed import Reducer
from ..errors import ConfigError, DataError
from .blocks import to_blocks
from .core import QParams, representable_range, uniform_qparams
from .spec import PerChannel, PerTensor, QuantSpec


class Observer:
    """Base class: validates input, keeps ``lo`` / ``hi``, turns the range into ``QParams``."""

    def __init__(self, spec: QuantSpec):
        if spec.mapping != "uniform":
            raise ConfigError(f"observers calibrate uniform quantizers, got mapping={spec.mapping!r}")
        if not isinstance(spec.granularity, (PerTensor, PerChannel)):
            raise ConfigError(
                f"observers support per-tensor or per-channel granularity, got {spec.granularity.describe()}"
            )
        self.spec = spec
        self.lo: Tensor | None = None
        self.hi: Tensor | None = None

    def update(self, x: Tensor) -> None:
        """Accumulate the statistics of one batch (detached, as float32)."""
        x = torch.as_tensor(x).detach().float()
        if x.numel() == 0:
            raise DataError(f"observer got an empty tensor of shape {tuple(x.shape)}")
        bad = int((~torch.isfinite(x)).sum())
        if bad:
            raise DataError(f"observer got {bad} NaN/Inf value(s) in a tensor of {x.numel()} elements")
        self._observe(x)

    def range(self) -> tuple[Tensor, Tensor]:
        """``(lo, hi)`` float tensors: shape ``()`` per tensor, ``(C,)`` per channel."""
        if self.lo is None:
            raise DataError("observer has seen no data")
        return self._range()

    def qparams(self) -> QParams:
        """Uniform scale / zero point for :meth:`range`."""
        lo, hi = self.range()
        return uniform_qparams(lo, hi, self.spec)

    def _batch_range(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if isinstance(self.spec.granularity, PerTensor):
            return x.amin(), x.amax()
        blocks = to_blocks(x, self.spec.granularity).data
        if self.lo is not None and self.lo.shape[0] != blocks.shape[0]:
            raise DataError(f"observer saw {self.lo.shape[0]} channels, this batch has {blocks.shape[0]}")
        return blocks.amin(dim=1), blocks.amax(dim=1)

    def _observe(self, x: Tensor) -> None:
        lo, hi = self._batch_range(x)
        self.lo, self.hi = (lo, hi) if self.lo is None else self._merge(lo, hi)

    def _merge(self, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
        """The running range combined with one batch's ``(lo, hi)``."""
        raise NotImplementedError

    def _range(self) -> tuple[Tensor, Tensor]:
        return self.lo, self.hi

    def reduce(self, reducer: Reducer) -> bool:
        """Combine what every process of ``reducer`` observed on its own batches; True when the batches must
        be observed once more and ``reduce`` called again (see :func:`reduce_observers`). An observer whose
        state depends on the order of the batches cannot be combined: a ``ConfigError`` names it."""
        if not reducer.active:
            return False
        raise ConfigError(f"observer {type(self).__name__} depends on the order of the calibration batches and "
                          "cannot be combined across processes: use minmax, percentile, mse or entropy")

    def _reduce_range(self, reducer: Reducer) -> bool:
        """``lo <- min_r lo_r``, ``hi <- max_r hi_r`` (a process that saw nothing takes part with +-inf);
        False when no process saw data."""
        size = int(reducer.max(torch.tensor(-1.0 if self.lo is None else float(self.lo.numel()))))
        if size < 0:
            return False
        shape = () if isinstance(self.spec.granularity, PerTensor) else (size,)
        lo = torch.full(shape, float("inf")) if self.lo is None else self.lo
        hi = torch.full(shape, float("-inf")) if self.hi is None else self.hi
        self.lo, self.hi = reducer.min(lo), reducer.max(hi)
        return True


class MinMaxObserver(Observer):
    """Running minimum and maximum (per channel for a ``PerChannel`` spec)."""

    def reduce(self, reducer: Reducer) -> bool:
        """The min / max over all processes' batches, exactly."""
        if reducer.active:
            self._reduce_range(reducer)
        return False

    def _merge(self, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
        return torch.minimum(self.lo, lo), torch.maximum(self.hi, hi)


class MovingAverageMinMaxObserver(Observer):
    """Exponential moving average of the per-batch minimum and maximum."""

    def __init__(self, spec: QuantSpec, momentum: float = 0.9):
        super().__init__(spec)
        if not 0.0 <= momentum <= 1.0:
            raise ConfigError(f"momentum must be in [0, 1], got {momentum!r}")
        self.momentum = momentum

    def _merge(self, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
        m = self.momentum
        return m * self.lo + (1 - m) * lo, m * self.hi + (1 - m) * hi


class HistogramObserver(Observer):
    """Per-tensor histogram of ``bins`` counts over the ``[min, max]`` seen so far."""

    def __init__(self, spec: QuantSpec, bins: int = 2048):
        super().__init__(spec)
        if not isinstance(spec.granularity, PerTensor):
            raise ConfigError(f"{type(self).__name__} is per-tensor only, got {spec.granularity.describe()}")
        if not isinstance(bins, int) or isinstance(bins, bool) or bins < 2:
            raise ConfigError(f"bins must be an integer >= 2, got {bins!r}")
        self.bins = bins
        self.counts = np.zeros(bins)
        self._common_range = False  # the range was agreed across processes: counts only

    def edges(self) -> np.ndarray:
        """The ``bins + 1`` bin edges over the seen range."""
        return np.linspace(float(self.lo), float(self.hi), self.bins + 1)

    def cdf(self, points: np.ndarray) -> np.ndarray:
        """Number of seen values ``<= points``, with values spread evenly inside each bin."""
        cum = np.concatenate(([0.0], np.cumsum(self.counts)))
        return np.interp(points, self.edges(), cum)

    def abs_histogram(self) -> tuple[np.ndarray, np.ndarray]:
        """``(counts, edges)`` of ``|x|`` over ``[0, max|x|]`` with ``bins`` bins, from the CDF."""
        edges = np.linspace(0.0, max(-float(self.lo), float(self.hi)), self.bins + 1)
        return self._counts_at(edges, self.cdf(edges) - self.cdf(-edges)), edges

    def _counts_at(self, edges: np.ndarray, cum: np.ndarray) -> np.ndarray:
        # ``edges`` span every seen value: all mass lies in [edges[0], edges[-1]].
        cum[0], cum[-1] = 0.0, self.counts.sum()
        return np.diff(cum)

    def _observe(self, x: Tensor) -> None:
        if self._common_range:
            x = x.clamp(float(self.lo), float(self.hi))
        lo, hi = x.amin(), x.amax()
        if self.lo is None:
            self.lo, self.hi = lo, hi
        elif lo < self.lo or hi > self.hi:
            lo, hi = torch.minimum(self.lo, lo), torch.maximum(self.hi, hi)
            new_edges = np.linspace(float(lo), float(hi), self.bins + 1)
            self.counts = self._counts_at(new_edges, self.cdf(new_edges))
            self.lo, self.hi = lo, hi
        hist = torch.histc(x.double(), self.bins, float(self.lo), float(self.hi))
        self.counts = self.counts + hist.cpu().numpy()

    def reduce(self, reducer: Reducer) -> bool:
        """Two rounds: first agree on the range (min / max over processes) and restart the counts (True: observe
        the batches again, on that fixed range); then sum the counts. The result is the histogram of all
        processes' values over the common range, whatever the split (counts are whole numbers: sums are exact)."""
        if not reducer.active:
            return False
        if self._common_range:
            self.counts = reducer.sum(torch.from_numpy(self.counts)).numpy()
            return False
        if not self._reduce_range(reducer):
            return False
        self._common_range = True
        self.counts = np.zeros(self.bins)
        return True

    def _range(self) -> tuple[Tensor, Tensor]:
        if self.lo == self.hi:  # a single value: nothing to clip
            return self.lo, self.hi
        lo, hi = self._clip_range()
        return torch.tensor(lo, dtype=torch.float32), torch.tensor(hi, dtype=torch.float32)

    def _clip_range(self) -> tuple[float, float]:
        raise NotImplementedError


def _quantile(counts: np.ndarray, edges: np.ndarray, q: float) -> float:
    """Value below which a fraction ``q`` of the histogram mass lies (even spread inside bins)."""
    cum = np.cumsum(counts)
    target = q * cum[-1]
    k = min(int(np.searchsorted(cum, target)), len(counts) - 1)  # first bin reaching target
    frac = (target - (cum[k] - counts[k])) / counts[k] if counts[k] > 0 else 0.0
    return float(edges[k] + frac * (edges[k + 1] - edges[k]))


class PercentileObserver(HistogramObserver):
    """Clips to the ``(100 - p)``-th and ``p``-th percentiles (symmetric: ``p``-th of ``|x|``)."""

    def __init__(self, spec: QuantSpec, percentile: float = 99.99, bins: int = 2048):
        super().__init__(spec, bins)
        if not 50.0 < percentile <= 100.0:
            raise ConfigError(f"percentile must be in (50, 100], got {percentile!r}")
        self.percentile = percentile

    def _clip_range(self) -> tuple[float, float]:
        p = self.percentile / 100.0
        if self.spec.symmetric:
            bound = _quantile(*self.abs_histogram(), p)
            return -bound, bound
        edges = self.edges()
        return _quantile(self.counts, edges, 1.0 - p), _quantile(self.counts, edges, p)


class MSEObserver(HistogramObserver):
    """Grid search over ``alpha [lo, hi]`` for the least expected rounding + clipping error."""

    ALPHAS = torch.linspace(0.01, 1.0, 100, dtype=torch.float64)

    def expected_error(self, lo: Tensor, hi: Tensor) -> Tensor:
        """Expected squared error, summed over seen values, for each candidate range ``[lo, hi]``."""
        qp = uniform_qparams(torch.as_tensor(lo).reshape(-1), torch.as_tensor(hi).reshape(-1), self.spec)
        qlo, qhi = (t.double()[:, None] for t in representable_range(self.spec, qp))
        edges = torch.from_numpy(self.edges())
        centres = (edges[:-1] + edges[1:]) / 2
        clipped = centres - torch.minimum(torch.maximum(centres, qlo), qhi)
        rounding = qp.scale.double()[:, None] ** 2 / 12
        per_bin = torch.where(clipped == 0, rounding, clipped**2)
        return per_bin @ torch.from_numpy(self.counts)

    def _clip_range(self) -> tuple[float, float]:
        lo, hi = float(self.lo), float(self.hi)
        if self.spec.symmetric:
            lo, hi = -max(-lo, hi), max(-lo, hi)
        best = int(torch.argmin(self.expected_error(self.ALPHAS * lo, self.ALPHAS * hi)))
        return float(self.ALPHAS[best] * lo), float(self.ALPHAS[best] * hi)


SMOOTHING = 1e-4


class EntropyObserver(HistogramObserver):
    """TensorRT-style threshold on ``|x|`` that minimises ``KL(P || Q)`` (see module docstring)."""

    def __init__(self, spec: QuantSpec, bins: int = 2048):
        super().__init__(spec, bins)
        signed = spec.symmetric or spec.signed
        self.n_levels = 2 ** (spec.bits - 1) if signed else 2**spec.bits
        if bins < self.n_levels:
            raise ConfigError(f"entropy observer needs bins >= {self.n_levels} for {spec.describe()}")

    def _divergence(self, hist: np.ndarray, i: int) -> float:
        p = hist[:i].copy()
        p[-1] += hist[i:].sum()
        nonzero = (p > 0).astype(float)
        bucket = np.arange(i) * self.n_levels // i
        sums = np.bincount(bucket, weights=hist[:i], minlength=self.n_levels)
        sizes = np.bincount(bucket, weights=nonzero, minlength=self.n_levels)
        q = nonzero * sums[bucket] / np.maximum(sizes[bucket], 1.0)
        if q.sum() == 0:
            return float("inf")
        q = q / q.sum()
        q = np.where((q == 0) & (p > 0), SMOOTHING, q)  # P mass that Q misses: costly, not infinite
        return float(rel_entr(p / p.sum(), q / q.sum()).sum())

    def _clip_range(self) -> tuple[float, float]:
        hist, edges = self.abs_histogram()
        candidates = range(self.n_levels, self.bins + 1)
        t = float(edges[min(candidates, key=lambda i: self._divergence(hist, i))])
        if self.spec.symmetric:
            return -t, t
        return max(float(self.lo), -t), min(float(self.hi), t)


OBSERVERS: dict[str, type[Observer]] = {
    "minmax": MinMaxObserver,
    "moving_average": MovingAverageMinMaxObserver,
    "percentile": PercentileObserver,
    "mse": MSEObserver,
    "entropy": EntropyObserver,
}


def reduce_observers(observers: list[Observer], reducer: Reducer, observe_again: Callable[[], None]) -> None:
    """Combine ``observers`` (the same list, in the same order, on every process of ``reducer``) across the
    processes; ``observe_again()`` runs this process's batches through them once more when one asks for it."""
    again = [observer for observer in observers if observer.reduce(reducer)]
    if again:
        observe_again()
        for observer in again:
            observer.reduce(reducer)


def make_observer(name: str, spec: QuantSpec, **kwargs) -> Observer:
    """Build the observer called ``name``; unknown names or options are a ``ConfigError``."""
    if name not in OBSERVERS:
        raise ConfigError(f"unknown observer {name!r}; valid observers: {', '.join(OBSERVERS)}")
    cls = OBSERVERS[name]
    options = [p for p in inspect.signature(cls).parameters if p != "spec"]
    unknown = sorted(set(kwargs) - set(options))
    if unknown:
        raise ConfigError(f"observer {name!r} has no option(s) {unknown}; its options: {options}")
    return cls(spec, **kwargs)

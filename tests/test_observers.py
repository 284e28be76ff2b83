"""Observers: hand-computed ranges, histogram re-binning, clipping searches and errors."""

from __future__ import annotations

import math

import pytest
import torch

from squeezer.errors import ConfigError, DataError
from squeezer.quant.core import uniform_qparams
from squeezer.quant.observers import (
    OBSERVERS,
    EntropyObserver,
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MSEObserver,
    PercentileObserver,
    make_observer,
)
from squeezer.quant.spec import QuantSpec

TENSOR = QuantSpec(bits=8, symmetric=False, granularity="tensor")


def _range(obs) -> tuple[float, float]:
    lo, hi = obs.range()
    return float(lo), float(hi)


@pytest.fixture(scope="module")
def outliers() -> torch.Tensor:
    """20k standard normal values plus three huge outliers."""
    gen = torch.Generator().manual_seed(0)
    return torch.cat([torch.randn(20_000, generator=gen), torch.tensor([50.0, -50.0, 48.0])])


def test_minmax_over_batches():
    obs = MinMaxObserver(TENSOR)
    obs.update(torch.tensor([1.0, -2.0, 3.0]))
    obs.update(torch.tensor([5.0, 0.0]))
    lo, hi = obs.range()
    assert lo.shape == hi.shape == ()
    assert (float(lo), float(hi)) == (-2.0, 5.0)


def test_minmax_per_channel():
    x = torch.tensor([[1.0, -2.0, 3.0], [4.0, 5.0, -6.0]])
    rows = MinMaxObserver(QuantSpec(granularity="channel:0"))
    rows.update(x)
    rows.update(torch.tensor([[0.0, 0.0, 7.0], [0.0, 0.0, 0.0]]))
    lo, hi = rows.range()
    assert lo.tolist() == [-2.0, -6.0] and hi.tolist() == [7.0, 5.0]
    cols = MinMaxObserver(QuantSpec(granularity="channel:1"))
    cols.update(x)
    assert cols.range()[0].tolist() == [1.0, -2.0, -6.0] and cols.range()[1].tolist() == [4.0, 5.0, 3.0]
    with pytest.raises(DataError, match="channels"):
        rows.update(torch.zeros(3, 3))


def test_moving_average_momentum_half():
    obs = MovingAverageMinMaxObserver(TENSOR, momentum=0.5)
    obs.update(torch.tensor([0.0, 4.0]))  # sets (0, 4)
    obs.update(torch.tensor([-2.0, 2.0]))  # (0.5*0 + 0.5*-2, 0.5*4 + 0.5*2) = (-1, 3)
    assert _range(obs) == (-1.0, 3.0)
    obs.update(torch.tensor([2.0, 10.0]))  # (0.5*-1 + 0.5*2, 0.5*3 + 0.5*10) = (0.5, 6.5)
    assert _range(obs) == (0.5, 6.5)


@pytest.mark.parametrize("symmetric", [False, True])
def test_percentile_of_arange(symmetric):
    obs = PercentileObserver(QuantSpec(symmetric=symmetric, granularity="tensor"), percentile=99.99)
    obs.update(torch.arange(0, 1001).float())
    width = 1000 / obs.bins
    lo, hi = _range(obs)
    assert hi == pytest.approx(999.9, abs=width)
    assert lo == pytest.approx(-hi if symmetric else 0.1, abs=width)


def test_rebinning_keeps_total_count():
    gen = torch.Generator().manual_seed(1)
    obs = PercentileObserver(TENSOR, bins=256)
    obs.update(torch.randn(1000, generator=gen))
    obs.update(10 * torch.randn(500, generator=gen))  # widens the range
    assert obs.counts.sum() == pytest.approx(1500)
    assert obs.cdf([float(obs.hi)])[0] == pytest.approx(1500)
    assert obs.cdf([0.0])[0] == pytest.approx(750, abs=40)  # symmetric data: half below 0
    counts, edges = obs.abs_histogram()
    assert counts.sum() == pytest.approx(1500) and (counts >= 0).all()
    assert edges[-1] == pytest.approx(max(-float(obs.lo), float(obs.hi)))


def test_constant_batch_then_wider_batch():
    obs = MSEObserver(TENSOR, bins=64)
    obs.update(torch.full((10,), 2.0))
    assert _range(obs) == (2.0, 2.0)
    obs.update(torch.tensor([-1.0, 4.0]))
    assert obs.counts.sum() == pytest.approx(12)


def test_mse_expected_error_by_hand():
    # bins [0,1) [1,2) [2,3) [3,4]: counts 1 1 1 2 -- centres 0.5 1.5 2.5 3.5
    obs = MSEObserver(QuantSpec(bits=2, symmetric=False, granularity="tensor"), bins=4)
    obs.update(torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0]))
    err = obs.expected_error(torch.tensor([0.0, 0.0]), torch.tensor([3.0, 4.0]))
    # [0, 3]: S = 1, three bins inside (1/12 each), centre 3.5 clipped to 3 twice (0.25 each).
    # [0, 4]: S = 4/3, everything inside: 5 * (16/9) / 12.
    assert err.tolist() == pytest.approx([3 / 12 + 2 * 0.25, 5 * 16 / 9 / 12])


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [4, 8])
def test_mse_clips_outliers(outliers, bits, symmetric):
    spec = QuantSpec(bits=bits, symmetric=symmetric, granularity="tensor")
    obs, minmax = MSEObserver(spec), MinMaxObserver(spec)
    for batch in outliers.split(5000):
        obs.update(batch)
        minmax.update(batch)
    lo, hi = obs.range()
    assert float(hi) < 50.0 and float(lo) > -50.0
    if bits == 4:
        assert float(hi) < 10.0
    assert float(obs.expected_error(lo, hi)[0]) < float(obs.expected_error(*minmax.range())[0])


@pytest.mark.parametrize("bits", [4, 8])
def test_entropy_threshold_below_outliers(outliers, bits):
    obs = EntropyObserver(QuantSpec(bits=bits, symmetric=True, granularity="tensor"))
    for batch in outliers.split(5000):
        obs.update(batch)
    lo, hi = _range(obs)
    assert lo == -hi and 2.0 < hi < 10.0


def test_entropy_asymmetric_range_stays_in_seen_values():
    obs = EntropyObserver(QuantSpec(bits=4, symmetric=False, granularity="tensor"), bins=512)
    obs.update(torch.cat([torch.rand(5000) * 3, torch.tensor([40.0])]))
    lo, hi = _range(obs)
    assert lo >= 0.0 and 1.0 < hi < 10.0


@pytest.mark.parametrize("name", sorted(OBSERVERS))
def test_qparams_is_uniform_qparams_of_range(name, outliers):
    spec = QuantSpec(bits=8, symmetric=name != "mse", granularity="tensor")
    obs = make_observer(name, spec)
    obs.update(outliers)
    lo, hi = obs.range()
    expected, got = uniform_qparams(lo, hi, spec), obs.qparams()
    assert torch.equal(got.scale, expected.scale)
    assert (got.zero_point is None) == spec.symmetric
    if got.zero_point is not None:
        assert torch.equal(got.zero_point, expected.zero_point)


def test_make_observer_passes_options():
    obs = make_observer("percentile", TENSOR, percentile=99.0, bins=128)
    assert isinstance(obs, PercentileObserver) and obs.percentile == 99.0 and obs.bins == 128
    assert isinstance(make_observer("moving_average", TENSOR, momentum=0.5), MovingAverageMinMaxObserver)
    assert all(issubclass(OBSERVERS[n], HistogramObserver) for n in ("percentile", "mse", "entropy"))


@pytest.mark.parametrize("bad", [torch.tensor([]), torch.tensor([1.0, math.nan]), torch.tensor([math.inf])])
@pytest.mark.parametrize("name", sorted(OBSERVERS))
def test_update_rejects_empty_and_non_finite(name, bad):
    with pytest.raises(DataError, match="empty|NaN/Inf"):
        make_observer(name, TENSOR).update(bad)


@pytest.mark.parametrize("name", sorted(OBSERVERS))
def test_range_before_update(name):
    with pytest.raises(DataError, match="observer has seen no data"):
        make_observer(name, TENSOR).range()


def test_config_errors():
    with pytest.raises(ConfigError, match=r"'median'.*minmax, moving_average, percentile, mse, entropy"):
        make_observer("median", TENSOR)
    with pytest.raises(ConfigError, match="momentum"):
        make_observer("minmax", TENSOR, momentum=0.5)
    with pytest.raises(ConfigError, match="per-tensor only"):
        PercentileObserver(QuantSpec(granularity="channel:0"))
    with pytest.raises(ConfigError, match="token"):
        MinMaxObserver(QuantSpec(granularity="token"))
    with pytest.raises(ConfigError, match="uniform"):
        MinMaxObserver(QuantSpec(bits=4, mapping="log2", granularity="tensor"))
    with pytest.raises(ConfigError, match="percentile"):
        PercentileObserver(TENSOR, percentile=40.0)
    with pytest.raises(ConfigError, match="bins"):
        EntropyObserver(TENSOR, bins=100)

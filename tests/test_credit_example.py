"""Tests for the German credit example: loader, split, metrics, deterministic training."""

from itertools import product

import numpy as np
import pytest
import torch
from torch import nn

from squeezer.examples.credit import (
    CreditMLP,
    _stratified_split,
    accuracy,
    evaluate_credit,
    load_german_credit,
    make_credit_task,
    roc_auc,
    train_credit_model,
)


@pytest.fixture(scope="module")
def credit():
    return load_german_credit()


@pytest.fixture(scope="module")
def task():
    return make_credit_task(seed=0)


def test_loader_shape_and_labels(credit):
    x, y, names = credit
    assert x.dtype == np.float32 and y.dtype == np.int64
    assert x.shape == (1000, len(names))
    assert int(y.sum()) == 300 and int((y == 0).sum()) == 700
    assert len(set(names)) == len(names)
    assert np.isfinite(x).all()


def test_one_hot_columns_are_indicators(credit):
    x, _, names = credit
    numeric = [n for n in names if "=" not in n]
    assert len(numeric) == 7 and "credit_amount" in numeric
    groups: dict[str, list[int]] = {}
    for j, name in enumerate(names):
        if "=" in name:
            groups.setdefault(name.split("=", 1)[0], []).append(j)
    assert len(groups) == 13
    for column, idx in groups.items():
        block = x[:, idx]
        assert set(np.unique(block)) <= {0.0, 1.0}, column
        np.testing.assert_array_equal(block.sum(axis=1), 1.0)
        categories = [names[j].split("=", 1)[1] for j in idx]
        assert categories == sorted(categories), column


def test_loader_is_deterministic(credit):
    x, y, names = load_german_credit()
    np.testing.assert_array_equal(x, credit[0])
    np.testing.assert_array_equal(y, credit[1])
    assert names == credit[2]


def test_split_is_stratified_and_standardised(task):
    assert task.x_train.shape == (700, len(task.feature_names))
    assert task.x_test.shape == (300, len(task.feature_names))
    assert task.x_train.dtype == task.y_train.dtype == torch.float32
    assert int(task.y_train.sum()) == 210 and int(task.y_test.sum()) == 90
    mean = task.x_train.mean(dim=0)
    torch.testing.assert_close(mean, torch.zeros_like(mean), atol=1e-4, rtol=0)


def test_split_is_a_partition(credit, task):
    _, y, _ = credit
    train, test = _stratified_split(y, 0.3, np.random.default_rng(0))
    assert np.intersect1d(train, test).size == 0
    np.testing.assert_array_equal(np.union1d(train, test), np.arange(y.size))
    assert [int((y[test] == c).sum()) for c in (0, 1)] == [210, 90]
    # The task's rows are those rows, standardised column-wise: x' = (x - m) / s.
    j = task.feature_names.index("credit_amount")
    raw = credit[0][:, j]
    s = raw[train].std()
    m = raw[train].mean()
    np.testing.assert_allclose(task.x_test[:, j].numpy(), (raw[test] - m) / s, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(task.x_train[:, j].numpy(), (raw[train] - m) / s, rtol=1e-4, atol=1e-4)


def test_split_is_deterministic_per_seed(task):
    again = make_credit_task(seed=0)
    for a, b in [(task.x_train, again.x_train), (task.y_train, again.y_train),
                 (task.x_test, again.x_test), (task.y_test, again.y_test)]:
        assert torch.equal(a, b)
    other = make_credit_task(seed=1)
    assert not torch.equal(task.x_test, other.x_test)
    assert int(other.y_test.sum()) == 90


def test_roc_auc_hand_example_with_ties():
    scores = np.array([0.1, 0.4, 0.35, 0.8, 0.4])
    labels = np.array([0, 0, 1, 1, 1])
    # Pairs (pos, neg): 0.35>0.1, 0.35<0.4, 0.8>both, 0.4>0.1, 0.4=0.4 (half) -> 4.5 / 6.
    assert roc_auc(scores, labels) == pytest.approx(0.75)
    assert roc_auc(torch.tensor(scores), torch.tensor(labels, dtype=torch.float32)) == pytest.approx(0.75)
    assert roc_auc([1.0, 1.0, 1.0], [0, 1, 1]) == pytest.approx(0.5)
    assert roc_auc([0.0, 1.0], [0, 1]) == 1.0
    assert roc_auc([1.0, 0.0], [0, 1]) == 0.0


def test_roc_auc_matches_pairwise_count():
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 6, size=80).astype(float)  # many ties
    labels = rng.integers(0, 2, size=80)
    pos, neg = scores[labels == 1], scores[labels == 0]
    pairwise = np.mean([1.0 if p > n else 0.5 if p == n else 0.0 for p, n in product(pos, neg)])
    assert roc_auc(scores, labels) == pytest.approx(pairwise)


def test_roc_auc_matches_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(4)
    scores = np.round(rng.normal(size=200), 1)
    labels = rng.integers(0, 2, size=200)
    assert roc_auc(scores, labels) == pytest.approx(metrics.roc_auc_score(labels, scores))


def test_roc_auc_needs_both_classes():
    with pytest.raises(ValueError):
        roc_auc([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError):
        roc_auc([0.1, 0.2], [0, 0])


def test_accuracy_thresholds_at_zero_logit():
    logits = torch.tensor([-2.0, 0.0, 0.5, 3.0])
    labels = torch.tensor([0.0, 0.0, 1.0, 0.0])
    assert accuracy(logits, labels) == pytest.approx(0.75)


def test_mlp_shape_and_int8_compression_budget():
    model = CreditMLP(61)
    assert model(torch.zeros(5, 61)).shape == (5,)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [m.out_features for m in linears] == [512, 256, 1]
    fp32 = sum(4 * m.weight.numel() for m in linears)
    int8 = sum(m.weight.numel() + 4 * m.out_features for m in linears)  # codes + fp32 per-channel scales
    assert fp32 / int8 >= 3.9


def test_training_is_deterministic_and_learns(task):
    first = train_credit_model(task, seed=0)
    second = train_credit_model(task, seed=0)
    assert not first.training
    state_a, state_b = first.state_dict(), second.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key
    metrics = evaluate_credit(first, task)
    assert metrics["roc_auc"] > 0.7
    assert metrics["accuracy"] > 0.65

"""Tests of squeezer.lowrank: SVD factorisation of Linear and conv layers."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from squeezer.transform import report_of
from squeezer.errors import ConfigError
from squeezer.lowrank import factorize_conv, factorize_linear, low_rank, rank_for_budget, rank_for_energy

from .conftest import MLP


def _with_singular_values(layer: nn.Module, sigma: list[float], seed: int = 0) -> None:
    """Set ``layer.weight.flatten(1) = U diag(sigma) V^T`` with random orthonormal U, V."""
    g = torch.Generator().manual_seed(seed)
    n, k = layer.weight.flatten(1).shape
    u, _ = torch.linalg.qr(torch.randn(n, len(sigma), generator=g))
    v, _ = torch.linalg.qr(torch.randn(k, len(sigma), generator=g))
    with torch.no_grad():
        layer.weight.copy_(((u * torch.tensor(sigma)) @ v.T).reshape(layer.weight.shape))


def test_full_rank_factorisation_reproduces_linear():
    torch.manual_seed(0)
    layer = nn.Linear(24, 16)
    pair = factorize_linear(layer, 16)
    assert [type(m) for m in pair] == [nn.Linear, nn.Linear]
    assert pair[0].weight.shape == (16, 24) and pair[0].bias is None and pair[1].weight.shape == (16, 16)
    x = torch.randn(8, 24)
    torch.testing.assert_close(pair(x), layer(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("conv", [
    nn.Conv2d(3, 8, 3, stride=2, padding=1),
    nn.Conv2d(4, 6, (3, 1), dilation=2, padding=(2, 0), bias=False),
    nn.Conv1d(5, 7, 3, padding=1),
])
def test_full_rank_factorisation_reproduces_conv(conv):
    rank = min(conv.weight.flatten(1).shape)
    pair = factorize_conv(conv, rank)
    assert pair[0].out_channels == rank and pair[1].kernel_size == (1,) * len(conv.kernel_size)
    assert pair[0].stride == conv.stride and pair[0].padding == conv.padding and pair[0].dilation == conv.dilation
    x = torch.randn(2, conv.in_channels, *([11] * len(conv.kernel_size)))
    torch.testing.assert_close(pair(x), conv(x), rtol=1e-5, atol=1e-5)


def test_truncated_conv_equals_conv_with_best_rank_r_weight():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, padding=1)
    matrix = conv.weight.detach().flatten(1).double()
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    w_r = ((u[:, :5] * s[:5]) @ vh[:5]).float().reshape(conv.weight.shape)
    x = torch.randn(2, 8, 10, 10)
    expected = F.conv2d(x, w_r, conv.bias, padding=1)
    torch.testing.assert_close(factorize_conv(conv, 5)(x), expected, rtol=1e-5, atol=1e-5)
    relative = (conv(x) - expected).norm() / conv(x).norm()
    assert 0 < relative < 1


def test_rank_by_energy():
    sigma = torch.tensor([4.0, 2.0, 1.0, 1.0, 0.5])  # squares 16, 4, 1, 1, 0.25: total 22.25
    assert rank_for_energy(sigma, 0.5) == 1            # 16 / 22.25 = 0.719
    assert rank_for_energy(sigma, 0.9) == 3            # 20 / 22.25 = 0.899 < 0.9 <= 21 / 22.25
    assert rank_for_energy(sigma, 0.95) == 4           # 21 / 22.25 = 0.944, 22 / 22.25 = 0.989
    assert rank_for_energy(sigma, 1.0) == 5
    assert rank_for_energy(sigma, 20 / 22.25) == 2     # exactly reached counts


def test_low_rank_by_energy_on_a_model():
    torch.manual_seed(0)
    model = MLP().eval()
    _with_singular_values(model.fc2, [10.0, 8.0, 6.0, 1.0, 0.5, 0.1])  # rank 6 of 300 x 300
    original = copy.deepcopy(model)
    report = report_of(low_rank(model, energy=0.99, include=r"^fc2$", inplace=True))
    (row,) = report.layers
    power = torch.tensor([10.0, 8.0, 6.0, 1.0, 0.5, 0.1]) ** 2
    expected_rank = int((power.cumsum(0) < 0.99 * power.sum()).sum()) + 1
    assert row.name == "fc2" and row.rank == expected_rank == 3 and row.full_rank == 300  # 200 / 201.26 >= 0.99
    assert row.rel_error == pytest.approx(math.sqrt(float(power[3:].sum() / power.sum())), rel=1e-4)
    assert row.params_before == 90300 and row.params_after == 3 * 600 + 300
    assert isinstance(model.fc2, nn.Sequential)
    x = torch.randn(16, 40)
    w_r = original.fc2.weight.detach().double()
    u, s, vh = torch.linalg.svd(w_r)
    weight = ((u[:, :3] * s[:3]) @ vh[:3]).float()
    expected = original.head(torch.relu(F.linear(torch.relu(original.norm(original.fc1(x))), weight, original.fc2.bias)))
    torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)
    assert report.model_params_after == report.model_params_before - 90300 + row.params_after
    assert {s.name for s in report.skipped} == {"fc1", "head"}


def test_exactly_low_rank_layer_is_reproduced():
    torch.manual_seed(0)
    model = MLP().eval()
    _with_singular_values(model.fc2, [3.0, 2.0, 1.0])
    original = copy.deepcopy(model)
    report = report_of(low_rank(model, energy=1.0, include="fc2", inplace=True))
    assert report.layers[0].rank == 3 and report.layers[0].rel_error < 1e-6
    x = torch.randn(4, 40)
    torch.testing.assert_close(model(x), original(x), rtol=1e-5, atol=1e-5)


def test_low_rank_by_parameter_budget():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(100, 80), nn.ReLU(), nn.Linear(80, 80, bias=False))
    report = report_of(low_rank(model, budget=0.25, inplace=True))
    rows = {r.name: r for r in report.layers}
    # (0.25 * (8000 + 80) - 80) / 180 = 10.8 -> 10; 0.25 * 6400 / 160 = 10
    assert rows["0"].rank == rank_for_budget(80, 100, 0.25, bias=80) == 10 and rows["2"].rank == 10
    assert rows["0"].params_after == 10 * 180 + 80 <= 0.25 * rows["0"].params_before
    assert rows["2"].params_after == 1600 <= 0.25 * 6400
    assert 11 * 180 + 80 > 0.25 * 8080  # the next rank would not fit
    assert 0 < rows["0"].rel_error < 1
    assert model(torch.randn(3, 100)).shape == (3, 80)
    assert json.loads(json.dumps(report.to_dict()))["summary"]["factorized_layers"] == 2


def test_never_increases_parameters_and_says_why():
    torch.manual_seed(0)
    model = MLP()
    report = report_of(low_rank(model, energy=1.0, inplace=True))
    assert report.layers == []
    reasons = {s.name: s.reason for s in report.skipped}
    assert reasons["fc2"] == "no saving: rank 300 needs 180000 >= 90000 weights"
    assert report.model_params_after == report.model_params_before
    assert rank_for_budget(10, 10, 0.01) == 0
    report = report_of(low_rank(nn.Sequential(nn.Linear(10, 10)), budget=0.01, inplace=True))
    assert report.skipped[0].reason == "no saving: budget leaves no rank >= 1"


def test_selection_by_type_names_and_size(cnn):
    report = report_of(low_rank(cnn, budget=0.5, layer_types=("conv2d", "conv1d"), min_params=100, inplace=True))
    reasons = {s.name: s.reason for s in report.skipped}
    assert reasons["conv1"] == "weight has 72 < min_params=100 elements"
    assert reasons["conv2"] == "grouped convolution"
    assert reasons["fc"] == "layer type linear not selected"
    assert [r.name for r in report.layers] == ["conv1d"]
    assert isinstance(cnn.conv1d, nn.Sequential) and isinstance(cnn.conv1d[1], nn.Conv1d)
    assert cnn(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    report = report_of(low_rank(MLP(), budget=0.3, ignore=["head", "fc1"], inplace=True))
    assert [r.name for r in report.layers] == ["fc2"]


@pytest.mark.parametrize("energy", [0.0, -0.5, 1.01, 2, True])
def test_energy_outside_unit_interval_is_rejected(energy):
    with pytest.raises(ConfigError, match="energy"):
        low_rank(MLP(), energy=energy, inplace=True)


def test_bad_arguments_raise_config_errors_naming_them():
    cases = [
        (lambda: low_rank(MLP(), budget=0.0), "budget"),
        (lambda: low_rank(MLP(), budget=1.5), "budget"),
        (lambda: low_rank(MLP()), "exactly one of energy"),
        (lambda: low_rank(MLP(), energy=0.9, budget=0.5), "exactly one of energy"),
        (lambda: low_rank(MLP(), energy=0.9, include="attention"), "include pattern 'attention' matches no layer"),
        (lambda: low_rank(MLP(), energy=0.9, min_params=-1), "min_params"),
        (lambda: factorize_linear(nn.Linear(4, 3), 4), "rank must be an integer in \\[1, 3\\]"),
        (lambda: factorize_linear(nn.Linear(4, 3), 0), "rank"),
        (lambda: factorize_conv(nn.Conv2d(4, 4, 1, groups=2), 1), "grouped"),
        (lambda: rank_for_energy(torch.ones(3), 0), "energy"),
    ]
    for call, message in cases:
        with pytest.raises(ConfigError, match=message):
            call()

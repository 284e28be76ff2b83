"""Tests of squeezer.prune: masks, N:M, gradual schedule, structured channels, input features."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from squeezer.transform import report_of
from squeezer.errors import ConfigError, DataError, ModelError
from squeezer.prune import (
    SelectColumns,
    count_params,
    cubic_sparsity,
    feature_importance,
    gradual_prune,
    magnitude_prune,
    nm_prune,
    prune_channels,
    prune_features,
    remove_masks,
    weight_mask,
    weight_sparsity,
)

from .conftest import MLP


def _zeros(module: nn.Module) -> int:
    return int((module.weight == 0).sum())


def _train_steps(model: nn.Module, steps: int = 5, d_in: int = 40, seed: int = 0) -> None:
    """A few SGD steps with weight decay, ``p <- p - lr (grad + wd p)``, on random regression
    data: every stored weight moves, the masked ones through the decay term."""
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        y = model(torch.randn(16, d_in, generator=g))
        model.zero_grad()
        (y.pow(2).mean() + 0.1 * y.sum()).backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.05 * (p.grad + 0.01 * p)
    model.eval()


# ----------------------------------------------------------------------------- masks

def test_masked_weights_stay_zero_through_fine_tuning(mlp):
    magnitude_prune(mlp, 0.6, inplace=True)
    pruned = {name: weight_mask(m) == 0 for name, m in mlp.named_modules() if weight_mask(m) is not None}
    assert set(pruned) == {"fc1", "fc2", "head"}
    before = {name: mlp.get_submodule(name).weight.detach().clone() for name in pruned}
    _train_steps(mlp)
    for name, zero in pruned.items():
        weight = mlp.get_submodule(name).weight
        assert torch.all(weight[zero] == 0), name
        assert not torch.equal(weight[~zero], before[name][~zero]), f"{name} did not train"
        original = mlp.get_submodule(name).parametrizations.weight.original
        assert torch.any(original[zero] != 0)  # the stored tensor moved, the mask kept it out


def test_remove_masks_makes_pruning_permanent(mlp, mlp_batches):
    magnitude_prune(mlp, 0.5, inplace=True)
    x = mlp_batches[0]
    expected = mlp(x)
    zeros = {n: _zeros(mlp.get_submodule(n)) for n in ("fc1", "fc2", "head")}
    assert sorted(remove_masks(mlp)) == ["fc1", "fc2", "head"]
    assert not any(parametrize.is_parametrized(m) for m in mlp.modules())
    assert set(mlp.state_dict()) == set(MLP().state_dict())
    assert all(isinstance(mlp.get_submodule(n).weight, nn.Parameter) for n in zeros)
    assert {n: _zeros(mlp.get_submodule(n)) for n in zeros} == zeros
    torch.testing.assert_close(mlp(x), expected)
    assert remove_masks(mlp) == []


@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.5, 0.9, 0.99])
def test_per_layer_sparsity_hits_target(mlp, sparsity):
    report = report_of(magnitude_prune(mlp, sparsity, inplace=True))
    for name in ("fc1", "fc2", "head"):
        layer = mlp.get_submodule(name)
        assert _zeros(layer) == round(sparsity * layer.weight.numel()), name
        row = next(r for r in report.layers if r.name == name)
        assert row.sparsity == pytest.approx(sparsity, abs=0.5 / layer.weight.numel() + 1e-12)
        assert row.params_after == row.params_before - _zeros(layer)
        kept, dropped = layer.weight[layer.weight != 0].abs(), layer.parametrizations.weight.original[layer.weight == 0]
        if sparsity:
            assert dropped.abs().max() <= kept.min()  # smallest magnitudes went


@pytest.mark.parametrize("sparsity", [0.3, 0.7])
def test_global_sparsity_uses_one_threshold(mlp, sparsity):
    with torch.no_grad():
        mlp.fc1.weight.mul_(10.0)  # larger weights: global pruning should spare this layer
    report = report_of(magnitude_prune(mlp, sparsity, scope="global", inplace=True))
    layers = [mlp.fc1, mlp.fc2, mlp.head]
    total = sum(l.weight.numel() for l in layers)
    assert sum(_zeros(l) for l in layers) == round(sparsity * total)
    assert weight_sparsity(mlp.modules()) == pytest.approx(sparsity, abs=1 / total)
    kept = torch.cat([l.weight[l.weight != 0].abs() for l in layers])
    dropped = torch.cat([l.parametrizations.weight.original[l.weight == 0].abs() for l in layers])
    assert dropped.max() <= kept.min()
    assert _zeros(mlp.fc1) / mlp.fc1.weight.numel() < sparsity < _zeros(mlp.fc2) / mlp.fc2.weight.numel()
    assert report.method == "magnitude-global"


def test_masks_only_grow(mlp):
    magnitude_prune(mlp, 0.3, inplace=True)
    first = {n: weight_mask(mlp.get_submodule(n)).clone() for n in ("fc1", "fc2", "head")}
    _train_steps(mlp)
    magnitude_prune(mlp, 0.6, inplace=True)
    for name, old in first.items():
        new = weight_mask(mlp.get_submodule(name))
        assert torch.all(new[old == 0] == 0), name
        assert _zeros(mlp.get_submodule(name)) == round(0.6 * new.numel())


def test_selection_by_type_and_names(cnn):
    report = report_of(magnitude_prune(cnn, 0.5, layer_types=("conv2d", "conv1d"), ignore=[r"^conv2$"], inplace=True))
    assert [r.name for r in report.layers] == ["conv1", "conv1d"]
    reasons = {s.name: s.reason for s in report.skipped}
    assert reasons == {"conv2": "ignored by pattern '^conv2$'", "fc": "layer type linear not selected"}
    assert weight_mask(cnn.fc) is None and weight_mask(cnn.conv2) is None
    report = report_of(magnitude_prune(cnn, 0.5, include="fc", inplace=True))
    assert [r.name for r in report.layers] == ["fc"]


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (4, 8)])
def test_nm_pattern_is_exact(mlp, n, m):
    report = report_of(nm_prune(mlp, n, m, inplace=True))
    for name in ("fc1", "fc2"):  # in_features 40 and 300 are multiples of 4 and 8 / 4
        layer = mlp.get_submodule(name)
        if layer.in_features % m:
            continue
        groups = layer.weight.reshape(layer.out_features, -1, m)
        assert torch.all((groups != 0).sum(-1) == n), name
        original = layer.parametrizations.weight.original.reshape_as(groups).abs()
        kept_min = original.masked_fill(groups == 0, float("inf")).min(-1).values
        dropped_max = original.masked_fill(groups != 0, -1.0).max(-1).values
        assert torch.all(dropped_max <= kept_min)
        row = next(r for r in report.layers if r.name == name)
        assert row.sparsity == pytest.approx(1 - n / m)
    assert report.method == f"{n}:{m}"


def test_nm_skips_layers_whose_inputs_do_not_divide(cnn):
    report = report_of(nm_prune(cnn, 2, 4, inplace=True))
    reasons = {s.name: s.reason for s in report.skipped}
    assert reasons == {"conv1": "input size 9 is not a multiple of m=4"}  # 1 channel x 3x3
    groups = cnn.conv2.weight.flatten(1).reshape(16, -1, 4)  # 4 in / group x 3x3 = 36
    assert torch.all((groups != 0).sum(-1) == 2)


def test_report_totals_and_json(mlp):
    before = count_params(mlp)
    report = report_of(magnitude_prune(mlp, 0.5, inplace=True))
    assert report.model_params_before == before == sum(p.numel() for p in MLP().parameters())
    removed = sum(_zeros(mlp.get_submodule(n)) for n in ("fc1", "fc2", "head"))
    assert report.model_params_after == before - removed == count_params(mlp)
    data = json.loads(json.dumps(report.to_dict()))
    assert data["summary"]["model_params_after"] == report.model_params_after
    assert {r["name"] for r in data["layers"]} == {"fc1", "fc2", "head"}


# ----------------------------------------------------------------------------- gradual schedule

def test_cubic_schedule_values():
    assert cubic_sparsity(0, 4, 0.8) == 0.0
    assert cubic_sparsity(4, 4, 0.8) == pytest.approx(0.8)
    assert cubic_sparsity(1, 4, 0.8) == pytest.approx(0.8 - 0.8 * 0.75**3)  # 0.4625
    assert cubic_sparsity(2, 4, 0.9, initial=0.1) == pytest.approx(0.9 + (0.1 - 0.9) * 0.5**3)
    values = [cubic_sparsity(t, 10, 0.9) for t in range(11)]
    steps = [b - a for a, b in zip(values, values[1:])]
    assert all(s > 0 for s in steps) and steps == sorted(steps, reverse=True)  # fast first, then flat


def test_gradual_prune_follows_schedule_and_fine_tunes(mlp):
    calls = []

    def train_fn(model: nn.Module) -> None:
        calls.append(weight_sparsity(model.modules()))
        _train_steps(model, steps=2, seed=len(calls))

    report = report_of(gradual_prune(mlp, 0.8, 4, train_fn, scope="layer", inplace=True))
    total = sum(m.weight.numel() for m in (mlp.fc1, mlp.fc2, mlp.head))
    assert [s.step for s in report.steps] == [1, 2, 3, 4]
    for step in report.steps:
        assert step.scheduled == pytest.approx(cubic_sparsity(step.step, 4, 0.8))
        assert step.sparsity == pytest.approx(step.scheduled, abs=3 / total)
    assert calls == pytest.approx([s.sparsity for s in report.steps])
    assert weight_sparsity(mlp.modules()) == pytest.approx(0.8, abs=3 / total)
    assert report.final.model_params_after < report.final.model_params_before
    assert json.loads(json.dumps(report.to_dict()))["steps"][-1]["step"] == 4


# ----------------------------------------------------------------------------- structured

class BNNet(nn.Module):
    """Nested Sequentials: Linear -> BatchNorm1d -> ReLU -> Dropout -> (Linear -> GELU) -> head."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(20, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Dropout(0.2),
                                  nn.Sequential(nn.Linear(64, 32), nn.GELU()))
        self.head = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.dropout(self.body(x), 0.1, self.training) * 2.0)


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.pool = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(32, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 2 * 2, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool(torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))))
        h = F.adaptive_avg_pool2d(torch.relu(self.conv3(h)), 2)
        return self.fc(torch.flatten(h, 1))


def _randomise_norms(model: nn.Module, seed: int = 0) -> None:
    """Give BatchNorm / LayerNorm non-trivial statistics and affine parameters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm)):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g))
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g))
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


def _dropped(report, name: str, channels: int) -> list[int]:
    return sorted(set(range(channels)) - set(report.channels[name]))


def _zero_inputs(model: nn.Module, consumer: str, dropped: list[int], block: int = 1) -> None:
    cols = [c * block + j for c in dropped for j in range(block)]
    with torch.no_grad():
        model.get_submodule(consumer).weight[:, cols] = 0


def test_structured_mlp_with_batchnorm_equals_channel_zeroed_model():
    torch.manual_seed(0)
    model = BNNet().eval()
    _randomise_norms(model)
    masked = copy.deepcopy(model)
    before = count_params(model)
    report = report_of(prune_channels(model, 0.5, norm="l2", inplace=True))

    assert set(report.channels) == {"body.0", "body.4.0"}
    assert model.body[0].out_features == 32 and model.body[1].num_features == 32
    assert model.body[1].running_mean.shape == (32,) and model.body[4][0].weight.shape == (16, 32)
    assert model.head.weight.shape == (3, 16)
    scores = masked.body[0].weight.norm(dim=1)
    assert scores[_dropped(report, "body.0", 64)].max() <= scores[report.channels["body.0"]].min()

    _zero_inputs(masked, "body.4.0", _dropped(report, "body.0", 64))
    _zero_inputs(masked, "head", _dropped(report, "body.4.0", 32))
    x = torch.randn(64, 20)
    torch.testing.assert_close(model(x), masked(x), rtol=1e-5, atol=1e-5)
    assert report.model_params_before == before and report.model_params_after == count_params(model) < before
    assert {s.name: s.reason for s in report.skipped}["head"].endswith("the model output cannot be resized")
    rows = {r.name: r for r in report.layers}
    assert rows["body.1"].params_after == 64 and rows["body.4.0"].note == "in 64 -> 32; out 32 -> 16"
    assert json.loads(json.dumps(report.to_dict()))["channels"]["body.0"] == report.channels["body.0"]
    model.train()(x).sum().backward()  # still trains


def test_structured_layernorm_mlp_renormalises_over_kept_channels(mlp):
    _randomise_norms(mlp)
    original = copy.deepcopy(mlp)
    report = report_of(prune_channels(mlp, 0.5, inplace=True))
    k1, k2 = report.channels["fc1"], report.channels["fc2"]
    assert len(k1) == len(k2) == 150 and "head" not in report.channels
    assert "approximate" in next(r.note for r in report.layers if r.name == "norm")

    x = torch.randn(32, 40)
    h = original.fc1(x)[:, k1]
    h = F.layer_norm(h, (150,), original.norm.weight[k1], original.norm.bias[k1], original.norm.eps)
    h = torch.relu(F.linear(torch.relu(h), original.fc2.weight[k2][:, k1], original.fc2.bias[k2]))
    expected = F.linear(h, original.head.weight[:, k2], original.head.bias)
    torch.testing.assert_close(mlp(x), expected, rtol=1e-5, atol=1e-5)
    assert count_params(mlp) < count_params(original)


def test_structured_cnn_equals_channel_zeroed_model():
    torch.manual_seed(0)
    model = CNN().eval()
    _randomise_norms(model)
    masked = copy.deepcopy(model)
    report = report_of(prune_channels(model, 0.5, inplace=True))
    assert set(report.channels) == {"conv1", "conv2", "conv3"}
    assert [model.conv1.out_channels, model.conv2.out_channels, model.conv3.out_channels] == [8, 16, 8]
    assert model.bn1.num_features == 8 and model.bn2.running_var.shape == (16,)
    assert model.fc.in_features == 32  # 8 kept channels x 2x2 positions after the flatten

    _zero_inputs(masked, "conv2", _dropped(report, "conv1", 16))
    _zero_inputs(masked, "conv3", _dropped(report, "conv2", 32))
    _zero_inputs(masked, "fc", _dropped(report, "conv3", 16), block=4)
    x = torch.randn(4, 3, 8, 8)
    torch.testing.assert_close(model(x), masked(x), rtol=1e-5, atol=1e-5)
    assert report.model_params_after < report.model_params_before
    assert next(r.note for r in report.layers if r.name == "fc") == "in 64 -> 32"


class Blocked(nn.Module):
    """fc2 feeds a residual add, fc3 a reshape, fc4 is shared: only fc1 can lose outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 8)
        self.fc3 = nn.Linear(8, 8)
        self.fc4 = nn.Linear(8, 8)
        self.grouped = nn.Conv1d(4, 4, 1, groups=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc2(torch.relu(self.fc1(x))) + x
        h = self.fc4(self.fc4(self.fc3(h).view(-1, 8)))
        return self.grouped(h.view(-1, 4, 2))


def test_structured_leaves_unresizable_layers_alone_with_reasons():
    torch.manual_seed(0)
    model = Blocked().eval()
    x = torch.randn(5, 8)
    reference = copy.deepcopy(model)
    report = report_of(prune_channels(model, 0.5, inplace=True))
    assert list(report.channels) == ["fc1"]
    reasons = {s.name: s.reason for s in report.skipped}
    assert "function 'add'" in reasons["fc2"]
    assert "method 'view'" in reasons["fc3"] and "operation not known to preserve channels" in reasons["fc3"]
    assert reasons["fc4"] == "called at 2 places in the forward (shared weights)"
    assert reasons["grouped"] == "grouped convolution"
    masked = copy.deepcopy(reference)
    _zero_inputs(masked, "fc2", _dropped(report, "fc1", 16))
    torch.testing.assert_close(model(x), masked(x), rtol=1e-5, atol=1e-5)


def test_structured_refuses_masked_and_untraceable_models(mlp):
    magnitude_prune(mlp, 0.5, include="fc2", inplace=True)
    with pytest.raises(ModelError, match="remove_masks"):
        prune_channels(mlp, 0.5, inplace=True)

    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.out = nn.Linear(4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(self.fc(x)) if x.sum() > 0 else x

    with pytest.raises(ModelError, match="cannot trace Branchy"):
        prune_channels(Branchy(), 0.5, inplace=True)


# ----------------------------------------------------------------------------- input features

def test_feature_pruning_drops_least_used_columns():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Dropout(0.1), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 1)).eval()
    with torch.no_grad():
        model[1].weight[:, [2, 5, 7]] *= 0.01  # clearly the least used columns
    original = copy.deepcopy(model)
    names = [f"f{j}" for j in range(12)]
    report = report_of(prune_features(model, 0.25, feature_names=names, inplace=True))
    assert report.layer == "1" and report.dropped == [2, 5, 7]
    assert report.dropped_names == ["f2", "f5", "f7"] and len(report.kept) == 9
    assert model[1].in_features == 9 and report.params_after == report.params_before - 3 * 16

    x = torch.randn(20, 12)
    zeroed = x.clone()
    zeroed[:, report.dropped] = 0
    torch.testing.assert_close(model(x[:, report.kept]), original(zeroed), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(SelectColumns(model, report.kept)(x), original(zeroed), rtol=1e-6, atol=1e-6)
    assert report.importance == pytest.approx(feature_importance(original[1]).tolist())
    assert json.loads(json.dumps(report.to_dict()))["dropped"] == [2, 5, 7]


def test_feature_pruning_keep_k_and_given_importance():
    torch.manual_seed(0)
    model = MLP(d_in=6).eval()
    report = report_of(prune_features(model, keep=4, importance=[5.0, 0.1, 3.0, 0.2, 4.0, 1.0], layer="fc1", inplace=True))
    assert report.kept == [0, 2, 4, 5] and report.dropped == [1, 3] and report.dropped_names is None
    assert model.fc1.weight.shape == (300, 4)
    assert model(torch.randn(3, 4)).shape == (3, 5)


def test_feature_pruning_rejects_inputs_read_elsewhere():
    class Skip(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) + x

    class Untraceable(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) if x.sum() > 0 else -self.fc(x)

    with pytest.raises(ModelError, match="read by function node 'add'"):
        prune_features(Skip(), 0.5, inplace=True)
    with pytest.raises(ConfigError, match="does not read the model input"):
        prune_features(MLP(), 0.5, layer="fc2", inplace=True)
    with pytest.raises(ModelError, match="cannot trace Untraceable"):
        prune_features(Untraceable(), 0.5, inplace=True)
    report = report_of(prune_features(Untraceable(), 0.5, layer="fc", inplace=True))  # an explicit layer is trusted
    assert len(report.kept) == 2


# ----------------------------------------------------------------------------- bad inputs

@pytest.mark.parametrize("sparsity", [1.0, -0.1, 1.5, True, "0.5"])
def test_sparsity_outside_unit_interval_is_rejected(mlp, sparsity):
    with pytest.raises(ConfigError, match="sparsity"):
        magnitude_prune(mlp, sparsity, inplace=True)


def test_bad_arguments_raise_config_errors_naming_them(mlp, cnn):
    cases = [
        (lambda: nm_prune(mlp, 4, 2), "n must be <= m"),
        (lambda: nm_prune(mlp, 0, 4), "n must be"),
        (lambda: magnitude_prune(mlp, 0.5, include=["^nope$"]), "include pattern '\\^nope\\$' matches no layer"),
        (lambda: magnitude_prune(mlp, 0.5, ignore="conv"), "ignore pattern 'conv' matches no layer"),
        (lambda: magnitude_prune(mlp, 0.5, include="(["), "include: invalid layer-name pattern"),
        (lambda: magnitude_prune(mlp, 0.5, layer_types="embedding"), "layer_types"),
        (lambda: magnitude_prune(mlp, 0.5, layer_types="conv2d"), "no layer selected"),
        (lambda: magnitude_prune(mlp, 0.5, scope="model"), "scope"),
        (lambda: prune_channels(mlp, 1.0), "amount"),
        (lambda: prune_channels(mlp, 0.5, norm="l3"), "norm"),
        (lambda: prune_channels(cnn, 0.5, include="nothing"), "include pattern"),
        (lambda: gradual_prune(mlp, 0.5, 0, lambda m: None), "steps"),
        (lambda: gradual_prune(mlp, 1.2, 3, lambda m: None), "target"),
        (lambda: gradual_prune(mlp, 0.5, 3, lambda m: None, initial=0.6), "initial"),
        (lambda: gradual_prune(mlp, 0.5, 3, None), "train_fn"),
        (lambda: prune_features(mlp, 0.5, keep=3), "exactly one of fraction"),
        (lambda: prune_features(mlp, 1.0), "fraction"),
        (lambda: prune_features(mlp, keep=41), "keep"),
        (lambda: prune_features(mlp, 0.5, importance=[1.0, 2.0]), "importance"),
        (lambda: prune_features(mlp, 0.5, feature_names=["a"]), "feature_names"),
        (lambda: prune_features(mlp, 0.5, layer="norm"), "layer 'norm'"),
        (lambda: prune_features(mlp, 0.5, layer="missing"), "layer 'missing'"),
    ]
    for call, message in cases:
        with pytest.raises(ConfigError, match=message):
            call()
    assert weight_mask(mlp.fc1) is None and mlp.fc1.in_features == 40  # nothing changed on error


def test_non_finite_inputs_raise_data_errors(mlp):
    with pytest.raises(DataError, match="importance"):
        prune_features(mlp, 0.5, importance=[float("nan")] * 40, inplace=True)
    with torch.no_grad():
        mlp.fc2.weight[0, 0] = float("inf")
    with pytest.raises(DataError, match="'fc2'"):
        magnitude_prune(mlp, 0.5, inplace=True)


def test_small_cnn_fixture_prunes_what_it_can(cnn, cnn_batches):
    x = cnn_batches[0]
    masked = copy.deepcopy(cnn)
    report = report_of(prune_channels(cnn, 0.5, inplace=True))
    assert list(report.channels) == ["conv1d"]  # conv1 feeds a grouped conv, conv2 is grouped
    _zero_inputs(masked, "fc", _dropped(report, "conv1d", 8), block=16)
    torch.testing.assert_close(cnn(x), masked(x), rtol=1e-5, atol=1e-5)

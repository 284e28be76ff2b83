"""Mixed precision: sensitivity (cached), MILP allocation under budgets, auto quantize, tuning."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from torch import nn
from hypothesis import given, settings
from hypothesis import strategies as st

import squeezer
from squeezer import ConfigError, DataError
from squeezer.modules import quant_layers
from squeezer.search import (
    Budget,
    Sensitivity,
    allocate,
    costs,
    measure_latency,
    measure_sensitivity,
)
from squeezer.search.auto import auto_quantize, checkpoint_bytes
from squeezer.search.hessian import hessian_traces
from squeezer.search.tune import tune

FORMATS = ("w8", "w4g128", "w2g64", "fp32")


def _output_score(model, batches):
    """1 - relative output error against the float model: a deterministic 'accuracy'."""
    ref = torch.cat([model(b) for b in batches]).detach()

    def evaluate(m):
        with torch.no_grad():
            out = torch.cat([m(b) for b in batches])
        return float(1 - (out - ref).pow(2).sum() / ref.pow(2).sum())
    return evaluate


@pytest.fixture
def sens(mlp, mlp_batches, tmp_path):
    return measure_sensitivity(mlp, mlp_batches, FORMATS, cache_dir=tmp_path / "cache", progress=False)


def _toy(scores, nbytes, params=(100, 100, 100)) -> Sensitivity:
    layers = [f"l{i}" for i in range(len(scores))]
    fmts = list(scores[0])
    return Sensitivity(
        layers=layers, formats=fmts, algorithm="rtn", params=dict(zip(layers, params)),
        bytes={l: dict(b) for l, b in zip(layers, nbytes)},
        bits={l: {f: {"w8": 8, "w4g128": 4, "w2g64": 2}[f] for f in fmts} for l in layers},
        macs={l: 10.0 for l in layers}, fixed_bytes=50,
        rel_mse={l: dict(s) for l, s in zip(layers, scores)}, kl={l: dict(s) for l, s in zip(layers, scores)},
    )


def _brute_force(sens: Sensitivity, budget_bytes: float) -> float:
    best = float("inf")
    for combo in itertools.product(sens.formats, repeat=len(sens.layers)):
        choice = dict(zip(sens.layers, combo))
        if costs(sens, choice)["bytes"] <= budget_bytes:
            best = min(best, sum(sens.rel_mse[l][f] for l, f in choice.items()))
    return best


def test_ilp_known_optimum():
    # Hand-made: budget 50 fixed + 210 bytes. Among the choices that fit, the optimum is l0 w4g128, l1 w8,
    # l2 w2g64 (60 + 100 + 20 = 180 bytes, score 0.4); l2 in w4g128 too would need 220 bytes.
    sens = _toy(
        scores=[{"w8": 0.0, "w4g128": 0.1, "w2g64": 5.0}, {"w8": 0.0, "w4g128": 3.0, "w2g64": 9.0},
                {"w8": 0.0, "w4g128": 0.2, "w2g64": 0.3}],
        nbytes=[{"w8": 100, "w4g128": 60, "w2g64": 20}] * 3,
    )
    a = allocate(sens, Budget(bytes=260))
    assert a.choice == {"l0": "w4g128", "l1": "w8", "l2": "w2g64"}
    assert a.objective == pytest.approx(0.4)
    assert a.bytes == 50 + 180


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 10), st.floats(0, 10), st.floats(0, 10)), min_size=2, max_size=4),
       st.floats(0.0, 1.0))
def test_ilp_matches_brute_force_and_never_exceeds_budget(raw, fraction):
    scores = [{"w8": 0.0, "w4g128": min(s), "w2g64": max(s)} for s in raw]  # fewer bytes -> higher score
    nbytes = [{"w8": 100 + 10 * i, "w4g128": 50 + 7 * i, "w2g64": 10 + 3 * i} for i in range(len(raw))]
    sens = _toy(scores, nbytes, params=tuple(100 for _ in raw))
    smallest = sens.fixed_bytes + sum(b["w2g64"] for b in nbytes)
    largest = sens.fixed_bytes + sum(b["w8"] for b in nbytes)
    budget = smallest + fraction * (largest - smallest)
    a = allocate(sens, Budget(bytes=budget))
    assert a.bytes <= budget
    assert a.objective == pytest.approx(_brute_force(sens, budget), abs=1e-6)


def test_budget_below_smallest_model_names_it(sens):
    with pytest.raises(ConfigError, match="budget bytes=.*below the smallest possible model"):
        allocate(sens, Budget(bytes=10))
    with pytest.raises(ConfigError, match="budget bits=1 is below"):
        allocate(sens, 1.0)


@pytest.mark.parametrize("bad", [-1, 0, float("nan"), "4"])
def test_bad_budget_values(bad):
    with pytest.raises(ConfigError, match="budget"):
        Budget.parse({"bits": bad})
    with pytest.raises(ConfigError, match="unknown budget field"):
        Budget.parse({"bitz": 4})


def test_sensitivity_orders_formats_and_is_cached(mlp, mlp_batches, tmp_path, sens):
    assert sens.layers == ["fc1", "fc2", "head"] and not sens.from_cache
    for layer in sens.layers:
        mse = sens.rel_mse[layer]
        assert mse["fp32"] == 0.0 and 0 < mse["w8"] < mse["w4g128"] < mse["w2g64"]
        assert sens.kl[layer]["w2g64"] > 0
        assert sens.bytes[layer]["w8"] < sens.bytes[layer]["fp32"]
    assert sens.macs["fc1"] == 40 * 300 and sens.macs["head"] == 300 * 5
    again = measure_sensitivity(mlp, mlp_batches, FORMATS, cache_dir=tmp_path / "cache", progress=False)
    assert again.from_cache and again.rel_mse == sens.rel_mse and again.key == sens.key
    original = mlp.fc1.weight.detach().clone()
    with torch.no_grad():
        mlp.fc1.weight[0, 0] += 1.0  # other weights: another key, measured again
    changed = measure_sensitivity(mlp, mlp_batches, FORMATS, cache_dir=tmp_path / "cache", progress=False)
    assert not changed.from_cache and changed.key != sens.key
    assert len(list((tmp_path / "cache").glob("*.json"))) == 2
    (tmp_path / "cache" / f"{sens.key}.json").write_text("{broken")
    with torch.no_grad():
        mlp.fc1.weight.copy_(original)
    remeasured = measure_sensitivity(mlp, mlp_batches, FORMATS, cache_dir=tmp_path / "cache", progress=False)
    assert not remeasured.from_cache and json.loads((tmp_path / "cache" / f"{sens.key}.json").read_text())


def test_sensitivity_with_user_metric(mlp, mlp_batches, tmp_path):
    evaluate = _output_score(mlp, mlp_batches)
    s = measure_sensitivity(mlp, mlp_batches, ("w8", "w2g64", "fp32"), evaluate=evaluate, cache_dir=None,
                            progress=False)
    assert s.baseline == pytest.approx(1.0)
    for layer in s.layers:
        assert s.metric[layer]["fp32"] == 0 and s.metric[layer]["w2g64"] > s.metric[layer]["w8"] >= 0
    a = allocate(s, 5.0, score="metric")
    assert a.score == "metric" and a.bits <= 5.0
    with pytest.raises(ConfigError, match="'hessian' was not measured"):
        allocate(s, 5.0, score="hessian")


def test_hutchinson_trace_of_a_linear_layer():
    # One Linear y = W x: L = 1/(2N) sum ||dW x||^2, N = rows * out, so tr(H) = sum_rows ||x||^2 / rows.
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(6, 3))
    x = torch.randn(32, 6)
    est = hessian_traces(layer, [x], ["0"], samples=400)["0"]
    exact = float(x.pow(2).sum() / 32)
    assert est == pytest.approx(exact, rel=0.1)
    assert layer[0].weight.grad is None and layer[0].weight.requires_grad


def test_hessian_proxy_scores(mlp, mlp_batches):
    s = measure_sensitivity(mlp, mlp_batches[:1], ("w8", "w2g64", "fp32"), hessian=True, cache_dir=None,
                            progress=False)
    for layer in s.layers:
        assert s.hessian[layer]["fp32"] == 0 < s.hessian[layer]["w8"] < s.hessian[layer]["w2g64"]
    assert set(allocate(s, 4.0, score="hessian").choice) == set(s.layers)


def test_allocation_config_quantizes_each_layer_in_its_format(mlp, mlp_batches, sens):
    a = allocate(sens, Budget(bits=5.0))
    assert a.bits <= 5.0
    q = squeezer.quantize(mlp, a.config(), mlp_batches, progress=False)
    layers = quant_layers(q)
    for name, fmt in a.choice.items():
        if fmt == "fp32":
            assert name not in layers
        else:
            assert layers[name].weight_spec == squeezer.PRESETS[fmt].weight
    assert squeezer.report_of(q).weight_bytes_after == sum(sens.bytes[l][f] for l, f in a.choice.items() if f != "fp32")


def test_bops_and_latency_budgets(mlp, mlp_batches, sens):
    full = costs(sens, {l: "fp32" for l in sens.layers})["bops"]
    a = allocate(sens, {"bops": full / 5})
    assert a.bops <= full / 5
    table = measure_latency(mlp, mlp_batches[0], sens.layers, ["w8", "fp32"], repeats=5)
    assert table.model_ms > 0 and all(v > 0 for row in table.ms.values() for v in row.values())
    limit = table.total({l: "fp32" for l in sens.layers})
    b = allocate(sens, {"latency_ms": limit}, latency=table, formats=["w8", "fp32"])
    assert b.latency_ms <= limit + 1e-9
    with pytest.raises(ConfigError, match="latency table"):
        allocate(sens, {"latency_ms": 1.0})


def test_auto_quantize_honours_checkpoint_bytes(mlp, mlp_batches, sens, tmp_path):
    fp32 = sum(p.numel() * 4 for p in mlp.parameters())
    budget = fp32 / 5
    q = auto_quantize(mlp, mlp_batches, {"bytes": budget}, progress=False)
    allocation = squeezer.report_of(q).config["allocation"]
    squeezer.save(q, tmp_path / "ck")
    on_disk = sum(f.stat().st_size for f in (tmp_path / "ck").iterdir())
    assert on_disk == allocation["checkpoint_bytes"] == checkpoint_bytes(q) and on_disk <= budget
    loaded = squeezer.load(tmp_path / "ck", model=lambda: type(mlp)())
    assert torch.equal(loaded(mlp_batches[0]), q(mlp_batches[0]))


def test_auto_needs_budget_and_calib(mlp, mlp_batches):
    with pytest.raises(ConfigError, match="needs a budget"):
        auto_quantize(mlp, mlp_batches, None)
    with pytest.raises(DataError, match="calibration"):
        auto_quantize(mlp, None, 4)
    with pytest.raises(ConfigError, match=r"squeezer\.search\.auto_quantize"):
        squeezer.quantize(mlp, "auto", mlp_batches)


def test_tune_falls_back_until_the_metric_holds(mlp, mlp_batches, sens):
    evaluate = _output_score(mlp, mlp_batches)
    r = tune(mlp, mlp_batches, evaluate, max_drop=1e-4, sens=sens, formats=FORMATS, progress=False)
    steps = [t.step for t in r.trials]
    assert steps[0] == "start" and not r.trials[0].met
    first_met = next(i for i, t in enumerate(r.trials) if t.met)
    assert all(s == "fallback" for s in steps[1:first_met + 1])
    assert "fallback" not in steps[first_met + 1:], "fallback must stop once the metric holds"
    assert r.met and r.drop <= 1e-4 and r.bytes == min(t.bytes for t in r.trials if t.met)
    assert evaluate(r.model) == pytest.approx(r.metric)


def test_tune_tightens_to_the_smallest_when_everything_passes(mlp, mlp_batches, sens):
    r = tune(mlp, mlp_batches, _output_score(mlp, mlp_batches), max_drop=10.0, budget=Budget(bits=8.0),
             sens=sens, formats=FORMATS, progress=False)
    assert r.choice == {l: "w2g64" for l in sens.layers}
    assert r.trials[0].step == "start" and all(t.met for t in r.trials)


def test_tune_bad_input(mlp, mlp_batches, sens):
    with pytest.raises(ConfigError, match="max_drop"):
        tune(mlp, mlp_batches, lambda m: 1.0, max_drop=-0.1, sens=sens)

    def broken(model):
        raise ValueError("labels missing")
    with pytest.raises(DataError, match="evaluate function raised ValueError.*labels missing"):
        tune(mlp, mlp_batches, broken, max_drop=0.1, sens=sens)


def test_sensitivity_and_allocation_see_attention_projections_by_their_quantized_names() -> None:
    from squeezer.search import auto_quantize, measure_sensitivity

    class Attend(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn, self.head = nn.MultiheadAttention(32, 4, batch_first=True), nn.Linear(32, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.attn(x, x, x, need_weights=False)[0])

    torch.manual_seed(0)
    model, x = Attend().eval(), torch.randn(8, 6, 32)
    sens = measure_sensitivity(model, [x], ("w8", "w4g128"), cache_dir=None, progress=False)
    assert set(sens.layers) == {"attn.in_proj", "attn.out_proj", "head"}
    assert sens.params["attn.in_proj"] == 3 * 32 * 32 and sens.macs["attn.in_proj"] > 0
    q = auto_quantize(model, [x], 6.0, progress=False, sens=sens)
    assert {layer.name for layer in squeezer.report_of(q).layers} <= set(sens.layers)

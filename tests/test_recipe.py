"""Recipes and squeezer.compress: every step, the report, bad recipe files."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import squeezer
import squeezer.training
from squeezer import ConfigError, DataError
from squeezer.modules import QuantLinear
from squeezer.recipe import bundled_recipes, load_recipe, model_size


def _task():
    torch.manual_seed(0)
    x = torch.randn(256, 12)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).float()
    model = nn.Sequential(nn.Linear(12, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1), nn.Flatten(0))
    data = list(zip(x.split(32), y.split(32)))
    squeezer.training.fit(model, data, epochs=5, lr=1e-2)
    return model.eval(), data, x, y


def _accuracy(x, y):
    return lambda m: float(((m(x) > 0).float() == y).float().mean())


def test_report_lists_every_step_in_order():
    model, data, x, y = _task()
    recipe = [{"prune": {"kind": "structured", "sparsity": 0.5}}, {"finetune": {"epochs": 2}},
              {"quantize": {"preset": "w8"}}]
    out = squeezer.compress(model, recipe, data=data, evaluate=_accuracy(x, y))
    rows = out.squeezer_compression.rows
    assert [r.step for r in rows] == ["baseline", "prune", "finetune", "quantize"]
    assert rows[1].params < 0.5 * rows[0].params and rows[3].bytes < rows[2].bytes / 2.5  # small layers: scales and fp32 biases weigh in
    assert all(r.metric is not None and r.metric > 0.8 for r in rows)
    assert isinstance(out[4], QuantLinear) and not isinstance(model[4], QuantLinear), "the input model is untouched"


def test_unstructured_masks_stay_zero_through_finetune_and_count():
    model, data, x, y = _task()
    out = squeezer.compress(model, [{"prune": {"kind": "global", "sparsity": 0.7}}, {"finetune": {"epochs": 1}}], data=data)
    rows = out.squeezer_compression.rows
    assert rows[1].nonzero_params == rows[2].nonzero_params < 0.45 * rows[0].nonzero_params
    assert rows[1].params == rows[0].params


@pytest.mark.parametrize("step", [{"lowrank": {"budget": 0.5, "min_params": 1000}}, {"prune": {"kind": "nm"}},
                                  {"prune": {"kind": "features", "sparsity": 0.5}},
                                  {"qat": {"preset": "w4g128", "epochs": 1}}, {"distill": {"epochs": 1}},
                                  {"distill": {"epochs": 2, "cache_teacher": True}},
                                  {"prune": {"kind": "unstructured", "sparsity": 0.5, "steps": 2, "finetune_epochs": 1}}])
def test_each_step_runs(step):
    model, data, x, y = _task()
    out = squeezer.compress(model, [step], data=data, evaluate=_accuracy(x, y))
    row = out.squeezer_compression.rows[-1]
    assert row.step == next(iter(step)) and row.metric > 0.6
    assert out(x).shape == (256,), "the compressed model takes the same inputs"


def test_bundled_recipes_parse_and_run_by_name():
    assert {"prune50-int8-finetune", "sparse80-int8", "lowrank-int8-distill", "qat-w2"} <= set(bundled_recipes())
    for name in bundled_recipes():
        assert load_recipe(name)
    model, data, x, y = _task()
    out = squeezer.compress(model, "prune50-int8-finetune", data=data)
    assert [r.step for r in out.squeezer_compression.rows] == ["baseline", "prune", "finetune", "quantize"]


def test_model_size_counts_packed_weights():
    model, *_ = _task()
    params, nonzero, size = model_size(model)
    assert params == sum(p.numel() for p in model.parameters()) and size == 4 * params
    q = squeezer.quantize(model, "w4g128")
    assert model_size(q)[2] < size / 4


@pytest.mark.parametrize("recipe, message", [
    ([{"shrink": {}}], "unknown step 'shrink'"),
    ([{"prune": {"sparsity": 0.5, "amount": 1}}], r"step 0 \(prune\): unknown option\(s\) \['amount'\]"),
    ([{"prune": 0.5}], "options must be a mapping"),
    ([{"prune": {}, "quantize": {}}], "one key"),
    ([], "non-empty list"),
    ("no-such-recipe", "neither a bundled recipe"),
    ([{"prune": {"kind": "diagonal"}}], "unknown kind 'diagonal'"),
    ([{"quantize": {}}], "exactly one of 'preset' and 'config'"),
    ([{"prune": {"sparsity": 1.5}}], "sparsity"),
    ([{"distill": {"cache_teacher": "yes"}}], "distill: cache_teacher must be true or false, got 'yes'"),
])
def test_bad_recipes_name_the_field(recipe, message):
    model, data, *_ = _task()
    with pytest.raises(ConfigError, match=message):
        squeezer.compress(model, recipe, data=data)


def test_training_step_without_data():
    model, *_ = _task()
    with pytest.raises(DataError, match=r"\['finetune'\] train the model"):
        squeezer.compress(model, [{"finetune": {"epochs": 1}}])


def test_yaml_file(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("- quantize: {preset: w8}\n")
    assert load_recipe(path) == [("quantize", {"preset": "w8"})]
    path.write_text("- quantize: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_recipe(path)

"""Recipes and squeezer.compress: every step, the report, bad recipe files."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import squeezer
import squeezer.training
from squeezer import ConfigError, DataError
from squeezer.modules import QuantLinear
from squeezer.algorithms import make_algorithm
from squeezer.recipe import RECIPE_VERSION, Recipe, bundled_recipes, load_recipe, model_size
from squeezer.steps import QAT, Distill, Finetune, LowRank, Prune, Quantize


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
    rows = squeezer.report_of(out).rows
    assert [r.step for r in rows] == ["baseline", "prune", "finetune", "quantize"]
    assert rows[1].params < 0.5 * rows[0].params and rows[3].bytes < rows[2].bytes / 2.5  # small layers: scales and fp32 biases weigh in
    assert all(r.metric is not None and r.metric > 0.8 for r in rows)
    assert isinstance(out[4], QuantLinear) and not isinstance(model[4], QuantLinear), "the input model is untouched"


def test_unstructured_masks_stay_zero_through_finetune_and_count():
    model, data, x, y = _task()
    out = squeezer.compress(model, [{"prune": {"kind": "global", "sparsity": 0.7}}, {"finetune": {"epochs": 1}}], data=data)
    rows = squeezer.report_of(out).rows
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
    row = squeezer.report_of(out).rows[-1]
    assert row.step == next(iter(step)) and row.metric > 0.6
    assert out(x).shape == (256,), "the compressed model takes the same inputs"


def test_bundled_recipes_parse_and_run_by_name():
    assert {"prune50-int8-finetune", "sparse80-int8", "lowrank-int8-distill", "qat-w2"} <= set(bundled_recipes())
    for name in bundled_recipes():
        assert load_recipe(name)
    model, data, x, y = _task()
    out = squeezer.compress(model, "prune50-int8-finetune", data=data)
    assert [r.step for r in squeezer.report_of(out).rows] == ["baseline", "prune", "finetune", "quantize"]


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
    assert load_recipe(path) == Recipe([Quantize(preset="w8")], version=1)
    path.write_text("- quantize: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_recipe(path)


def test_recipe_yaml_round_trip_keeps_version_and_steps(tmp_path):
    for name in bundled_recipes():
        recipe = load_recipe(name)
        assert recipe.version == RECIPE_VERSION and Recipe.from_yaml(recipe.to_yaml()) == recipe
    recipe = Recipe.from_list([{"prune": {"kind": "nm", "n": 1, "include": ["fc"]}},
                               {"quantize": {"preset": "w4g128", "algorithm": ["smoothquant", {"gptq": {"damp": 0.05}}]}}])
    text = recipe.to_yaml()
    assert text.startswith(f"version: {RECIPE_VERSION}\n")
    assert Recipe.from_yaml(text) == recipe and recipe.steps[0] == Prune(kind="nm", n=1, include=("fc",))
    assert Recipe.from_yaml("- finetune: {epochs: 2}\n").version == 1, "a bare list is version 1"
    with pytest.raises(ConfigError, match="version must be an integer from 1"):
        Recipe.from_yaml(f"version: {RECIPE_VERSION + 1}\nsteps: [{{finetune: {{}}}}]\n")
    with pytest.raises(ConfigError, match="keys version and steps"):
        Recipe.from_yaml("steps: [{finetune: {}}]\n")


@pytest.mark.parametrize("build, message", [
    (lambda: Prune(sparsity=1.5), r"^prune: sparsity must be a number in \[0, 1\)"),
    (lambda: Prune(kind="nm", steps=3), "prune: steps .* not 'nm'"),
    (lambda: Prune(n=0), "prune: n must be an integer >= 1"),
    (lambda: LowRank(), "lowrank: give exactly one of 'energy' and 'budget'"),
    (lambda: LowRank(budget=2.0), r"lowrank: budget must be a number in \[0, 1\]"),
    (lambda: Quantize(preset="w8", config={}), "quantize: give exactly one"),
    (lambda: Quantize(preset="w9"), "unknown preset 'w9'"),
    (lambda: Quantize(preset="w4g128", algorithm="gptq+smoothquant+gptq"), "quantize: algorithm: .*repeats a step"),
    (lambda: Quantize(preset="w4g128", algorithm=[{"gptq": {"nope": 1}}]), "algorithm 'gptq': bad options"),
    (lambda: Quantize(preset="w4g128-gptq", algorithm="awq"), "quantize: algorithm is given twice"),
    (lambda: QAT(preset="w8", epochs=0), "qat: epochs must be an integer >= 1"),
    (lambda: Distill(alpha=2), r"distill: alpha must be a number in \[0, 1\]"),
    (lambda: Finetune(lr="fast"), "finetune: lr must be a number"),
])
def test_typed_steps_validate_on_construction(build, message):
    with pytest.raises(ConfigError, match=message):
        build()


def test_recipe_errors_name_the_step_index():
    with pytest.raises(ConfigError, match=r"^recipe step 2: quantize: algorithm: unknown algorithm 'rotate'"):
        Recipe.from_list([{"finetune": {}}, {"prune": {}}, {"quantize": {"preset": "w8", "algorithm": "rotate"}}])


def test_algorithm_chain_is_a_recipe_of_algorithm_steps():
    assert [type(s) for s in make_algorithm("smoothquant+gptq").steps] == \
        [type(s) for s in make_algorithm(["smoothquant", {"gptq": None}]).steps]
    model, data, x, _ = _task()
    chained = squeezer.quantize(model, "w4g128-smoothquant+gptq", calib=[b for b, _ in data[:16]], progress=False)
    stepped = squeezer.compress(model, [{"quantize": {"preset": "w4g128", "algorithm": ["smoothquant", "gptq"]}}],
                                data=data)
    assert squeezer.report_of(stepped, squeezer.QuantReport).config["algorithm"] == "smoothquant+gptq"
    assert torch.equal(chained(x), stepped(x))

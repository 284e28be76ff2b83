"""Fuzzed user input to every loader: YAML configs and recipes, ``.npy`` / ``.npz`` / ``.csv`` calibration
files, ONNX runner calls. Each ends in a load or a :class:`SqueezerError`, never another exception,
and none takes over 10 s (hypothesis' deadline per example). Bounded for CI: few examples unless
``SQUEEZER_FUZZ_EXAMPLES`` asks for more."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import squeezer
from squeezer.config import QuantConfig
from squeezer.errors import SqueezerError
from squeezer.exporters.onnx.runner import OnnxModule
from squeezer.io.calib_files import load_calibration
from squeezer.recipe import Recipe

from .conftest import MLP, fuzz_examples

FUZZ = settings(max_examples=fuzz_examples(60), deadline=10_000, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
OUTCOMES: Counter = Counter()
"""(loader, outcome) -> count over the whole module (printed at the end with ``-s``)."""

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True),
                    st.text(max_size=20), st.sampled_from(["w8", "gptq", "per_channel", "linear", "tensor", "-1"]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.one_of(st.text(max_size=10), st.integers(-5, 5)), inner, max_size=4),
                      max_leaves=12)
config_keys = st.sampled_from(["weight", "activation", "activation_mode", "observer", "layer_types", "include",
                               "ignore", "overrides", "algorithm", "algorithm_options", "name", "bits", "junk"])
spec_keys = st.sampled_from(["bits", "symmetric", "signed", "granularity", "mapping", "group_size", "axis"])
configs = st.dictionaries(config_keys, st.one_of(values, st.dictionaries(spec_keys, values, max_size=4)), max_size=5)
step_names = st.sampled_from(["prune", "lowrank", "quantize", "qat", "distill", "finetune", "nope"])
recipes = st.one_of(
    st.lists(st.dictionaries(step_names, st.one_of(st.none(), st.dictionaries(st.text(max_size=12), values,
                                                                                max_size=3)), max_size=2), max_size=3),
    st.fixed_dictionaries({"version": values, "steps": values}), values)
# raw text: YAML-looking fragments with anchors, aliases, tags and flow brackets
yaml_text = st.lists(st.sampled_from(list("abc:- &*[]{},!\n'\"#|>%@`0129.") + ["&a ", "*a", "!!python/object", "\t"]),
                     max_size=60).map("".join)


def _outcome(loader: str, call) -> None:
    start = time.perf_counter()
    try:
        call()
        OUTCOMES[loader, "loaded"] += 1
    except SqueezerError as exc:
        OUTCOMES[loader, type(exc).__name__] += 1
        assert len(str(exc)) < 2000, str(exc)[:300]
    assert time.perf_counter() - start < 10


def _dump(data) -> str:
    return yaml.safe_dump(data, allow_unicode=True)


@FUZZ
@given(data=configs)
def test_yaml_configs(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    path.write_text(_dump(data))
    _outcome("config", lambda: squeezer.quantize(MLP(d_in=4, hidden=8, d_out=2), str(path), calib=[torch.randn(3, 4)],
                                                 progress=False))


@FUZZ
@given(text=yaml_text)
def test_yaml_config_text(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    path.write_text(text)
    _outcome("config text", lambda: QuantConfig.from_yaml(path))


@FUZZ
@given(data=recipes)
def test_yaml_recipes(data):
    _outcome("recipe", lambda: Recipe.from_yaml(_dump(data)))


@FUZZ
@given(text=yaml_text)
def test_yaml_recipe_text(text):
    _outcome("recipe text", lambda: Recipe.from_yaml(text))


# mostly numbers of the model's width (4), so that loads succeed as often as they fail
dtypes = st.one_of(hnp.floating_dtypes(), hnp.integer_dtypes(), hnp.scalar_dtypes(), hnp.byte_string_dtypes(max_len=3),
                   hnp.unicode_string_dtypes(max_len=3))
shapes = st.one_of(st.tuples(st.integers(0, 6), st.sampled_from([4, 4, 3])),
                   hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4))
arrays = hnp.arrays(dtypes, shapes)


@FUZZ
@given(members=st.dictionaries(st.sampled_from(["arr_0", "arr_1", "x", "y", "input_ids"]), arrays, max_size=3),
       suffix=st.sampled_from([".npy", ".npz"]), batch_size=st.integers(-1, 5))
def test_numpy_calibration_files(tmp_path_factory, members, suffix, batch_size):
    path = tmp_path_factory.mktemp("calib") / f"c{suffix}"
    if suffix == ".npy":
        np.save(path, next(iter(members.values()), np.zeros(0)))
    else:
        np.savez(path, **members)
    _outcome(suffix, lambda: _load_and_quantize(path, batch_size))


def _load_and_quantize(path: Path, batch_size: int) -> None:
    batches = load_calibration(path, batch_size)
    squeezer.quantize(MLP(d_in=4, hidden=8, d_out=2), "w8a8-static", calib=batches, progress=False)


@FUZZ
@given(text=st.one_of(
    st.lists(st.sampled_from(list("0123456789.,-e\n ab") + ["nan", "inf"]), max_size=40).map("".join),
    st.lists(st.lists(st.one_of(st.floats(-1e3, 1e3).map(str), st.floats(-1e3, 1e3).map(str), st.sampled_from(["", "x", "1e999"])), min_size=4,
                      max_size=4).map(",".join), min_size=1, max_size=6).map("\n".join)),
       raw=st.binary(max_size=40))
def test_csv_calibration_files(tmp_path_factory, text, raw):
    folder = tmp_path_factory.mktemp("csv")
    (folder / "t.csv").write_text(text)
    (folder / "b.csv").write_bytes(raw)
    _outcome(".csv", lambda: _load_and_quantize(folder / "t.csv", 2))
    _outcome(".csv bytes", lambda: load_calibration(folder / "b.csv"))


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "m.onnx"
    squeezer.export(squeezer.quantize(MLP(d_in=4, hidden=8, d_out=2), "w8"), torch.randn(1, 4), path)
    return path


@FUZZ
@given(value=arrays,
       as_torch=st.booleans())
def test_onnx_runner_calls(onnx_file, value, as_torch):
    run = OnnxModule(onnx_file)
    if as_torch and value.dtype.kind in "biuf" and value.dtype.byteorder in "=|<":
        value = torch.from_numpy(value.copy())
    _outcome("onnx", lambda: run(value))


def test_report_outcomes():
    """Runs last in this module: the counts of what the fuzzing produced."""
    print("\nfuzz outcomes:", dict(sorted(OUTCOMES.items())), "total", sum(OUTCOMES.values()))
    assert sum(OUTCOMES.values()) > 0

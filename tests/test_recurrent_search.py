"""Sensitivity and mixed precision with each recurrent weight matrix as a unit of the search."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import squeezer
from squeezer.errors import ConfigError
from squeezer.search.allocate import allocate, choice_config
from squeezer.search.sensitivity import measure_sensitivity

from .recurrent_task import held_out, trained

FORMATS = ("w8", "w4g128", "w2g64", "fp32")


@pytest.fixture(scope="module")
def sens():
    calib, _ = held_out(calib_batches=2)
    return measure_sensitivity(trained(nn.LSTM), calib, FORMATS, cache_dir=None, progress=False)


def test_each_matrix_is_a_unit(sens) -> None:
    lstm = trained(nn.LSTM).rnn
    matrices = {f"rnn.{n}": w for n, w in lstm.named_parameters() if n.startswith("weight")}
    assert set(sens.layers) == {*matrices, "head"}
    for unit, w in matrices.items():
        assert sens.params[unit] == w.numel() and sens.bits[unit]["w2g64"] == 2
        assert sens.bytes[unit]["w2g64"] < sens.bytes[unit]["w8"] < sens.bytes[unit]["fp32"] == 4 * w.numel()
        assert 0 < sens.rel_mse[unit]["w8"] < sens.rel_mse[unit]["w2g64"]  # each matrix measured on its own
        assert sens.macs[unit] == 16 * w.numel()  # once per time step
    assert len({sens.rel_mse[u]["w2g64"] for u in matrices}) == len(matrices)


def _bits_of(q: nn.Module) -> dict[str, int]:
    return {f"rnn.{n}": qt.spec.bits for n, qt in q.rnn.matrix_qtensors().items()}


def test_allocation_gives_matrices_of_one_layer_different_bits_and_the_model_runs_them(sens) -> None:
    model = trained(nn.LSTM)
    alloc = allocate(sens, 5.0, formats=["w8", "w4g128", "w2g64"])
    chosen = {u: sens.bits[u][f] for u, f in alloc.choice.items() if u.startswith("rnn.")}
    assert len(set(chosen.values())) > 1  # mixed inside the layer
    q = squeezer.quantize(model, alloc.config(), progress=False)
    assert _bits_of(q) == chosen
    layer = next(l for l in squeezer.report_of(q).layers if l.name == "rnn")
    assert layer.bytes_after == sum(sens.bytes[u][alloc.choice[u]] for u in chosen)
    x = held_out()[1][0][:8]
    uniform = squeezer.quantize(model, choice_config({u: "w8" for u in alloc.choice}), progress=False)
    with torch.no_grad():
        assert not torch.equal(q(x), uniform(x))


def test_float_is_all_matrices_of_a_layer_or_none(sens) -> None:
    loose = max(sum(sens.bytes[u].values()) for u in sens.layers) * len(sens.layers)
    for budget in (2.5, 6.0, {"bytes": loose}):
        choice = allocate(sens, budget).choice
        rnn_float = [f == "fp32" for u, f in choice.items() if u.startswith("rnn.")]
        assert all(rnn_float) or not any(rnn_float), (budget, choice)
    with pytest.raises(ConfigError, match="'rnn'.*all fp32 or all quantized"):
        choice_config({"rnn.weight_ih_l0": "fp32", "rnn.weight_hh_l0": "w8"})


def test_matrix_override_in_a_config() -> None:
    model = trained(nn.GRU)
    q = squeezer.quantize(model, {"weight": {"bits": 8}, "overrides": {r"^rnn\.weight_hh_l1$": {"weight": {"bits": 4}},
                                                                     "^head$": {"weight": {"bits": 6}}}}, progress=False)
    assert _bits_of(q) == {"rnn.weight_ih_l0": 8, "rnn.weight_hh_l0": 8, "rnn.weight_ih_l1": 8, "rnn.weight_hh_l1": 4}
    assert q.head.weight_spec.bits == 6

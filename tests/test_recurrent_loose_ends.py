"""Recurrent layers through checkpoints with per-matrix specs, Hessian sensitivity, the accuracy-driven
fallback and QAT of static state grids."""

from __future__ import annotations

import json

import pytest
import torch
from torch import Tensor, nn

import squeezer
from squeezer.errors import ModelError
from squeezer.io.checkpoint import MANIFEST, TENSORS, load, save, verify
from squeezer.io.manifest import digest

from .recurrent_task import SequenceModel, batch

MIXED = {"weight": {"bits": 8}, "overrides": {r"^rnn\.weight_hh_l1$": {"weight": {"bits": 4}},
                                              r"^rnn\.weight_ih_l0$": {"weight": {"bits": 6, "granularity": "tensor"}}}}


def _model(rnn_class: type[nn.RNNBase] = nn.LSTM) -> SequenceModel:
    torch.manual_seed(0)
    return SequenceModel(rnn_class, hidden=16).eval()


def _data(n: int = 8, seed: int = 0) -> tuple[Tensor, Tensor]:
    return batch(n, torch.Generator().manual_seed(seed), steps=6)


def _bits(model: nn.Module) -> dict[str, int]:
    return {n: qt.spec.bits for n, qt in model.rnn.matrix_qtensors().items()}


# ---------------------------------------------------------------- checkpoints with per-matrix specs
@pytest.mark.parametrize("rnn_class", [nn.LSTM, nn.GRU])
@pytest.mark.parametrize("packed", [False, True])
def test_mixed_matrix_specs_save_and_load_bit_identically(rnn_class: type, packed: bool, tmp_path) -> None:
    q = squeezer.quantize(_model(rnn_class), MIXED, progress=False)
    assert len(set(_bits(q).values())) == 3
    model = squeezer.pack(q) if packed else q
    save(model, tmp_path / "ckpt")
    manifest = json.loads((tmp_path / "ckpt" / MANIFEST).read_text())
    assert set(manifest["layers"]["rnn"]["matrix_specs"]) == {"weight_hh_l1", "weight_ih_l0"}
    for load_packed in (False, True):
        restored = load(tmp_path / "ckpt", lambda: _model(rnn_class), packed=load_packed)
        assert _bits(restored) == _bits(q)
        assert {n: qt.spec for n, qt in restored.rnn.matrix_qtensors().items()} == \
            {n: qt.spec for n, qt in q.rnn.matrix_qtensors().items()}
        x = _data()[0]
        with torch.no_grad():
            reference = model(x) if packed == load_packed else (squeezer.pack(q) if load_packed else q)(x)
            assert torch.equal(restored(x), reference)


def test_uniform_layer_writes_no_matrix_specs(tmp_path) -> None:
    save(squeezer.quantize(_model(), "w8", progress=False), tmp_path / "ckpt")
    assert "matrix_specs" not in json.loads((tmp_path / "ckpt" / MANIFEST).read_text())["layers"]["rnn"]


def _forge(directory, change) -> None:
    """Change the manifest and re-seal its digest (as an attacker could): the content checks must still refuse."""
    manifest = json.loads((directory / MANIFEST).read_text())
    change(manifest)
    manifest["sha256"] = digest(manifest, directory / TENSORS)
    (directory / MANIFEST).write_text(json.dumps(manifest))


def _set_spec(matrix: str, **fields):
    return lambda m: m["layers"]["rnn"]["matrix_specs"].setdefault(matrix, {}).update(fields)


@pytest.mark.parametrize("change, culprit", [
    (_set_spec("weight_hh_l1", bits=8), r"rnn.weight_hh_l1.codes.*must have shape"),
    (_set_spec("weight_ih_l0", granularity="channel"), r"rnn.weight_ih_l0.scale.*must have shape"),
    (_set_spec("weight_hh_l7", bits=4), r"matrix_specs name must be one of"),
    (_set_spec("weight_hh_l1", bits="4"), r"matrix_specs\['weight_hh_l1'\].bits must be an integer"),
    (_set_spec("weight_hh_l1", bits=0), r"matrix_specs\['weight_hh_l1'\]"),
    (lambda m: m["layers"]["rnn"].update(matrix_specs={}), r"matrix_specs must be a mapping"),
    (lambda m: m["layers"]["rnn"]["matrix_specs"].pop("weight_hh_l1"), r"rnn.weight_hh_l1.codes.*must have shape"),
], ids=["bits", "granularity", "unknown-matrix", "string-bits", "bad-bits", "empty", "dropped"])
def test_forged_matrix_specs_are_refused(change, culprit, tmp_path) -> None:
    path = tmp_path / "ckpt"
    save(squeezer.quantize(_model(), MIXED, progress=False), path)
    _forge(path, change)
    with pytest.raises(ModelError, match=culprit):
        load(path, _model)
    with pytest.raises(ModelError, match=culprit):
        verify(path)


def test_codes_checked_against_their_own_matrix_spec(tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    path = tmp_path / "ckpt"
    save(squeezer.quantize(_model(), MIXED, progress=False), path)
    tensors = load_file(str(path / TENSORS))
    key = "rnn.weight_hh_l1.codes"  # symmetric int4: codes -7..7; the nibble 0xF is 8, in range for 8 bits only
    tensors[key] = torch.full_like(tensors[key], 0xFF)
    save_file(tensors, str(path / TENSORS))
    _forge(path, lambda m: None)
    with pytest.raises(ModelError, match=f"{key}.*outside"):
        verify(path)


# ---------------------------------------------------------------- Hessian sensitivity of recurrent matrices
def test_hessian_sensitivity_of_each_recurrent_matrix() -> None:
    from squeezer.search.hessian import hessian_traces, unit_weight
    from squeezer.search.sensitivity import measure_sensitivity

    model = _model(nn.GRU)
    calib = [_data(4, seed)[0] for seed in range(2)]
    sens = measure_sensitivity(model, calib, ("w8", "w2g64", "fp32"), hessian=True, cache_dir=None, progress=False)
    matrices = [u for u in sens.layers if u.startswith("rnn.")]
    assert len(matrices) == 4 and unit_weight(model, "rnn.weight_hh_l1") is model.rnn.weight_hh_l1
    for unit in sens.layers:
        assert 0 < sens.hessian[unit]["w8"] < sens.hessian[unit]["w2g64"] and sens.hessian[unit]["fp32"] == 0
    traces = hessian_traces(model, calib, matrices)
    assert len(set(traces.values())) == 4 and all(t > 0 for t in traces.values())  # each matrix its own trace
    assert all(p.requires_grad for p in model.parameters())  # restored as they were


def test_hessian_names_a_unit_without_weight() -> None:
    from squeezer.errors import ConfigError
    from squeezer.search.hessian import unit_weight

    with pytest.raises(ConfigError, match="'rnn.bias_hh_l0' is neither"):
        unit_weight(_model(), "rnn.bias_hh_l0")


# ---------------------------------------------------------------- accuracy-driven fallback
def test_move_unit_takes_a_recurrent_layer_to_and_from_fp32_whole() -> None:
    from squeezer.search.tune import move_unit

    ladder = ["w4g128", "w8", "fp32"]
    units = ["rnn.weight_ih_l0", "rnn.weight_hh_l0", "head"]
    ladders = {u: ladder for u in units}
    start = {"rnn.weight_ih_l0": "w8", "rnn.weight_hh_l0": "w4g128", "head": "w8"}
    up = move_unit(start, "rnn.weight_ih_l0", ladders, 1)
    assert up == {"rnn.weight_ih_l0": "fp32", "rnn.weight_hh_l0": "fp32", "head": "w8"}
    assert move_unit(up, "rnn.weight_hh_l0", ladders, -1) == {"rnn.weight_ih_l0": "w8", "rnn.weight_hh_l0": "w8",
                                                               "head": "w8"}
    assert move_unit(up, "head", ladders, 1)["head"] == "fp32"  # a plain layer moves alone
    assert move_unit(up, "head", ladders, 1)["rnn.weight_ih_l0"] == "fp32"


def test_fallback_moves_a_whole_recurrent_layer_to_fp32() -> None:
    from squeezer.modules.recurrent import QuantRecurrent
    from squeezer.search.sensitivity import measure_sensitivity
    from squeezer.search.tune import tune

    model = _model()
    calib = [_data(4, seed)[0] for seed in range(2)]
    sens = measure_sensitivity(model, calib, ("w8", "fp32"), cache_dir=None, progress=False)

    def evaluate(q: nn.Module) -> float:  # met only with the recurrent layer in float
        return float(not any(isinstance(m, QuantRecurrent) for m in q.modules()))

    result = tune(model, calib, evaluate, max_drop=0.5, sens=sens, formats=("w8", "fp32"), progress=False)
    assert result.met and result.choice["head"] == "w8"
    assert all(f == "fp32" for u, f in result.choice.items() if u.startswith("rnn."))
    steps = [t.step for t in result.trials]
    assert "fallback" in steps and "tighten" in steps  # tightening the rnn back to w8 was tried, as a whole
    for trial in result.trials:
        rnn = {f for u, f in trial.choice.items() if u.startswith("rnn.")}
        assert rnn == {"w8"} or rnn == {"fp32"}


# ---------------------------------------------------------------- QAT of static state grids
def _scales(layer: nn.Module) -> dict[tuple[str, str], float]:
    return {(k, s): float(qp.scale) for k, states in layer.state_qparams.items() for s, qp in states.items()}


@pytest.mark.parametrize("learnable_scales", [False, True])
@pytest.mark.parametrize("rnn_class", [nn.LSTM, nn.GRU])
def test_qat_tracks_each_static_state_grid_on_its_own(rnn_class: type, learnable_scales: bool) -> None:
    from squeezer.qat import convert, prepare_qat

    calib = [_data(8, seed)[0] for seed in range(3)]
    q = prepare_qat(_model(rnn_class), "w8a8-static", calib, learnable_scales=learnable_scales)
    calibrated = _scales(q.rnn)
    optimizer = torch.optim.SGD(q.parameters(), 1e-2)
    wide = [(2 * x, y) for x, y in (_data(8, seed) for seed in range(10, 16))]  # inputs twice as wide as calibrated
    for x, y in wide:
        loss = ((q(x) - y) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    tracked = _scales(q.rnn)
    assert tracked.keys() == calibrated.keys()
    assert 1.2 < tracked[("l0", "x")] / calibrated[("l0", "x")] < 2  # the input grid follows the wider inputs
    for grid, scale in tracked.items():  # every other grid stays near its own state's range, not the input's
        assert 0.5 < scale / calibrated[grid] < 4, grid
    if rnn_class is nn.LSTM:
        assert all(float(torch.log2(torch.tensor(s))).is_integer() for (_, state), s in tracked.items() if state == "c")
    converted = convert(q)
    assert _scales(converted.rnn) == tracked
    x = _data(8, 99)[0]
    with torch.no_grad():
        assert torch.equal(converted(x), q.eval()(x))


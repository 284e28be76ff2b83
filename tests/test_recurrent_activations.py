"""Quantized activations of nn.LSTM / nn.GRU / nn.RNN: dynamic x / h, static grids of every state (int16 where
TFLite's integer LSTM has them), calibration, checkpoints and QAT through the recurrence."""

from __future__ import annotations

import json

import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import squeezer
from squeezer.config import QuantConfig
from safetensors.torch import load_file, save_file

from squeezer.io.checkpoint import MANIFEST, TENSORS, load, read_manifest, save, verify
from squeezer.io.manifest import digest
from squeezer.modules import QuantRecurrent, set_mode
from squeezer.recipe import model_size
from squeezer.modules.recurrent import STATE16, INT16_STATES
from squeezer.modules.recurrent_steps import STATE_NAMES, FloatOps, layer_keys, run_recurrent
from squeezer.quant.core import QParams, fake_quantize
from squeezer.quant.spec import PerChannel, PerTensor, QuantSpec

from .recurrent_task import Seq

LAYERS = {
    "lstm-2-bi": lambda: nn.LSTM(8, 16, num_layers=2, bidirectional=True, batch_first=True),
    "lstm-proj": lambda: nn.LSTM(8, 16, proj_size=6, batch_first=True),
    "gru-2": lambda: nn.GRU(8, 16, num_layers=2, batch_first=True),
    "rnn-relu-bi": lambda: nn.RNN(8, 16, nonlinearity="relu", bidirectional=True, batch_first=True),
    "rnn-tanh": lambda: nn.RNN(8, 16, batch_first=True),
}
PRESETS = ("w8a8", "w8a8-tensor", "w8a8-static")


def _model(kind: str) -> tuple[nn.Module, Tensor, list[Tensor]]:
    torch.manual_seed(0)
    model = Seq(LAYERS[kind](), head=False).eval()
    return model, torch.randn(4, 10, 8), [torch.randn(4, 10, 8) for _ in range(3)]


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("kind", LAYERS)
def test_presets_close_to_float_and_activations_run(kind: str, preset: str) -> None:
    model, x, calib = _model(kind)
    q = squeezer.quantize(model, preset, calib=calib, progress=False)
    assert isinstance(q.rnn, QuantRecurrent) and q.rnn.scheme.activation_mode in ("dynamic", "static")
    with torch.no_grad():
        ref, out = model(x), q(x)
        weight_only = squeezer.quantize(model, "w8", progress=False)(x)
    assert 0 < _rel(out, ref) < 0.03
    assert not torch.allclose(out, weight_only)  # the states are quantized, not only the weights


class _DynamicReference(FloatOps):
    """The dynamic scheme written out: fq_w matrices, x and h fake-quantized on grids of their own values."""

    def __init__(self, layer: QuantRecurrent, spec: QuantSpec) -> None:
        super().__init__(layer, layer.quantized_matrices())
        self.spec = spec

    def state(self, name: str, key: str, t: Tensor) -> Tensor:
        return fake_quantize(t, self.spec) if name in ("x", "h") else t


@pytest.mark.parametrize("preset", ["w8a8", "w8a8-tensor"])
@pytest.mark.parametrize("kind", ["lstm-2-bi", "gru-2"])
def test_dynamic_quantizes_input_and_hidden_state(kind: str, preset: str) -> None:
    model, x, _ = _model(kind)
    q = squeezer.quantize(model, preset, progress=False)
    assert q.rnn.quantized_states == ("x", "h") and q.rnn.state_qparams == {} and q.rnn.activations_calibrated
    with torch.no_grad():
        want = run_recurrent(q.rnn, _DynamicReference(q.rnn, q.rnn.act_spec), x)[0]
        torch.testing.assert_close(q(x), want, rtol=0, atol=1e-6)


def _observed_absmax(layer: nn.RNNBase, calib: list[Tensor]) -> dict[tuple[str, str], float]:
    """max |state| over the float run on ``calib``, per (key, state)."""
    seen: dict[tuple[str, str], float] = {}

    class Recording(FloatOps):
        def state(self, name: str, key: str, t: Tensor) -> Tensor:
            seen[key, name] = max(seen.get((key, name), 0.0), float(t.abs().max()))
            return t

    with torch.no_grad():
        for x in calib:
            run_recurrent(layer, Recording(layer), x)
    return seen


@pytest.mark.parametrize("kind", LAYERS)
def test_static_calibration_stores_a_grid_for_every_state(kind: str) -> None:
    model, _, calib = _model(kind)
    q = squeezer.quantize(model, "w8a8-static", calib=calib, progress=False)
    layer = q.rnn
    names = [s for s in STATE_NAMES[layer.rnn_mode] if s != "m" or layer.proj_size]
    assert layer.quantized_states == tuple(names)
    assert set(layer.state_qparams) == set(layer_keys(layer))
    assert all(set(states) == set(names) for states in layer.state_qparams.values())
    absmax = _observed_absmax(model.rnn, calib)
    for key, state in layer.state_grids():
        qp = layer.state_qparams[key][state]
        if state in INT16_STATES:  # symmetric int16: the whole observed range, the cell state's scale a power of 2
            assert layer.state_spec(state) == STATE16 and qp.zero_point is None
            top = qp.scale * STATE16.qmax
            if state == "c":
                assert float(torch.log2(qp.scale)) == round(float(torch.log2(qp.scale)))
                assert absmax[key, state] <= float(top) < 2 * absmax[key, state] + 1e-6
            else:
                torch.testing.assert_close(float(top), absmax[key, state], rtol=1e-5, atol=0)
        else:
            assert layer.state_spec(state) == layer.act_spec and layer.act_spec.bits == 8
    assert layer.activations_calibrated and layer.act_qparams is None


@pytest.mark.parametrize("kind", ["lstm-proj", "gru-2", "rnn-relu-bi"])
def test_every_static_grid_is_used(kind: str) -> None:
    model, x, calib = _model(kind)
    q = squeezer.quantize(model, "w8a8-static", calib=calib, progress=False)
    with torch.no_grad():
        base = q(x)
        for key, state in q.rnn.state_grids():
            qp = q.rnn.state_qparams[key][state]
            q.rnn.state_qparams[key][state] = QParams(qp.scale * 64, qp.zero_point)  # a coarser grid
            assert not torch.allclose(q(x), base), f"{key}.{state} does not change the output"
            q.rnn.state_qparams[key][state] = qp
        torch.testing.assert_close(q(x), base, rtol=0, atol=0)


def test_static_needs_calibration() -> None:
    model, x, calib = _model("gru-2")
    q = squeezer.quantize(model, "w8a8-static", calib=calib, progress=False)
    q.rnn.state_qparams = {}
    assert not q.rnn.activations_calibrated
    with pytest.raises(RuntimeError, match="calibration"):
        q(x)


def test_checkpoint_holds_each_state_grid_by_name_and_checks_them(tmp_path) -> None:
    model, x, calib = _model("lstm-2-bi")
    q = squeezer.quantize(model, "w8a8-static", calib=calib, progress=False)
    save(q, tmp_path / "ckpt")
    names = [f"{key}.{state}" for key, state in q.rnn.state_grids()]
    assert read_manifest(tmp_path / "ckpt")["layers"]["rnn"]["states"] == names
    stored = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    assert not any(k.startswith("rnn.act.") for k in stored)
    for key, state in q.rnn.state_grids():
        qp = q.rnn.state_qparams[key][state]
        assert torch.equal(stored[f"rnn.state.{key}.{state}.scale"], qp.scale)
        assert (f"rnn.state.{key}.{state}.zero_point" in stored) == (qp.zero_point is not None)
    with torch.no_grad():
        torch.testing.assert_close(load(tmp_path / "ckpt", lambda: _model("lstm-2-bi")[0])(x), q(x), rtol=0, atol=0)
    manifest = json.loads((tmp_path / "ckpt" / MANIFEST).read_text())  # one grid left out, the digest re-sealed
    manifest["layers"]["rnn"]["states"].remove("l1_reverse.c")
    manifest["sha256"] = digest(manifest, tmp_path / "ckpt" / TENSORS)
    (tmp_path / "ckpt" / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(squeezer.errors.ModelError, match=r"state grids.*missing \['l1_reverse.c'\]"):
        load(tmp_path / "ckpt", lambda: _model("lstm-2-bi")[0])
    manifest["layers"]["rnn"]["states"].append("l0.q")
    manifest["sha256"] = digest(manifest, tmp_path / "ckpt" / TENSORS)
    (tmp_path / "ckpt" / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(squeezer.errors.ModelError, match=r"states name must be <key>.<state>"):
        verify(tmp_path / "ckpt")


def test_verify_refuses_a_static_layer_without_its_state_grids(tmp_path) -> None:
    model, _, calib = _model("gru-2")
    save(squeezer.quantize(model, "w8a8-static", calib=calib, progress=False), tmp_path / "ckpt")
    tensors = load_file(str(tmp_path / "ckpt" / TENSORS))  # the grids and their names left out, the digest re-sealed
    save_file({k: v for k, v in tensors.items() if not k.startswith("rnn.state.")}, str(tmp_path / "ckpt" / TENSORS))
    manifest = json.loads((tmp_path / "ckpt" / MANIFEST).read_text())
    del manifest["layers"]["rnn"]["states"]
    manifest["sha256"] = digest(manifest, tmp_path / "ckpt" / TENSORS)
    (tmp_path / "ckpt" / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(squeezer.errors.ModelError, match=r"layer 'rnn'.states must be the state grids"):
        verify(tmp_path / "ckpt")


def test_static_packed_sequences_match_padded() -> None:
    model, x, calib = _model("lstm-proj")
    q = squeezer.quantize(model, "w8a8-static", calib=calib, progress=False)
    lengths = torch.tensor([10, 4, 7, 2])
    with torch.no_grad():
        padded = q(x)
        packed = q.rnn(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))[0]
        out, _ = pad_packed_sequence(packed, batch_first=True)
    for b, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(out[b, :n], padded[b, :n], rtol=1e-5, atol=1e-6)


def test_compare_mode_returns_float_and_records_error() -> None:
    model, x, calib = _model("gru-2")
    q = squeezer.quantize(model, "w8a8-static", calib=calib, progress=False)
    set_mode(q, "compare")
    with torch.no_grad():
        torch.testing.assert_close(q(x), model(x))
    assert q.rnn.output_error.count > 0 and 0 < q.rnn.output_error.stats().sqnr_db < 200
    set_mode(q, "simulate")


@pytest.mark.parametrize("preset", ["w8a8", "w8a8-static"])
def test_save_load_round_trip(preset: str, tmp_path) -> None:
    model, x, calib = _model("lstm-2-bi")
    q = squeezer.quantize(model, preset, calib=calib, progress=False)
    save(q, tmp_path / "ckpt")
    verify(tmp_path / "ckpt")
    restored = load(tmp_path / "ckpt", lambda: _model("lstm-2-bi")[0])
    assert isinstance(restored.rnn, QuantRecurrent) and restored.rnn.scheme == q.rnn.scheme
    if preset == "w8a8-static":
        assert restored.rnn.state_grids() == q.rnn.state_grids()
        for key, state in q.rnn.state_grids():
            assert torch.equal(restored.rnn.state_qparams[key][state].scale, q.rnn.state_qparams[key][state].scale)
    with torch.no_grad():
        assert torch.equal(restored(x), q(x))


class LastStep(nn.Module):
    """``head(lstm(x)[:, -1])``: one output per sequence."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn, self.head = nn.LSTM(8, 16, batch_first=True), nn.Linear(16, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.rnn(x)[0][:, -1])


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_qat_through_the_recurrence(mode: str) -> None:
    torch.manual_seed(0)
    model = LastStep()
    x = torch.randn(32, 10, 8)
    y = x[:, :, 0].cumsum(1)[:, -1:] / 3  # a sum over the sequence: needs the recurrence
    act = QuantSpec(bits=8, symmetric=False, granularity=PerTensor())
    config = QuantConfig(weight=QuantSpec(bits=3, granularity=PerChannel(0)), activation=act,
                         activation_mode=mode, name=f"w3a8-{mode}")
    q = squeezer.quantize(model, config, calib=[x[:8]] if mode == "static" else None, progress=False)
    matrices = q.rnn.matrices()
    for w in matrices.values():
        w.requires_grad_(True)
    params = [*matrices.values(), *(p for n, p in q.named_parameters() if "bias" in n or "head" in n)]
    optimizer = torch.optim.Adam(params, lr=1e-2)
    losses = []
    for step in range(40):
        optimizer.zero_grad()
        inp = x.clone().requires_grad_(step == 0)
        loss = nn.functional.mse_loss(q(inp), y)
        loss.backward()
        if step == 0:  # the STE passes gradients through the quantized states to the input and every matrix
            assert inp.grad is not None and inp.grad.abs().sum() > 0
            assert all(w.grad is not None and w.grad.abs().sum() > 0 for w in matrices.values())
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_model_size_counts_each_matrix_on_its_codes() -> None:
    """``compress``'s size column reads every quantized parameter's codes: a recurrent layer's are per matrix."""
    q = squeezer.quantize(_model("gru-2")[0], "w4g128", progress=False)
    params, _, size = model_size(q)
    floats = sum(p.numel() * p.element_size() for n, p in q.named_parameters() if not n.startswith("rnn.weight_"))
    assert params == sum(p.numel() for p in q.parameters()) and size == floats + q.rnn.packed_nbytes()

"""Data-aware weight algorithms (GPTQ, AWQ, clipping, ...) on each matrix of a recurrent layer."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import squeezer
from squeezer.algorithms.clip_search import block_output_error
from squeezer.algorithms.matrices import matrix_views, record_matrix_inputs
from squeezer.config import QuantConfig
from squeezer.modules import QuantRecurrent
from squeezer.quant.core import fake_quantize
from squeezer.quant.spec import PerChannel, PerGroup, QuantSpec

from .recurrent_task import held_out, trained

W4G16 = QuantConfig(weight=QuantSpec(bits=4, granularity=PerGroup(16)), name="w4g16")


def _output_error(model: nn.Module, q: nn.Module, x: Tensor) -> float:
    with torch.no_grad():
        ref = model(x)
        return float((q(x) - ref).pow(2).sum() / ref.pow(2).sum())


@pytest.mark.parametrize("rnn_class", [nn.LSTM, nn.GRU])
@pytest.mark.parametrize("config", ["w4g128", W4G16], ids=["w4g128", "w4g16"])
def test_gptq_beats_round_to_nearest_on_a_trained_sequence_model(rnn_class: type, config) -> None:
    model = trained(rnn_class)
    calib, (x, _) = held_out()
    cfg = squeezer.resolve.resolve_config(config)
    rtn = squeezer.quantize(model, cfg, progress=False)
    gptq = squeezer.quantize(model, QuantConfig(**{**cfg.to_dict(), "algorithm": "gptq"}), calib, progress=False)
    assert isinstance(gptq.rnn, QuantRecurrent)
    changed = {n for n, fq in rtn.rnn.quantized_matrices().items() if not torch.equal(gptq.rnn.quantized_matrices()[n], fq)}
    assert {n for n in rtn.rnn.matrix_names if n != "weight_ih_l0"} <= changed  # (4 inputs: RTN may be GPTQ's choice)
    assert _output_error(model, gptq, x) < _output_error(model, rtn, x)


def _reference_inputs(lstm: nn.LSTM, x: Tensor) -> dict[str, Tensor]:
    """What each matrix multiplies, from torch's own outputs: ``x`` for ``W_ih_l0``, layer 0's outputs for
    ``W_ih_l1``, ``[h_0, y_0 .. y_{T-2}]`` (forward) / ``[y_1 .. y_{T-1}, h_0]`` (reverse) for ``W_hh``."""
    y0 = nn.LSTM(lstm.input_size, lstm.hidden_size, bidirectional=True, batch_first=True)
    y0.load_state_dict({k: v for k, v in lstm.state_dict().items() if "_l0" in k})
    with torch.no_grad():
        out0 = y0(x)[0]
        out1 = lstm(x)[0]
    h = lstm.hidden_size
    zero = torch.zeros(x.shape[0], 1, h)

    def previous(out: Tensor) -> dict[str, Tensor]:
        fwd, rev = out[..., :h], out[..., h:]
        return {"": torch.cat([zero, fwd[:, :-1]], 1), "_reverse": torch.cat([rev[:, 1:], zero], 1)}

    rows = {"weight_ih_l0": x, "weight_ih_l0_reverse": x, "weight_ih_l1": out0, "weight_ih_l1_reverse": out0}
    for layer, out in (("l0", out0), ("l1", out1)):
        for suffix, states in previous(out).items():
            rows[f"weight_hh_{layer}{suffix}"] = states
    return {k: v.transpose(0, 1).reshape(-1, v.shape[-1]) for k, v in rows.items()}  # step-major rows


def test_each_matrix_sees_the_inputs_of_its_product() -> None:
    torch.manual_seed(0)
    lstm = nn.LSTM(6, 8, num_layers=2, bidirectional=True, batch_first=True).eval()
    q = squeezer.quantize(nn.Sequential(lstm), "w8")[0]
    x = torch.randn(3, 5, 6)
    stats: dict = {}
    record_matrix_inputs(q, (x,), stats, max_rows=10_000)
    expected = _reference_inputs(lstm, x)
    assert set(stats) == set(q.matrix_names) == set(expected)
    for name, rows in expected.items():
        assert stats[name].count == rows.shape[0] == 15, name
        torch.testing.assert_close(stats[name].xtx.float(), rows.T @ rows, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(stats[name].abs_max, rows.abs().amax(0), rtol=1e-5, atol=1e-6)


def test_projection_matrix_sees_the_cell_output() -> None:
    torch.manual_seed(0)
    lstm = nn.LSTM(6, 8, proj_size=4).eval()
    q = squeezer.quantize(nn.Sequential(lstm), "w8")[0]
    stats: dict = {}
    record_matrix_inputs(q, (torch.randn(5, 2, 6),), stats, max_rows=100)
    assert stats["weight_hr_l0"].xtx.shape == (8, 8) and stats["weight_hh_l0"].xtx.shape == (4, 4)
    assert stats["weight_hr_l0"].count == stats["weight_hh_l0"].count == 10
    assert float(stats["weight_hr_l0"].abs_max.max()) < 1  # m_t = o * tanh(c_t)


def _hessian_errors(q: QuantRecurrent, stats: dict) -> dict[str, float]:
    """Per matrix: ``sum_rg dW H_gg dW^T`` against the float matrices, the objective of clipping."""
    out = {}
    for name, view in matrix_views(q).items():
        w = view.weight.detach()
        out[name] = float(block_output_error(w, fake_quantize(w, view.weight_spec, view.ensured_weight_qparams()),
                                             stats[name].hessian(), view.weight_spec).sum())
    return out


@pytest.mark.parametrize("algorithm", ["awq", "clip"])
def test_clipping_algorithms_lower_each_matrix_objective(algorithm: str) -> None:
    model = trained(nn.LSTM)
    calib, _ = held_out()
    cfg = QuantConfig(weight=QuantSpec(bits=3, granularity=PerChannel(0)), ignore=("head",))
    rtn = squeezer.quantize(model, cfg, progress=False)
    stats: dict = {}
    for x in calib:
        record_matrix_inputs(rtn.rnn, (x,), stats, max_rows=1)
    q = squeezer.quantize(model, QuantConfig(**{**cfg.to_dict(), "algorithm": algorithm}), calib, progress=False)
    assert q.rnn.input_scale is None  # no input transform inside the recurrence
    for name, w in rtn.rnn.matrices().items():
        assert torch.equal(q.rnn.matrices()[name], w)  # the float weights stay, their grids change
    before, after = _hessian_errors(rtn.rnn, stats), _hessian_errors(q.rnn, stats)
    assert all(after[n] <= before[n] for n in before) and sum(after.values()) < sum(before.values())


@pytest.mark.parametrize("algorithm", ["hqq", "bias_correction", "gptq+clip"])
def test_other_algorithms_run_on_the_matrices(algorithm: str) -> None:
    model = trained(nn.GRU)
    calib, (x, _) = held_out()
    rtn = squeezer.quantize(model, "w4g128", progress=False)
    q = squeezer.quantize(model, f"w4g128-{algorithm}", calib, progress=False)
    changed = [n for n, fq in rtn.rnn.quantized_matrices().items() if not torch.equal(q.rnn.quantized_matrices()[n], fq)]
    biases_changed = [n for n, b in rtn.rnn.named_parameters() if n.startswith("bias")
                      and not torch.equal(getattr(q.rnn, n), b)]
    if algorithm == "bias_correction":  # round-to-nearest grids, each matrix's mean output shift moved into its bias
        assert not changed and len(biases_changed) == len(rtn.rnn.matrix_names)
    else:
        assert changed == list(rtn.rnn.matrix_names)
    assert _output_error(model, q, x) < 0.1

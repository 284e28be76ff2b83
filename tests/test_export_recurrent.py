"""Export of quantized LSTM / GRU / RNN layers: ONNX (torch's ops on W^, DynamicQuantizeLSTM with squeezer's int8
codes, static layers unrolled on MatMulInteger), TFLite and ExecuTorch (the step loop unrolled on squeezer's int8 codes and static state grids), each file
run by squeezer.runtime.load and compared with squeezer's simulated model."""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import squeezer
from squeezer.errors import ConfigError
from squeezer.exporters.onnx.recurrent import ONNX_GATES, lstm_tensors
from squeezer.quant.spec import PerGroup, QuantSpec

from .recurrent_task import Seq

CELLS = {
    "lstm-bi": lambda: nn.LSTM(8, 16, bidirectional=True, batch_first=True),
    "lstm-2": lambda: nn.LSTM(8, 16, num_layers=2, batch_first=True),
    "lstm-proj": lambda: nn.LSTM(8, 16, proj_size=6, batch_first=True),
    "gru": lambda: nn.GRU(8, 16, batch_first=True),
    "rnn-tanh": lambda: nn.RNN(8, 16, batch_first=True),
}


def _quantized(kind: str, preset: str) -> tuple[nn.Module, nn.Module, Tensor]:
    torch.manual_seed(0)
    model = Seq(CELLS[kind](), head=False).eval()
    calib = [torch.randn(4, 5, 8) for _ in range(3)]
    return model, squeezer.quantize(model, preset, calib=calib, progress=False), torch.randn(3, 5, 8)


def _run(q: nn.Module, x: Tensor, path) -> tuple[Tensor, Tensor]:
    """(the file's output through squeezer.runtime.load, squeezer's simulated output)."""
    out = torch.as_tensor(np.asarray(squeezer.runtime.load(path)(x)))
    with torch.no_grad():
        return out, q(x)


def _max_rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_lstm_tensors_hold_squeezer_codes_in_onnx_gate_order() -> None:
    _, q, _ = _quantized("lstm-bi", "w8a8")
    t, qts = lstm_tensors(q.rnn, 0), q.rnn.matrix_qtensors()
    forward = qts["weight_ih_l0"].codes.reshape(4, 16, 8)[ONNX_GATES["LSTM"]].reshape(64, 8)
    assert t.w.dtype == torch.uint8 and t.w.shape == (2, 8, 64)
    assert torch.equal(t.w[0].t().to(torch.int16) - 128, forward.to(torch.int16))
    assert torch.equal(t.w_scale[1], qts["weight_ih_l0_reverse"].qparams.scale.reshape(4, 16)[[0, 3, 1, 2]].reshape(-1))
    assert (t.zero == 128).all() and t.bias.shape == (2, 128)


@pytest.mark.parametrize("preset", ["w8a8", "w8a8-tensor"])
@pytest.mark.parametrize("kind", ["lstm-bi", "lstm-2"])
def test_onnx_dynamic_lstm_runs_dynamic_quantize_lstm(kind: str, preset: str, tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    import onnx

    model, q, x = _quantized(kind, preset)
    report = squeezer.export(q, x, tmp_path / "m.onnx")
    assert report.layers["rnn"].startswith("DynamicQuantizeLSTM")
    nodes = [n for n in onnx.load(str(tmp_path / "m.onnx")).graph.node if n.op_type == "DynamicQuantizeLSTM"]
    assert len(nodes) == q.rnn.num_layers and all(n.domain == "com.microsoft" for n in nodes)
    out, simulated = _run(q, x, tmp_path / "m.onnx")
    with torch.no_grad():
        reference = model(x)
    # ONNX Runtime quantizes x and h_(t-1) per tensor (uint8): squeezer's own grid for w8a8-tensor, not for w8a8
    assert _max_rel(out, simulated) < (0.01 if preset == "w8a8-tensor" else 0.03)
    assert _max_rel(out, reference) < 0.03


@pytest.mark.parametrize("kind", ["gru", "rnn-tanh"])
def test_onnx_dynamic_gru_rnn_are_ops_on_dequantized_weights(kind: str, tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    _, q, x = _quantized(kind, "w8a8")
    report = squeezer.export(q, x, tmp_path / "m.onnx")
    assert report.layers["rnn"].startswith(type(q.rnn).float_class.__name__)
    assert any("activations run in float" in w for w in report.warnings)
    import onnx

    ops = {n.op_type for n in onnx.load(str(tmp_path / "m.onnx")).graph.node}
    assert type(q.rnn).float_class.__name__.upper() in ops and "forward" not in dict(q.rnn.named_children())
    out, simulated = _run(q, x, tmp_path / "m.onnx")
    assert _max_rel(out, simulated) < 0.03  # torch's op on W^, float activations


def _op_counts(path) -> Counter:
    import onnx

    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


ASYM_W4_G6 = QuantSpec(bits=4, symmetric=False, signed=False, granularity=PerGroup(6))  # groups padded at K = 8, 16


def _weight_only(kind: str, weight: str | QuantSpec) -> tuple[nn.Module, nn.Module, Tensor]:
    if isinstance(weight, str):
        return _quantized(kind, weight)
    torch.manual_seed(0)
    model = Seq(CELLS[kind](), head=False).eval()
    config = dataclasses.replace(squeezer.config.PRESETS["w8"], weight=weight)
    return model, squeezer.quantize(model, config, calib=[torch.randn(4, 5, 8)], progress=False), torch.randn(3, 5, 8)


@pytest.mark.parametrize("kind, weight", [(k, w) for k in ("lstm-bi", "lstm-2", "gru", "rnn-tanh")
                                          for w in ("w8", ASYM_W4_G6)] + [("gru", "w8a8"), ("rnn-tanh", "w8a8")])
def test_onnx_weight_only_recurrent_carries_codes_through_dequantize_linear(kind: str, weight, tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    import onnx
    from onnx import numpy_helper

    model, q, x = _weight_only(kind, weight)
    report = squeezer.export(q, x, tmp_path / "m.onnx")
    op = type(model.rnn).__name__.upper()
    assert report.layers["rnn"].startswith(f"{type(model.rnn).__name__} (DequantizeLinear of")
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    ops = _op_counts(tmp_path / "m.onnx")
    matrices = len(q.rnn.matrix_names)
    assert ops[op] == q.rnn.num_layers and ops["DequantizeLinear"] == matrices
    # every matrix is one code initializer (int8 / uint8): no float tensor as large as a matrix is stored
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    codes = [a for a in inits.values() if a.dtype in (np.int8, np.uint8) and a.ndim == 2]
    assert len(codes) == matrices
    assert max(a.size for a in inits.values() if a.dtype == np.float32) < min(w.numel() for w in q.rnn.matrices().values())
    if isinstance(weight, QuantSpec):  # asymmetric 4-bit codes 0..15, one per byte, with a zero point per group
        assert min(int(a.min()) for a in codes) >= 0 and max(int(a.max()) for a in codes) <= 15
        groups = sum(qt.qparams.zero_point.numel() for qt in q.rnn.matrix_qtensors().values())
        assert sum(a.size for a in inits.values() if a.dtype in (np.int8, np.uint8) and a.ndim == 1) == groups
    torch.onnx.export(model, (x,), str(tmp_path / "fp32.onnx"), dynamo=False)
    # 8 bits: 1 byte a weight + 4 per row; 4 bits in groups of 6: 1 byte a weight + 5 per 6 weights (+ graph)
    ratio = 0.75 if isinstance(weight, QuantSpec) else 0.5
    assert (tmp_path / "m.onnx").stat().st_size < ratio * (tmp_path / "fp32.onnx").stat().st_size
    out, simulated = _run(q, x, tmp_path / "m.onnx")
    if weight == "w8a8":
        assert _max_rel(out, simulated) < 0.03  # float activations in the file, squeezer's dynamic grid in simulation
    else:
        assert (out - simulated).abs().max() < 1e-4  # squeezer's W^ = (q - Z) S, the same recurrence


def test_onnx_codebook_recurrent_weights_stay_float_with_a_warning(tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    _, q, x = _quantized("gru", "kmeans-w4")
    report = squeezer.export(q, x, tmp_path / "m.onnx")
    assert report.layers["rnn"].startswith("GRU (dequantized") and "DequantizeLinear" not in _op_counts(tmp_path / "m.onnx")
    assert any("no ONNX integer form" in w for w in report.warnings)
    out, simulated = _run(q, x, tmp_path / "m.onnx")
    assert (out - simulated).abs().max() < 1e-4


@pytest.mark.parametrize("kind", ["lstm-bi", "lstm-2", "lstm-proj", "gru", "rnn-tanh"])
def test_onnx_static_recurrent_unrolled_on_matmul_integer(kind: str, tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    _, q, x = _quantized(kind, "w8a8-static")
    report = squeezer.export(q, x, tmp_path / "m.onnx")
    assert report.layers["rnn"].startswith(f"{type(q.rnn).float_class.__name__} unrolled (MatMulInteger")
    assert any("takes that sequence length only" in w for w in report.warnings)
    ops = _op_counts(tmp_path / "m.onnx")
    directions = q.rnn.num_layers * (2 if q.rnn.bidirectional else 1)
    # per layer and direction: one input projection, per step one hidden (and with proj_size one output) projection;
    # no float product, no recurrent op
    assert ops["MatMulInteger"] == directions * (1 + x.shape[1] * (2 if getattr(q.rnn, "proj_size", 0) else 1))
    assert not {"MatMul", "Gemm", "LSTM", "GRU", "RNN"} & set(ops)
    out, simulated = _run(q, x, tmp_path / "m.onnx")
    assert _max_rel(out, simulated) < 1e-4  # squeezer's integer products and state grids


def test_onnx_refuses_static_recurrent_layers_without_int8_matrices(tmp_path) -> None:
    torch.manual_seed(0)
    static = squeezer.config.PRESETS["w8a8-static"]
    config = dataclasses.replace(static, weight=QuantSpec(bits=4, symmetric=True, signed=True, granularity=PerGroup(4)))
    q = squeezer.quantize(Seq(CELLS["gru"](), head=False).eval(), config, calib=[torch.randn(4, 5, 8)], progress=False)
    with pytest.raises(ConfigError, match="layer 'rnn': matrix weight_ih_l0 has format int4-group.*w8a8-static"):
        squeezer.export(q, torch.randn(3, 5, 8), tmp_path / "m.onnx")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["lstm-bi", "gru", "rnn-tanh"])
def test_tflite_weight_only_unrolled(kind: str, tmp_path) -> None:
    pytest.importorskip("litert_torch")
    model, q, x = _quantized(kind, "w8")
    report = squeezer.export(q, x, tmp_path / "m.tflite")
    assert "unrolled (int8 codes" in report.layers["rnn"]
    assert not any("quantized the float weight" in w for w in report.warnings)  # every matrix is squeezer's codes
    out, simulated = _run(q, x, tmp_path / "m.tflite")
    assert _max_rel(out, simulated) < 0.03  # TFLite's hybrid kernels also quantize the projection inputs per row


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["lstm-bi", "rnn-tanh"])
def test_tflite_static_unrolled_runs_integer_ops(kind: str, tmp_path) -> None:
    pytest.importorskip("litert_torch")
    from ai_edge_litert.interpreter import Interpreter

    _, q, x = _quantized(kind, "w8a8-static")
    squeezer.export(q, x, tmp_path / "m.tflite")
    details = Interpreter(model_path=str(tmp_path / "m.tflite")).get_tensor_details()
    int16 = {np.int16} if kind.startswith("lstm") else set()  # an RNN's gates stay float (they feed TANH directly)
    assert {np.int8} | int16 <= {d["dtype"] for d in details}
    out, simulated = _run(q, x, tmp_path / "m.tflite")
    assert _max_rel(out, simulated) < 0.01


class Scorer(nn.Module):
    """The fraud scorer's shape: a batch-first LSTM over 32 steps, a Linear head on the last step."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn, self.head = nn.LSTM(19, 64, batch_first=True), nn.Linear(64, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.rnn(x)[0][:, -1]).squeeze(-1)


@pytest.mark.slow
def test_tflite_static_lstm_with_a_head_exported_from_one_row_matches_squeezer(tmp_path) -> None:
    pytest.importorskip("litert_torch")
    torch.manual_seed(0)
    model = Scorer().eval()
    q = squeezer.quantize(model, "w8a8-static", calib=[torch.randn(16, 32, 19) for _ in range(4)], progress=False)
    # no calib: the head (no squeezer grid on its output) must not get an int8 grid from this one row's output
    report = squeezer.export(q, torch.randn(1, 32, 19), tmp_path / "m.tflite")
    assert "float op" in report.layers["head"] and any("no calib given" in w for w in report.warnings)
    out, simulated = _run(q, torch.randn(8, 32, 19), tmp_path / "m.tflite")
    assert _max_rel(out, simulated) < 1e-3


def test_onnx_static_lstm_with_a_head_exported_from_one_row_runs_integer_products(tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = Scorer().eval()
    q = squeezer.quantize(model, "w8a8-static", calib=[torch.randn(16, 32, 19) for _ in range(4)], progress=False)
    squeezer.export(q, torch.randn(1, 32, 19), tmp_path / "m.onnx")
    ops = _op_counts(tmp_path / "m.onnx")
    assert ops["MatMulInteger"] == 1 + 32 and "LSTM" not in ops  # W_ih over all steps, W_hh per step
    x = torch.randn(8, 32, 19)  # another batch size than the example's
    out, simulated = _run(q, x, tmp_path / "m.onnx")
    assert _max_rel(out, simulated) < 1e-4


def test_tflite_refuses_static_gru_and_dynamic_recurrent(tmp_path) -> None:
    pytest.importorskip("litert_torch")
    _, q, x = _quantized("gru", "w8a8-static")
    with pytest.raises(ConfigError, match="layer 'rnn': a QuantGRU with static"):
        squeezer.export(q, x, tmp_path / "m.tflite")
    _, q, x = _quantized("lstm-bi", "w8a8")
    with pytest.raises(ConfigError, match="layer 'rnn'.*dynamic activations"):
        squeezer.export(q, x, tmp_path / "m.tflite")


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["w8", "w8a8-static"])
@pytest.mark.parametrize("kind", ["lstm-bi", "gru", "rnn-tanh"])
def test_executorch_unrolled_matches_squeezer(kind: str, preset: str, tmp_path) -> None:
    pytest.importorskip("executorch")
    _, q, x = _quantized(kind, preset)
    report = squeezer.export(q, x, tmp_path / "m.pte")
    assert "unrolled (int8 codes" in report.layers["rnn"]
    out, simulated = _run(q, x, tmp_path / "m.pte")
    assert _max_rel(out, simulated) < 1e-4  # squeezer's arithmetic: dequantized codes, the same state grids

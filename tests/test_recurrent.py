"""Weight-only quantization of nn.LSTM / nn.GRU / nn.RNN: every matrix on its own grid, torch's own recurrence."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import squeezer
from squeezer.config import QuantConfig
from squeezer.errors import ConfigError
from squeezer.io.checkpoint import load, save, verify
from squeezer.modules import QuantGRU, QuantLinear, QuantLSTM, QuantRecurrent, QuantRNN, set_mode
from squeezer.modules.recurrent import activation_refusal
from squeezer.quant.core import packed_nbytes
from squeezer.quant.scheme import LayerScheme
from squeezer.quant.spec import PerGroup, QuantSpec

from .recurrent_task import Seq

W4G16 = QuantConfig(weight=QuantSpec(bits=4, granularity=PerGroup(16)), name="w4g16")
CONFIGS = {"w8": ("w8", 1e-2), "w4g16": (W4G16, 0.2)}  # relative output error bound of each
LAYERS = {
    "lstm-2-bi-batch_first": lambda: nn.LSTM(16, 32, num_layers=2, bidirectional=True, batch_first=True),
    "lstm-proj": lambda: nn.LSTM(16, 32, num_layers=2, proj_size=16),
    "gru-2-bi": lambda: nn.GRU(16, 32, num_layers=2, bidirectional=True, batch_first=True, dropout=0.1),
    "rnn-tanh": lambda: nn.RNN(16, 32, num_layers=2, batch_first=True),
    "rnn-relu-bi": lambda: nn.RNN(16, 32, nonlinearity="relu", bidirectional=True, batch_first=True),
}
QUANT_CLASS = {nn.LSTM: QuantLSTM, nn.GRU: QuantGRU, nn.RNN: QuantRNN}


def _model(kind: str, head: bool = True) -> tuple[nn.Module, Tensor]:
    torch.manual_seed(0)
    model = Seq(LAYERS[kind](), head).eval()
    x = torch.randn(3, 7, 16) if model.rnn.batch_first else torch.randn(7, 3, 16)
    return model, x


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("kind", LAYERS)
def test_output_close_to_float_and_not_float(kind: str, config: str) -> None:
    model, x = _model(kind)
    preset, bound = CONFIGS[config]
    q = squeezer.quantize(model, preset)
    assert type(q.rnn) is QUANT_CLASS[type(model.rnn)] and isinstance(q.head, QuantLinear)
    with torch.no_grad():
        ref, out = model(x), q(x)
        error = _rel(out, ref)
        assert 0 < error < bound
        set_mode(q, "float")
        assert torch.equal(q(x), ref)  # float mode runs the float weights through the same torch options


@pytest.mark.parametrize("config", CONFIGS)
def test_every_matrix_quantized_on_its_grid(config: str) -> None:
    torch.manual_seed(0)
    lstm = nn.LSTM(32, 32, num_layers=2, proj_size=16, bidirectional=True).eval()
    q = squeezer.quantize(Seq(lstm), CONFIGS[config][0]).rnn
    names = {n for n, _ in lstm.named_parameters() if n.startswith("weight")}
    assert set(q.matrix_names) == names and len(names) == 12 and any(n.startswith("weight_hr") for n in names)
    quantized, qtensors = q.quantized_matrices(), q.matrix_qtensors()
    for name, w in lstm.named_parameters():
        if name not in names:
            assert torch.equal(getattr(q, name), w)  # biases stay float
            continue
        fq, codes = quantized[name], qtensors[name].codes.long()
        assert not torch.equal(fq, w) and torch.equal(qtensors[name].dequantize(), fq)
        if config == "w8":  # one symmetric int8 grid per (gate) row: its largest weight on code +-127
            assert (codes.abs().amax(dim=1) == 127).all()
            assert qtensors[name].qparams.scale.shape == (w.shape[0],)
        else:  # one symmetric int4 grid per group of 16 inputs: its largest weight on code +-7
            groups = codes.reshape(w.shape[0], -1, 16)
            assert (groups.abs().amax(dim=2) == 7).all()
            assert qtensors[name].qparams.scale.shape == (w.shape[0], w.shape[1] // 16)
            assert max(group.unique().numel() for group in fq.reshape(-1, 16)) <= 15


def test_packed_sequence_and_initial_state() -> None:
    torch.manual_seed(1)
    lstm = nn.LSTM(16, 32, num_layers=2, bidirectional=True, batch_first=True).eval()
    q = squeezer.quantize(nn.Sequential(lstm), "w8")[0]
    x, lengths = torch.randn(3, 6, 16), torch.tensor([6, 4, 2])
    packed = pack_padded_sequence(x, lengths, batch_first=True)
    state = (torch.randn(4, 3, 32), torch.randn(4, 3, 32))
    with torch.no_grad():
        (ref, (h, c)), (out, (qh, qc)) = lstm(packed, state), q(packed, state)
    assert isinstance(out, PackedSequence) and torch.equal(out.batch_sizes, ref.batch_sizes)
    assert 0 < _rel(out.data, ref.data) < 1e-2 and 0 < _rel(qh, h) < 1e-2 and 0 < _rel(qc, c) < 1e-2


def test_report_counts_every_matrix() -> None:
    model, _ = _model("gru-2-bi")
    q = squeezer.quantize(model, W4G16)
    layer = next(l for l in squeezer.report_of(q).layers if l.name == "rnn")
    matrices = [w for n, w in model.rnn.named_parameters() if n.startswith("weight")]
    params = sum(w.numel() for w in matrices)
    assert layer.kind == "QuantGRU" and layer.params == params and layer.bytes_before == 4 * params
    qps = q.rnn.ensured_matrix_qparams().values()
    assert layer.bytes_after == sum(packed_nbytes(q.rnn.weight_spec, w.numel(), qp) for w, qp in zip(matrices, qps))
    assert 0 < layer.bytes_after < params and layer.weight_error.sqnr_db > 15


def test_algorithms_round_every_recurrent_matrix() -> None:  # tests/test_recurrent_algorithms.py: the figures
    model, x = _model("lstm-2-bi-batch_first")
    rtn, gptq = squeezer.quantize(model, "w8"), squeezer.quantize(model, "w8-gptq", calib=[x], progress=False)
    for name, fq in rtn.rnn.quantized_matrices().items():
        assert not torch.equal(gptq.rnn.quantized_matrices()[name], fq)
    assert not torch.equal(gptq.head.quantized_weight(), rtn.head.quantized_weight())


def test_activations_they_cannot_run_leave_recurrent_layers_float() -> None:
    model, x = _model("lstm-2-bi-batch_first")
    grouped = QuantConfig(weight=QuantSpec(bits=8), activation=QuantSpec(bits=8, granularity=PerGroup(8)),
                          activation_mode="dynamic", name="w8a8-group")
    q = squeezer.quantize(model, grouped)
    assert type(q.rnn) is nn.LSTM and isinstance(q.head, QuantLinear) and q.head.scheme.activation_mode == "dynamic"
    report = squeezer.report_of(q)
    reason = activation_refusal(grouped.for_layer("rnn", "lstm"))
    assert reason is not None and "group(8)" in reason
    assert [(s.name, s.reason) for s in report.skipped] == [("rnn", reason)]
    assert [l.name for l in report.layers] == ["head"]
    with pytest.raises(ConfigError, match="per-tensor"):
        QuantLSTM.from_float(model.rnn, grouped.for_layer("rnn", "lstm"))


def test_subclass_with_its_own_forward_stays_float() -> None:
    class Reversed(nn.GRU):
        def forward(self, x: Tensor, hx: Tensor | None = None):  # type: ignore[override]
            return super().forward(x.flip(1), hx)

    q = squeezer.quantize(Seq(Reversed(16, 8, batch_first=True)), "w8")
    assert type(q.rnn) is Reversed and squeezer.report_of(q).skipped[0].reason == "type not quantizable"


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("kind", ["lstm-proj", "gru-2-bi", "rnn-relu-bi"])
def test_save_load_round_trip(kind: str, config: str, tmp_path) -> None:
    model, x = _model(kind)
    q = squeezer.quantize(model, CONFIGS[config][0])
    save(q, tmp_path / "ckpt")
    assert verify(tmp_path / "ckpt")["layers"]["rnn"]["matrices"] == \
        {n: list(w.shape) for n, w in q.rnn.matrices().items()}
    restored = load(tmp_path / "ckpt", lambda: _model(kind)[0].apply(_scramble))
    assert type(restored.rnn) is type(q.rnn)
    for name, fq in q.rnn.quantized_matrices().items():
        assert torch.equal(restored.rnn.quantized_matrices()[name], fq)
    with torch.no_grad():
        assert torch.equal(restored(x), q(x))


def _scramble(module: nn.Module) -> None:
    """A skeleton whose weights differ from the saved ones (load must overwrite every one)."""
    with torch.no_grad():
        for p in module.parameters(recurse=False):
            p.normal_()


@pytest.mark.parametrize("kind", ["lstm-2-bi-batch_first", "gru-2-bi", "rnn-tanh", "rnn-relu-bi"])
def test_onnx_runs_dequantized_recurrent_layer(kind: str, tmp_path) -> None:
    ort = pytest.importorskip("onnxruntime")
    from squeezer.exporters.onnx.graph import export_onnx

    model, x = _model(kind, head=False)
    q = squeezer.quantize(model, W4G16)
    report = export_onnx(q, x, tmp_path / "m.onnx")
    assert report.layers["rnn"].startswith(type(model.rnn).__name__)
    (out,) = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"input": x.numpy()})
    with torch.no_grad():
        simulated = q(x)
    assert (torch.from_numpy(out) - simulated).abs().max() < 1e-4
    assert (torch.from_numpy(out) - model(x)).abs().max() > 1e-3  # the quantized weights, not the float ones


def test_onnx_refuses_lstm_projections(tmp_path) -> None:
    from squeezer.exporters.onnx.graph import export_onnx

    model, x = _model("lstm-proj")
    with pytest.raises(ConfigError, match="proj_size"):
        export_onnx(squeezer.quantize(model, "w8"), x, tmp_path / "m.onnx")


def test_weight_only_scheme_directly() -> None:
    layer = QuantRNN.from_float(nn.RNN(16, 8), LayerScheme(QuantSpec(bits=8)))
    assert isinstance(layer, QuantRecurrent) and layer.mode == "simulate" and layer.rnn_mode == "RNN_TANH"
    out, h = layer(torch.randn(5, 2, 16))
    assert out.shape == (5, 2, 8) and h.shape == (1, 2, 8)

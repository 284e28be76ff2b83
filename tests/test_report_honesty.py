"""The quantize report tells the truth about a "zoo" of layer types: a layer it calls quantized is a layer whose
quantization the model's output depends on (simulated and packed), every layer left in float is listed with its
reason and parameter count, and the whole model's bytes before are the float model's parameter bytes."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D
from typer.testing import CliRunner

import squeezer
from squeezer.cli import app
from squeezer.quant.core import QParams


class Zoo(nn.Module):
    """Every supported layer type (Linear, Conv1d, Conv2d, Embedding, transformers' Conv1D), weighted layers of
    no supported type (LSTMCell, LayerNorm, Bilinear) and a parameter of the model itself; the LSTM cell holds most of
    the parameters. ``ids: (B, T)`` -> ``(B, T, 8)``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(50, 16)
        self.conv1d = nn.Conv1d(16, 16, 3, padding=1)
        self.linear = nn.Linear(16, 16)
        self.conv2d = nn.Conv2d(1, 4, 3, padding=1)
        self.cell = nn.LSTMCell(16, 64)
        self.norm = nn.LayerNorm(64)
        self.gpt_conv = Conv1D(16, 64)
        nn.init.normal_(self.gpt_conv.weight, std=0.1)
        self.bilinear = nn.Bilinear(64, 16, 8)
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, 8))

    def forward(self, ids: Tensor) -> Tensor:
        h = self.embed(ids)
        h = self.linear(torch.relu(self.conv1d(h.transpose(1, 2)).transpose(1, 2)))
        h = self.conv2d(h.unsqueeze(1)).mean(1)
        hx = cx = h.new_zeros(h.shape[0], 64)
        steps = []
        for t in range(h.shape[1]):
            hx, cx = self.cell(h[:, t], (hx, cx))
            steps.append(hx)
        out = self.norm(torch.stack(steps, 1))
        return self.bilinear(out, self.gpt_conv(out)) * self.gain


QUANTIZED = {"embed", "conv1d", "linear", "conv2d", "gpt_conv"}
FLOAT = {"": ("Zoo", 8), "cell": ("LSTMCell", 4 * 64 * (16 + 64) + 2 * 4 * 64), "norm": ("LayerNorm", 128),
         "bilinear": ("Bilinear", 64 * 16 * 8 + 8)}


@pytest.fixture(scope="module")
def zoo_run() -> tuple[nn.Module, nn.Module, Tensor]:
    model = Zoo().eval()
    ids = torch.randint(0, 50, (4, 12))
    return model, squeezer.quantize(model, "w8", calib=[ids], progress=False), ids


def _perturbed(q: nn.Module, name: str) -> nn.Module:
    """A copy of ``q`` whose layer ``name`` has its weight scales multiplied by 1.37 (another integer grid)."""
    q = copy.deepcopy(q)
    layer = q.get_submodule(name)
    qp = layer.ensured_weight_qparams()
    layer.calibrate_weight(QParams(qp.scale * 1.37, qp.zero_point, qp.levels))
    return q


def test_every_reported_layer_runs_in_simulation_and_packed(zoo_run) -> None:
    model, q, ids = zoo_run
    report = squeezer.report_of(q)
    assert {layer.name for layer in report.layers} == QUANTIZED
    packed = squeezer.pack(q)
    with torch.no_grad():
        simulated, packed_out = q(ids), packed(ids)
        assert ((simulated - model(ids)).norm() / model(ids).norm()) < 0.05
        for name in QUANTIZED:
            other = _perturbed(q, name)
            assert not torch.allclose(other(ids), simulated, rtol=0, atol=1e-6), name
            assert not torch.allclose(squeezer.pack(other)(ids), packed_out, rtol=0, atol=1e-6), name


def test_every_float_layer_is_listed_with_its_reason_and_share(zoo_run) -> None:
    model, q, _ = zoo_run
    report = squeezer.report_of(q)
    assert {s.name: (s.kind, s.params) for s in report.skipped} == FLOAT
    assert all(s.reason for s in report.skipped)
    params = sum(p.numel() for p in model.parameters())
    assert report.model_params == params
    assert report.model_bytes_before == sum(p.numel() * p.element_size() for p in model.parameters())
    biases = 16 + 16 + 4 + 16  # conv1d, linear, conv2d, gpt_conv
    assert report.float_params == sum(n for _, n in FLOAT.values()) + biases
    data = report.to_dict()
    assert data["summary"]["float_param_share"] == pytest.approx(report.float_params / params)
    shares = {s["name"]: s["param_share"] for s in data["skipped"]}
    assert shares == {name: pytest.approx(n / params) for name, (_, n) in FLOAT.items()}
    rows = {str(row).strip() for row in report.table().columns[0]._cells}
    assert {"(model)", "cell", "norm", "bilinear"} <= rows
    params_column = " ".join(report.table().columns[2]._cells)
    assert f"{FLOAT['cell'][1]:,} ({FLOAT['cell'][1] / params:.1%})" in params_column


def test_cli_warns_when_most_parameters_stay_float(tmp_path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["quantize", "--model", "tests.test_report_honesty:Zoo", "--out", str(tmp_path / "z")])
    assert result.exit_code == 0, result.output
    text = re.sub(r"\s+", " ", result.output)
    assert re.search(r"warning: 9\d\.\d% of the model's [\d,]+ parameters stay float; largest float layers: "
                     r"cell \(LSTMCell, \d+\.\d%: type not quantizable\)", text), text
    mostly_quantized = runner.invoke(app, ["quantize", "--model", "tests.conftest:MLP", "--out", str(tmp_path / "m")])
    assert mostly_quantized.exit_code == 0 and "stay float" not in mostly_quantized.output


class SelfAttention(nn.MultiheadAttention):
    """A subclass with its own forward, which calls torch's fused one."""

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        return super().forward(x, x, x, need_weights=False)[0]


def test_fused_attention_weights_are_not_claimed_quantized() -> None:
    """A transformer layer's projections are quantized (squeezer rewrites its attention over Linear layers); an
    ``nn.MultiheadAttention`` subclass with its own forward reads ``out_proj.weight`` inside torch's fused
    function: that one stays float, listed with the reason; the quantized model packs and runs."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, batch_first=True, dropout=0.0),
                          SelfAttention(32, 4, batch_first=True), nn.Linear(32, 8)).eval()
    x = torch.randn(2, 5, 32)
    q = squeezer.quantize(model, "w8", calib=[x], progress=False)
    report = squeezer.report_of(q)
    assert [layer.name for layer in report.layers] == ["0.self_attn.in_proj", "0.self_attn.out_proj", "0.linear1",
                                                       "0.linear2", "2"]
    reasons = {s.name: s.reason for s in report.skipped}
    assert "inside SelfAttention" in reasons["1.out_proj"]
    packed = squeezer.pack(q)
    with torch.no_grad():
        assert (packed(x) - model(x)).norm() / model(x).norm() < 0.02

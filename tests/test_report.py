"""`squeezer.report`: the JSON policy for non-finite numbers and the quantize report's header,
headline, per-layer figures and float-layer shares."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import squeezer
from squeezer.report.data import quant_report_data
from squeezer.report.html import render_html
from squeezer.report.json import dumps, loads
from squeezer.report.quant import QuantReport


def test_non_finite_numbers_are_strings_in_strict_json_and_come_back() -> None:
    data = {"sqnr": math.inf, "low": -math.inf, "err": math.nan, "rows": [1.5, (math.inf, 2)], "name": "fc"}
    text = dumps(data)
    assert json.loads(text) == {"sqnr": "inf", "low": "-inf", "err": "nan", "rows": [1.5, ["inf", 2]], "name": "fc"}
    assert "Infinity" not in text and "NaN" not in text
    back = loads(text)
    assert back["sqnr"] == math.inf and back["low"] == -math.inf and math.isnan(back["err"])
    assert back["rows"] == [1.5, [math.inf, 2]] and back["name"] == "fc"


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 128)
        self.norm = nn.LayerNorm(128)
        self.head = nn.Linear(128, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.norm(self.fc1(x))))


@pytest.fixture(scope="module")
def report() -> QuantReport:
    torch.manual_seed(0)
    q = squeezer.quantize(Net(), "w4g128", calib=[torch.randn(16, 64)], progress=False)
    return squeezer.report_of(q, QuantReport)


def test_quantize_report_header_and_headline(report: QuantReport) -> None:
    data = quant_report_data(report)
    about = data["about"]
    assert about["model"] == "Net" and about["preset"] == "w4g128"
    assert about["squeezer"] == squeezer.__version__ and about["torch"] == torch.__version__
    assert len(about["date"]) == len("2024-01-01T00:00:00")
    params = sum(p.numel() for p in Net().parameters())
    assert report.model_params == params and report.model_bytes_before == 4 * params
    assert data["headline"].startswith(f"model {4 * params:,} -> {report.model_bytes_after:,} bytes (×")
    assert f"×{report.model_compression:.2f}" in data["headline"]
    html = render_html(data)
    assert "<td>model</td><td>Net</td>" in html and "<td>preset</td><td>w4g128</td>" in html


def test_layer_rows_carry_information_and_float_layers_their_share(report: QuantReport) -> None:
    rows = {row["name"]: row for row in quant_report_data(report)["layers"]}
    fc1 = rows["fc1"]
    assert "weight_cosine" not in fc1 and math.isfinite(fc1["weight_sqnr_db"]) and fc1["weight_sqnr_db"] > 10
    assert fc1["smaller"] == f"×{fc1['bytes_before'] / fc1['bytes_after']:.2f}"
    assert 4 < fc1["bits_per_weight"] < 5
    norm = rows["norm"]
    params = sum(p.numel() for p in Net().parameters())
    assert norm["format"] == "float" and norm["params"] == 256
    assert norm["share_of_model_params"] == f"{100 * 256 / params:.3g}%"
    assert report.to_dict()["skipped"][0]["param_share"] == pytest.approx(256 / params)


def test_task_metric_before_and_after_in_the_summary(report: QuantReport) -> None:
    data = quant_report_data(report, {"accuracy": {"before": 0.9, "after": 0.875}})
    assert data["summary"]["before"]["task"] == {"accuracy": 0.9}
    assert data["summary"]["after"]["task"] == {"accuracy": 0.875}
    assert "<td>task.accuracy</td>" in render_html(data)


def test_folded_norms_and_bias_correction_are_reported() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.BatchNorm2d(4)).eval()
    calib = [torch.randn(4, 3, 10, 10)]
    q = squeezer.quantize(net, "w8", calib=calib, progress=False, correct_bias=True)
    report = squeezer.report_of(q, QuantReport)
    assert report.folded_norms == {"1": "0", "4": "3"} and report.bias_corrected
    assert report.to_dict()["folded_norms"] == {"1": "0", "4": "3"} and report.to_dict()["bias_corrected"] is True
    line = "batch norms folded: 1 into 0, 4 into 3; convolution biases corrected for their mean output shift"
    assert report.float_changes() == line and line in report.table().caption
    assert quant_report_data(report)["about"]["before quantizing"] == line
    plain = squeezer.report_of(squeezer.quantize(net, "w8", progress=False, fold_bn=False), QuantReport)
    assert plain.float_changes() is None and plain.to_dict()["folded_norms"] == {} and not plain.bias_corrected
    assert "before quantizing" not in quant_report_data(plain)["about"]

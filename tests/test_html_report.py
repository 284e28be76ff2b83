"""`squeezer.report.html`: a self-contained HTML page with escaped tables and embedded PNG plots."""

from __future__ import annotations

import base64
import math
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from matplotlib.image import imread
from torch import Tensor, nn

import squeezer
from squeezer.errors import DataError
from squeezer.report.data import quant_report_data
from squeezer.report.html import render_html, write_html
from squeezer.robustness import robustness

IMG = re.compile(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)" alt="([^"]+)">')
PLOTS = 4  # sensitivity bars, Pareto scatter, robustness noise lines, robustness attack lines
HEADINGS = ("Summary", "Layers", "Sensitivity", "Pareto front", "Robustness", "Configuration", "Extra")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync")
COUNT_IMAGES = ("<script>window.addEventListener('load', () => { document.body.dataset.imagesLoaded = "
                "[...document.images].filter(i => i.complete && i.naturalWidth > 0).length; });</script>")


def _robustness_dict() -> dict[str, Any]:
    models = {"fp32": [0.9, 0.88, 0.8], "w4g128": [0.89, 0.85, 0.7]}
    return {
        "metric_name": "accuracy", "n_samples": 100, "clean": {"fp32": 0.9, "w4g128": 0.89, "packed": 0.89},
        "noise": {"sigmas": [0.0, 0.1, 0.5], "models": {**models, "packed": [0.89, 0.85, 0.71]}},
        "feature_shift": {"shift_std": 1.0, "features": ["age", "income<5k"],
                          "models": {"fp32": [0.85, 0.6], "w4g128": [0.8, 0.5], "packed": [0.8, 0.5]},
                          "largest_drop": [{"feature": "income<5k", "drop": {"fp32": 0.3, "w4g128": 0.39, "packed": 0.39}},
                                           {"feature": "age", "drop": {"fp32": 0.05, "w4g128": 0.09, "packed": 0.09}}]},
        "adversarial": {"eps": [0.0, 0.03, 0.1], "pgd_steps": 5, "source": "fp32", "fgsm": models, "pgd": models,
                        "transfer": {**models, "packed": [0.89, 0.84, 0.7]}},
        "skipped": {"packed": "packed layer 'fc' runs integer kernels without a gradient"},
    }


def _data() -> dict[str, Any]:
    """Every section; one layer is named like a script tag and one value is infinite."""
    trials = [{"x": 10.0 ** (3 + i / 3), "y": 0.5 + 0.04 * i - 0.03 * (i % 3), "front": i % 3 == 0, "chosen": i == 6,
               "params": {"bits": 2 + i % 3 * 2, "group": 128}} for i in range(10)]
    return {
        "title": "credit <MLP> & friends",
        "summary": {"before": {"bytes": 4000, "latency_ms": 2.0, "metrics": {"auc": 0.8}},
                    "after": {"bytes": 1000, "latency_ms": 1.0, "metrics": {"auc": 0.79}}},
        "layers": [{"name": "fc1", "format": "w4g128", "params": 123456, "bytes": 61728, "weight_sqnr_db": 19.53},
                   {"name": "<script>", "format": "w8", "params": 10, "weight_sqnr_db": math.inf,
                    "output_error": math.nan}],
        "sensitivity": {"formats": ["w8", "w4g128"],
                        "layers": {"fc1": {"w8": 1e-4, "w4g128": 0.02}, "fc2": {"w8": 3e-4, "w4g128": 0.1}}},
        "pareto": {"x": "bytes", "y": "accuracy", "trials": trials},
        "robustness": _robustness_dict(),
        "config": {"name": "w4g128", "bits": 4},
        "extra": {"seed": 0, "loss": -math.inf},
    }


@pytest.fixture(scope="module")
def page() -> str:
    return render_html(_data())


def _images(text: str) -> list[tuple[bytes, str]]:
    return [(base64.b64decode(src), alt) for src, alt in IMG.findall(text)]


def test_every_section_with_its_plots_and_no_network(page: str) -> None:
    text = page
    for heading in HEADINGS:
        assert f"<h2>{heading}</h2>" in text
    images = _images(text)
    assert len(images) == text.count("<img") == text.count("<figcaption>") == PLOTS
    assert all(png.startswith(b"\x89PNG\r\n\x1a\n") and len(alt) > 20 for png, alt in images)
    assert "http://" not in text and "https://" not in text and "<link" not in text and "<script" not in text


def test_sections_only_when_present() -> None:
    text = render_html({"layers": [{"name": "fc", "params": 3}]})
    assert "<h2>Layers</h2>" in text and text.count("<h2>") == 1 and "<img" not in text
    assert "<title>squeezer report</title>" in text


def test_text_is_escaped_and_numbers_formatted(page: str) -> None:
    text = page
    assert "<script>" not in text and "<td>&lt;script&gt;</td>" in text
    assert "<title>credit &lt;MLP&gt; &amp; friends</title>" in text
    assert "income&lt;5k" in text
    assert '<td class="num">123,456</td>' in text and '<td class="num">19.53</td>' in text
    assert '<td class="num">inf</td>' in text and '<td class="num">nan</td>' in text and "-inf" in text
    assert "<th>weight sqnr db</th>" in text and "<th>output error</th>" in text
    assert "<td>metrics.auc</td>" in text and '<td class="num">0.25</td>' in text  # after / before bytes


def test_pareto_front_table_and_robustness_details() -> None:
    text = render_html({"pareto": _data()["pareto"], "robustness": _robustness_dict()})
    front = text.split("<h3>Trials on the front</h3>")[1].split("</table>")[0]
    assert front.count("<tr>") == 1 + 4 and front.count("<td>yes</td>") == 1  # header + trials 0, 3, 6, 9
    assert "Most harmful feature shifts" in text and "packed layer &#x27;fc&#x27;" in text
    assert "<th>PGD eps=0.1</th>" in text
    assert len(_images(text)) == 3


def test_quant_report_data_from_a_quantized_model() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4), nn.LayerNorm(4))
    q = squeezer.quantize(model, "w4g128", calib=[torch.randn(8, 16)])
    data = quant_report_data(squeezer.report_of(q))
    assert [row["name"] for row in data["layers"]] == ["0", "2", "3"] and data["layers"][2]["format"] == "float"
    assert data["summary"]["after"]["quantized weight bytes"] < data["summary"]["before"]["quantized weight bytes"]
    text = render_html(data)
    assert "<th>weight sqnr db</th>" in text and "<th>output sqnr db</th>" in text and "<th>skipped</th>" in text
    assert "<h2>Configuration</h2>" in text and "<img" not in text


def test_real_robustness_results_render() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 2)).eval()
    x = torch.randn(32, 4)
    y = model(x).argmax(-1)

    def accuracy(outputs: Tensor, targets: Tensor) -> float:
        return float((outputs.argmax(-1) == targets).float().mean())

    packed = squeezer.pack(squeezer.quantize(model, "w8"), inplace=True)
    rob = robustness({"fp32": model, "w8 packed": packed}, [(x, y)], accuracy, noise_sigmas=(0.0, 0.5), eps=(0.0, 0.5))
    text = render_html({"robustness": rob})
    assert len(_images(text)) == 2 and "Skipped by white-box attacks" in text and "x0" in text


def test_write_is_atomic_and_errors_are_clear(tmp_path: Path) -> None:
    target = tmp_path / "out" / "report.html"
    assert write_html({"title": "one"}, target) == target
    assert write_html({"title": "two"}, str(target)) == target
    assert "<h1>two</h1>" in target.read_text() and os.listdir(target.parent) == ["report.html"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="cannot write the HTML report"):
        write_html({"title": "x"}, tmp_path / "file" / "report.html")
    with pytest.raises(DataError, match="'layers' must be a list"):
        render_html({"layers": {"fc": 1}})


# -- headless Chromium: the plots are really visible ------------------------------------------

def _chromium() -> str:
    exe = shutil.which("chromium")
    if exe is None:
        if os.environ.get("SQUEEZER_REQUIRE_CHROMIUM") == "1":
            pytest.fail("chromium is not on PATH but SQUEEZER_REQUIRE_CHROMIUM=1")
        pytest.skip("chromium is not on PATH (apt-get install chromium); SQUEEZER_REQUIRE_CHROMIUM=1 fails instead")
    return exe


def _run_chromium(tmp_path: Path, *args: str) -> str:
    proc = subprocess.run([_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
                           "--virtual-time-budget=5000", *args], check=False, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_chromium_screenshot_shows_the_plots(tmp_path: Path) -> None:
    path = write_html(_data(), tmp_path / "report.html")
    shot = tmp_path / "shot.png"
    _run_chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,3000", path.as_uri())
    rgb = imread(shot)[..., :3]
    assert rgb.shape[:2] == (3000, 1200)
    colored = (rgb.max(-1) - rgb.min(-1)) > 0.25  # the page's text and tables are gray: colour is plots only
    assert colored.sum() > 20_000, colored.sum()
    for color in ((31, 119, 180), (255, 127, 14)):  # matplotlib's C0 / C1: bars, lines
        assert (np.abs(rgb - np.array(color) / 255).max(-1) < 0.08).sum() > 1_000, color


def test_chromium_decodes_every_image(tmp_path: Path, page: str) -> None:
    path = tmp_path / "report.html"
    path.write_text(page.replace("</body>", COUNT_IMAGES + "\n</body>"))
    dom = _run_chromium(tmp_path, "--dump-dom", path.as_uri())
    loaded = re.search(r'<body data-images-loaded="(\d+)"', dom)
    assert loaded is not None, dom[:500]
    assert int(loaded.group(1)) == PLOTS

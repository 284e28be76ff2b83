"""``squeezer search`` and ``squeezer report``: the chosen checkpoint, the report files, bad flags."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

import squeezer
from squeezer.cli import app

runner = CliRunner()
MODEL = "tests.test_cli:credit_model"


def broken_eval(model):
    raise KeyError("no labels")


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    from squeezer.examples.credit import make_credit_task

    path = tmp_path_factory.mktemp("calib") / "x.npy"
    np.save(path, make_credit_task().x_train[:128].numpy())
    return path


def search(out, calib_file, *extra):
    return runner.invoke(app, ["search", "--model", MODEL, "--eval", "tests.test_cli:credit_auc",
                               "--calib", str(calib_file), "--out", str(out), *extra])


def test_search_writes_a_loadable_checkpoint_within_the_tolerance(tmp_path, calib_file, monkeypatch):
    monkeypatch.setenv("SQUEEZER_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "out"
    result = search(out, calib_file, "--max-drop", "0.01", "--budget-bits", "4", "--trials", "6", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    before, after = data["summary"]["before"], data["summary"]["after"]
    assert data["config"]["met"] and before["metric"] - after["metric"] <= 0.01
    assert after["bytes"] < before["bytes"] / 4
    assert 1 <= data["config"]["trials"] <= 6 and len(data["pareto"]["trials"]) == data["config"]["trials"]
    assert any(t["chosen"] for t in data["pareto"]["trials"])
    assert set(data["sensitivity"]["layers"]) == {"net.0", "net.3", "net.6"}
    from tests.test_cli import credit_auc, credit_model

    loaded = squeezer.load(out / "checkpoint", model=credit_model)
    assert credit_auc(loaded) == pytest.approx(after["metric"], abs=1e-9)
    assert after["bytes"] == sum(f.stat().st_size for f in (out / "checkpoint").iterdir())
    assert json.loads((out / "search.json").read_text())["choice"] == data["config"]["choice"]
    assert json.loads((out / "report_data.json").read_text())["config"] == data["config"]


def test_pareto_strategy_resumes_its_study(tmp_path, calib_file, monkeypatch):
    monkeypatch.setenv("SQUEEZER_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "out"
    first = search(out, calib_file, "--max-drop", "0.05", "--strategy", "pareto", "--trials", "2", "--json")
    assert first.exit_code == 0, first.output
    assert (out / "study.db").is_file() and json.loads(first.stdout)["config"]["trials"] == 2
    fresh = search(out, calib_file, "--max-drop", "0.05", "--strategy", "pareto", "--trials", "4")
    assert fresh.exit_code == 2 and "resume" in fresh.output
    resumed = search(out, calib_file, "--max-drop", "0.05", "--strategy", "pareto", "--trials", "4", "--resume", "--json")
    assert resumed.exit_code == 0, resumed.output
    data = json.loads(resumed.stdout)
    assert data["config"]["trials"] == 4 and len(data["pareto"]["trials"]) == 4
    assert any(t["chosen"] for t in data["pareto"]["trials"])


@pytest.mark.parametrize("extra, message", [
    (["--max-drop", "-1"], "max_drop"),
    (["--max-drop", "0.1", "--resume"], "resume continues an Optuna study"),
    (["--max-drop", "0.1", "--budget-bits", "0.5"], "budget bits=0.5 is below the smallest possible model"),
    (["--max-drop", "0.1", "--formats", "w8,w5x"], "unknown search format 'w5x'"),
    (["--max-drop", "0.1", "--strategy", "random"], "unknown search strategy"),
])
def test_bad_flags_fail_with_one_line(tmp_path, calib_file, extra, message):
    result = search(tmp_path / "out", calib_file, *extra)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_evaluate_that_raises_is_named(tmp_path, calib_file):
    result = runner.invoke(app, ["search", "--model", MODEL, "--eval", "tests.test_search_cli:broken_eval",
                                 "--calib", str(calib_file), "--out", str(tmp_path / "o"), "--max-drop", "0.1"])
    assert result.exit_code == 2
    assert "evaluate function raised KeyError" in result.output and "no labels" in result.output


def test_html_reports_of_search_quantize_and_compress(tmp_path, calib_file, monkeypatch):
    from squeezer.examples.credit import make_credit_task

    monkeypatch.setenv("SQUEEZER_CACHE_DIR", str(tmp_path / "cache"))
    task = make_credit_task()
    np.savez(tmp_path / "xy.npz", x=task.x_test[:96].numpy(), y=task.y_test[:96].numpy())
    out = tmp_path / "search"
    result = search(out, calib_file, "--max-drop", "0.05", "--budget-bits", "3", "--trials", "3", "--html",
                    "--robust-data", str(tmp_path / "xy.npz"), "--robust-metric", "roc_auc")
    assert result.exit_code == 0, result.output
    page = (out / "report.html").read_text()
    for heading in ("Summary", "Layers", "Sensitivity", "Pareto front", "Robustness"):
        assert f"<h2>{heading}</h2>" in page
    data = json.loads((out / "report_data.json").read_text())
    assert set(data["robustness"]["clean"]) == {"fp32", "compressed"}
    (out / "report.html").unlink()
    again = runner.invoke(app, ["report", str(out), "--out", str(tmp_path / "r.html")])
    assert again.exit_code == 0 and (tmp_path / "r.html").read_text() == page

    q = runner.invoke(app, ["quantize", "--model", MODEL, "--preset", "w4g128", "--calib", str(calib_file),
                            "--out", str(tmp_path / "q"), "--html"])
    assert q.exit_code == 0, q.output
    assert "<h2>Layers</h2>" in (tmp_path / "q" / "report.html").read_text()
    assert squeezer.load(tmp_path / "q", model=lambda: __import__("tests.test_cli").test_cli.credit_model())

    np.savez(tmp_path / "d.npz", x=task.x_train.numpy(), y=task.y_train.numpy())
    c = runner.invoke(app, ["compress", "--recipe", "prune50-int8-finetune", "--model", MODEL, "--data",
                            str(tmp_path / "d.npz"), "--out", str(tmp_path / "c"), "--html", "--robust-metric", "accuracy"])
    assert c.exit_code == 0, c.output
    compressed = (tmp_path / "c" / "report.html").read_text()
    assert "<h2>Robustness</h2>" in compressed and "<h2>Summary</h2>" in compressed


def test_report_needs_report_data(tmp_path):
    result = runner.invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "report_data.json" in result.output
    (tmp_path / "report_data.json").write_text("{nope")
    result = runner.invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "not valid JSON" in result.output

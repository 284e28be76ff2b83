"""The command line: demo JSON schema, quantize / info, and one-line errors for bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import squeezer
from squeezer.cli import app
from squeezer.examples.demo import DEMO_SCHEMA_KEYS

from .conftest import MLP

runner = CliRunner()
FACTORY = "tests.conftest:MLP"


def invoke(*args: str):
    return runner.invoke(app, list(args))


def test_demo_json_schema_and_goals(tmp_path):
    result = invoke("demo", "--json", "--out", str(tmp_path / "demo"))
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data == json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert set(data) == {"dataset", "model", "fp32", "rows"}
    assert [r["preset"] for r in data["rows"]] == ["fp32", *squeezer.PRESETS]
    rows = {r["preset"]: r for r in data["rows"]}
    for row in rows.values():
        assert set(row) == set(DEMO_SCHEMA_KEYS)
    assert data["dataset"]["test_rows"] == 300
    for preset in ("w8", "w8a8", "w8a8-static"):
        assert abs(rows[preset]["accuracy_delta_pt"]) <= 0.5
        assert abs(rows[preset]["roc_auc_delta"]) <= 0.005
        assert rows[preset]["compression"] >= 3.9
    assert abs(rows["w4g128"]["accuracy_delta_pt"]) <= 1.5
    assert rows["binary"]["compression"] > rows["w2g64"]["compression"] > rows["w4g128"]["compression"]


@pytest.fixture
def calib_npy(tmp_path):
    path = tmp_path / "calib.npy"
    np.save(path, np.random.default_rng(0).standard_normal((50, 40)).astype(np.float32))
    return path


def test_quantize_writes_checkpoint_and_info_reads_it(tmp_path, calib_npy):
    torch.manual_seed(0)
    weights = tmp_path / "w.safetensors"
    save_file(MLP().state_dict(), str(weights))
    out = tmp_path / "out"
    result = invoke("quantize", "--model", FACTORY, "--weights", str(weights), "--preset", "w8a8-static",
                    "--calib", str(calib_npy), "--batch-size", "16", "--out", str(out), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["summary"]["calibration_batches"] == 4
    assert [l["name"] for l in report["layers"]] == ["fc1", "fc2", "head"]
    loaded = squeezer.load(out, model=MLP)
    assert isinstance(loaded.fc1, squeezer.modules.QuantLinear)
    info = invoke("info", str(out))
    assert info.exit_code == 0 and "fc2" in info.stdout and "int8 sym" in info.stdout


@pytest.mark.parametrize("applied", [True, False])
def test_low_memory_sets_the_allocator_before_loading(tmp_path, calib_npy, monkeypatch, applied):
    import squeezer.memory

    calls: list[int] = []
    monkeypatch.setattr(squeezer.memory, "limit_heap_retention", lambda: calls.append(1) or applied)
    result = invoke("quantize", "--model", FACTORY, "--preset", "w4g128-gptq", "--calib", str(calib_npy),
                    "--out", str(tmp_path / "out"), "--low-memory")
    assert result.exit_code == 0, result.output
    assert calls == [1] and (tmp_path / "out").is_dir()
    assert ("not a glibc system" in result.output) is not applied


@pytest.mark.parametrize("suffix", [".npz", ".safetensors", ".csv"])
def test_calibration_file_types(tmp_path, suffix):
    from squeezer.io.calib_files import load_calibration

    data = np.arange(30, dtype=np.float32).reshape(10, 3)
    path = tmp_path / f"c{suffix}"
    if suffix == ".npz":
        np.savez(path, input_ids=data.astype(np.int64), attention_mask=data)
    elif suffix == ".safetensors":
        from safetensors.numpy import save_file as save_np

        save_np({"x": data}, str(path))
    else:
        path.write_text("a,b,c\n" + "\n".join(",".join(str(v) for v in row) for row in data))
    batches = load_calibration(path, batch_size=4)
    assert len(batches) == 3
    first = batches[0]
    if suffix == ".npz":
        assert set(first) == {"input_ids", "attention_mask"} and first["input_ids"].dtype == torch.int64
    elif suffix == ".safetensors":
        assert torch.equal(first["x"], torch.from_numpy(data[:4]))
    else:
        assert torch.equal(first, torch.from_numpy(data[:4]))


BAD = [
    (["--preset", "w5"], "unknown preset 'w5'"),
    (["--bits", "17"], "bits must be an integer in 1..16"),
    (["--bits", "0"], "bits must be an integer in 1..16"),
    (["--group-size", "0"], "group size must be a positive integer"),
    (["--model", "no_such_module:make"], "--model: cannot import module 'no_such_module'"),
    (["--model", "tests.conftest:nothing"], "no callable 'nothing'"),
    (["--model", "justaname"], "--model must look like pkg.module:function"),
]


@pytest.mark.parametrize("extra, message", BAD)
def test_bad_flags_fail_with_one_line_and_no_output(tmp_path, extra, message):
    out = tmp_path / "out"
    args = ["quantize", "--model", FACTORY, "--out", str(out)]
    for i in range(0, len(extra), 2):
        if extra[i] in args:
            args[args.index(extra[i]) + 1] = extra[i + 1]
        else:
            args += extra[i:i + 2]
    result = invoke(*args)
    assert result.exit_code == 2
    assert message in result.output and "error:" in result.output
    assert "Traceback" not in result.output
    assert not out.exists()


def test_mismatched_weights(tmp_path):
    weights = tmp_path / "w.safetensors"
    save_file(MLP(d_in=41).state_dict(), str(weights))
    result = invoke("quantize", "--model", FACTORY, "--weights", str(weights), "--out", str(tmp_path / "o"))
    assert result.exit_code == 2 and "shape mismatch" in result.output and "fc1.weight" in result.output
    assert not (tmp_path / "o").exists()


def test_nan_weights_and_calibration(tmp_path):
    state = MLP().state_dict()
    state["fc2.weight"][0, 0] = float("nan")
    save_file(state, str(tmp_path / "nan.safetensors"))
    result = invoke("quantize", "--model", FACTORY, "--weights", str(tmp_path / "nan.safetensors"), "--out", str(tmp_path / "o"))
    assert result.exit_code == 2 and "fc2.weight" in result.output and "NaN" in result.output
    bad = np.ones((4, 40), dtype=np.float32)
    bad[2, 3] = np.inf
    np.save(tmp_path / "bad.npy", bad)
    result = invoke("quantize", "--model", FACTORY, "--calib", str(tmp_path / "bad.npy"), "--out", str(tmp_path / "o"))
    assert result.exit_code == 2 and "NaN or Inf" in result.output
    np.save(tmp_path / "empty.npy", np.ones((0, 40), dtype=np.float32))
    result = invoke("quantize", "--model", FACTORY, "--calib", str(tmp_path / "empty.npy"), "--out", str(tmp_path / "o"))
    assert result.exit_code == 2 and "empty" in result.output
    assert not (tmp_path / "o").exists()


def test_unwritable_output_directory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = invoke("quantize", "--model", FACTORY, "--out", str(blocker / "sub"))
    assert result.exit_code == 2 and str(blocker / "sub") in result.output
    result = invoke("quantize", "--model", FACTORY, "--out", str(blocker))
    assert result.exit_code == 2 and "not a directory" in result.output


def credit_auc(model) -> float:
    """--eval target for the compress test."""
    from squeezer.examples.credit import evaluate_credit, make_credit_task

    return evaluate_credit(model, make_credit_task())["roc_auc"]


def credit_model():
    from squeezer.examples.credit import CreditMLP

    torch.manual_seed(0)
    return CreditMLP(61)


def test_compress_command(tmp_path):
    from squeezer.examples.credit import make_credit_task

    task = make_credit_task()
    np.savez(tmp_path / "d.npz", x=task.x_train.numpy(), y=task.y_train.numpy())
    out = tmp_path / "out"
    result = invoke("compress", "--recipe", "prune50-int8-finetune", "--model", "tests.test_cli:credit_model",
                    "--data", str(tmp_path / "d.npz"), "--eval", "tests.test_cli:credit_auc", "--out", str(out), "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["rows"]
    assert [r["step"] for r in rows] == ["baseline", "prune", "finetune", "quantize"]
    assert all(r["metric"] is not None for r in rows)
    assert (out / "report.json").exists() and (out / "checkpoint" / "manifest.json").exists()
    np.savez(tmp_path / "bad.npz", inputs=task.x_train.numpy())
    bad = invoke("compress", "--recipe", "prune50-int8-finetune", "--model", "tests.test_cli:credit_model",
                 "--data", str(tmp_path / "bad.npz"), "--out", str(tmp_path / "o2"))
    assert bad.exit_code == 2 and "'x' and 'y'" in bad.output and not (tmp_path / "o2").exists()


EVAL_MODULE = '''
import torch


def score(model):
    x = torch.linspace(-1, 1, 8 * 40).reshape(8, 40)
    with torch.no_grad():
        y = model(x)
    return {"mean": float(y.mean()), "norm": float(y.norm())}


def scalar(model):
    return 0.5


def broken(model):
    raise KeyError("no labels")
'''


def test_quantize_eval_reports_the_task_metric_before_and_after(tmp_path, calib_npy, monkeypatch):
    (tmp_path / "task_eval_mod.py").write_text(EVAL_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    torch.manual_seed(0)
    weights = tmp_path / "w.safetensors"
    save_file(MLP().state_dict(), str(weights))
    out = tmp_path / "out"
    result = invoke("quantize", "--model", FACTORY, "--weights", str(weights), "--preset", "w2g64",
                    "--calib", str(calib_npy), "--eval", "task_eval_mod:score", "--out", str(out), "--json")
    assert result.exit_code == 0, result.output
    task = json.loads(result.stdout)["task"]
    import task_eval_mod

    float_model = MLP()
    float_model.load_state_dict(load_file(str(weights)))
    assert task["mean"]["before"] == pytest.approx(task_eval_mod.score(float_model)["mean"], abs=1e-6)
    quantized = task_eval_mod.score(squeezer.load(out, model=MLP))
    assert task["norm"]["after"] == pytest.approx(quantized["norm"], rel=1e-4)
    assert task["norm"]["after"] != pytest.approx(task["norm"]["before"], rel=1e-4)
    data = json.loads((out / "report_data.json").read_text())
    assert data["summary"]["before"]["task"] == {k: v["before"] for k, v in task.items()}
    assert data["summary"]["after"]["task"] == {k: v["after"] for k, v in task.items()}

    table = invoke("quantize", "--model", FACTORY, "--eval", "task_eval_mod:scalar", "--out", str(tmp_path / "o2"))
    assert table.exit_code == 0, table.output
    assert "task metric: metric 0.5 -> 0.5" in table.stdout
    bad = invoke("quantize", "--model", FACTORY, "--eval", "task_eval_mod:broken", "--out", str(tmp_path / "o3"))
    assert bad.exit_code == 2 and "--eval 'task_eval_mod:broken' raised KeyError" in bad.output
    assert not (tmp_path / "o3").exists()

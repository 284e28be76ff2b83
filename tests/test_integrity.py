"""What squeezer loads is trusted only after checks: checkpoints name no code to run, their digest covers
the manifest and the tensors, every tensor is checked against the manifest, exported files carry a digest."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from typer.testing import CliRunner

import squeezer
from squeezer import ModelError
from squeezer.cli import app
from squeezer.exporters import export_checkpoint
from squeezer.io.checkpoint import MANIFEST, TENSORS, verify
from squeezer.io.digest import file_sha256
from squeezer.io.manifest import digest

from .conftest import MLP

runner = CliRunner()


@pytest.fixture
def saved(tmp_path, mlp, mlp_batches):
    path = tmp_path / "ckpt"
    squeezer.save(squeezer.quantize(mlp, "w8a8-static", calib=mlp_batches), path)
    return path


def _rewrite(directory, change, forge: bool = False) -> None:
    """Apply ``change`` to the parsed manifest; ``forge``: recompute the digest as an attacker could."""
    manifest = json.loads((directory / MANIFEST).read_text())
    change(manifest)
    if forge:
        manifest["sha256"] = digest(manifest, directory / TENSORS)
    (directory / MANIFEST).write_text(json.dumps(manifest))


def test_export_never_imports_code_the_checkpoint_names(saved, tmp_path, monkeypatch):
    marker = tmp_path / "marker.txt"
    (saved / "helpers.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                      "from tests.conftest import MLP\ndef make():\n    return MLP()\n")
    _rewrite(saved, lambda m: m.update(model_factory="helpers:make"), forge=True)
    monkeypatch.chdir(saved)
    result = runner.invoke(app, ["export", str(saved), "--out", str(tmp_path / "m.onnx")])
    assert result.exit_code == 2
    assert "--model" in result.output and "never imports code a checkpoint names" in " ".join(result.output.split())
    with pytest.raises(squeezer.ConfigError, match="--model"):
        export_checkpoint(saved, tmp_path / "m.onnx")
    assert not marker.exists() and "helpers" not in sys.modules


@pytest.mark.parametrize("command", ["quantize", "export", "compress", "search"])
def test_help_says_model_and_eval_run_code(command):
    text = " ".join(runner.invoke(app, [command, "--help"], env={"TERMINAL_WIDTH": "400"}).output.split())
    assert text.count("imports and runs that Python code") >= (2 if command in ("quantize", "compress", "search") else 1)


@pytest.mark.parametrize("change", [
    lambda m: m["layers"]["fc1"]["scheme"]["weight"].update(bits=4),
    lambda m: m["layers"]["fc1"].update(input_rotation=4),
    lambda m: m["layers"]["fc1"]["scheme"]["weight"].update(symmetric="yes"),
    lambda m: m.update(squeezer_version="0.0"),
], ids=["bits", "rotation", "truthy-string", "version"])
def test_digest_covers_the_manifest(saved, change):
    _rewrite(saved, change)
    with pytest.raises(ModelError, match="corrupt or truncated|must be"):
        squeezer.load(saved, model=MLP)


@pytest.mark.parametrize("change, culprit", [
    (lambda m: m["layers"]["fc1"]["scheme"]["weight"].update(bits=4), "fc1.weight.codes"),
    (lambda m: m["layers"]["fc1"]["scheme"]["weight"].update(symmetric="yes"), "fc1.*scheme.weight.symmetric"),
    (lambda m: m["layers"]["fc1"]["scheme"]["weight"].update(symmetric=False), "fc1.weight.zero_point"),
    (lambda m: m["layers"]["fc1"].update(shape=[300, 41]), "fc1"),
    (lambda m: m["layers"]["fc1"].update(input_rotation=3), "fc1"),
    (lambda m: m.update(kernels={"nope": "int_mm"}), "nope"),
    (lambda m: m.update(example_inputs={"kind": "tensor", "inputs": [{"name": "x", "shape": [10**6, 10**6], "dtype": "float32"}]}),
     "example_inputs"),
], ids=["bits", "truthy-string", "asymmetric", "shape", "rotation", "kernels", "example"])
def test_forged_digest_still_refuses_invalid_content(saved, change, culprit):
    _rewrite(saved, change, forge=True)
    with pytest.raises(ModelError, match=culprit):
        squeezer.load(saved, model=MLP, packed=True)


def _forge_tensor(directory, key, value) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(directory / TENSORS))
    tensors[key] = value(tensors[key]) if callable(value) else value
    if value is None:
        del tensors[key]
    save_file(tensors, str(directory / TENSORS))
    _rewrite(directory, lambda m: None, forge=True)


@pytest.mark.parametrize("key, value, problem", [
    ("fc1.weight.scale", lambda t: -t, "must be > 0"),
    ("fc1.weight.scale", lambda t: t * float("nan"), "NaN or Inf"),
    ("fc1.weight.scale", lambda t: t.double(), "must be torch.float32"),
    ("fc1.weight.scale", lambda t: t[:-1], "shape"),
    ("fc1.act.scale", None, "missing"),
    ("fc1.weight.zero_point", torch.zeros(300, dtype=torch.int8), "not expected"),
    ("fc1.weight", torch.zeros(300, 40), "not expected"),
    ("norm.weight", lambda t: t.half(), "torch.float32"),
    ("extra", torch.zeros(1), "unexpected"),
    ("norm.bias", None, "missing"),
], ids=["negative", "nan", "dtype", "shape", "missing-act", "zero-point", "float-weight", "norm-dtype", "extra",
        "missing"])
def test_forged_tensors_are_checked_against_the_manifest(saved, key, value, problem):
    _forge_tensor(saved, key, value)
    with pytest.raises(ModelError, match=problem) as info:
        squeezer.load(saved, model=MLP)
    assert str(saved) in str(info.value)


def test_codes_outside_the_range_of_the_bits(tmp_path, mlp):
    path = tmp_path / "w8"
    squeezer.save(squeezer.quantize(mlp, "w8"), path)  # symmetric int8: codes -127..127, byte 0xFF unpacks to 128
    spec = squeezer.QuantSpec(8)
    assert spec.qmax - spec.qmin == 254
    _forge_tensor(path, "fc1.weight.codes", lambda t: torch.full_like(t, 0xFF))
    with pytest.raises(ModelError, match="fc1.weight.codes.*outside"):
        squeezer.load(path, model=MLP)


@pytest.mark.parametrize("text", ["[" * 10_000 + "]" * 10_000, '{"a": ' + "9" * 5_000 + "}",
                                  '{"a": 1.' + "5" * 5_000 + "}", '{"a": 1, "a": 2}', "\xff\xfe"])
def test_hostile_json_is_a_clean_error(saved, text):
    (saved / MANIFEST).write_text(text, encoding="latin-1")
    with pytest.raises(ModelError, match="manifest"):
        squeezer.load(saved, model=MLP)


def test_digest_is_streamed_before_any_tensor_is_read(saved, monkeypatch):
    with open(saved / TENSORS, "ab") as handle:  # 1 GiB of padding, sparse on disk
        handle.truncate(os.path.getsize(saved / TENSORS) + (1 << 30))
    reads = []
    real_open = open

    def spy(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        if str(file).endswith(TENSORS):
            original = handle.read
            handle.read = lambda n=-1: reads.append(n) or original(n)
        return handle

    monkeypatch.setattr("squeezer.io.digest.open", spy, raising=False)
    monkeypatch.setattr("squeezer.io.checkpoint.load_file", lambda *a: pytest.fail("tensors loaded before the check"))
    with pytest.raises(ModelError, match="corrupt or truncated"):
        squeezer.load(saved, model=MLP)
    assert reads and all(0 < n <= 1 << 20 for n in reads)


def test_info_verifies(saved):
    assert runner.invoke(app, ["info", str(saved)]).exit_code == 0
    data = (saved / TENSORS).read_bytes()
    (saved / TENSORS).write_bytes(data[: len(data) // 2])
    result = runner.invoke(app, ["info", str(saved)])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[0].startswith("error:") and "corrupt or truncated" in " ".join(result.output.split())


def test_exported_file_has_a_checked_sidecar(tmp_path, mlp, mlp_batches):
    pytest.importorskip("onnxruntime")
    q = squeezer.quantize(mlp, "w8")
    path = tmp_path / "m.onnx"
    squeezer.export(q, mlp_batches[0], path)
    sidecar = tmp_path / "m.onnx.sha256"
    assert sidecar.read_text().split() == [file_sha256(path), "m.onnx"]
    squeezer.runtime.load(path)
    original = path.read_bytes()
    data = bytearray(original)
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="m.onnx"):
        squeezer.runtime.load(path)
    path.write_bytes(original)
    sidecar.unlink()  # no sidecar: loaded as before
    squeezer.runtime.load(path)


def test_verify_returns_the_manifest(saved):
    assert set(verify(saved)["layers"]) == {"fc1", "fc2", "head"}

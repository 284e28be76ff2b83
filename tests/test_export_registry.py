"""Export formats are plugins: one registered exporter is usable by ``squeezer.export``, ``squeezer.runtime.load``
and ``squeezer export`` with no other edit."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytest
import torch
from torch import nn

import squeezer
from squeezer import ConfigError, ModelError
from squeezer.exporters import ExportReport, Exporter, Runner, formats, register, unregister
from squeezer.io.user_model import load_factory
from squeezer.modules import quant_layers

from .conftest import MLP


@dataclass
class ToyOptions:
    factory: str = field(default="", metadata={"help": "pkg.module:function that rebuilds the model"})
    precision: Literal["float32", "float16"] = field(default="float32", metadata={"help": "stored weight type"})


class ToyRunner(Runner):
    """Rebuilds the model from its factory with the stored weights and runs it in torch."""

    def __init__(self, path: Path) -> None:
        with np.load(path) as data:
            arrays = {k: data[k] for k in data.files}
        self.path, self.inputs = path, [("input", np.float32)]
        self.model = load_factory(str(arrays.pop("__factory__"))).eval()
        self.model.load_state_dict({k: torch.from_numpy(v.astype(np.float32)) for k, v in arrays.items()})

    def _run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        with torch.no_grad():
            return [self.model(torch.from_numpy(feeds["input"])).numpy()]


class ToyExporter(Exporter):
    """The model's float state (quantized layers: their dequantized weights ``W^``) as numpy arrays."""

    name, suffixes, summary, options = "toy", (".npz",), "numpy arrays, a test format", ToyOptions

    def export(self, model: nn.Module, example_inputs: Any, path: Path, options: ToyOptions) -> ExportReport:
        if not options.factory:
            raise ConfigError("the toy export needs factory=pkg.module:function")
        layers = quant_layers(model)
        own = {**dict(model.named_parameters()), **dict(model.named_buffers()),
               **{f"{name}.weight": layer.quantized_weight() for name, layer in layers.items()}}
        keys = load_factory(options.factory).state_dict()
        state = {key: own[key].detach().numpy().astype(options.precision) for key in keys}
        with open(path, "wb") as handle:
            np.savez(handle, __factory__=np.array(options.factory), **state)
        return ExportReport(str(path), {name: f"{options.precision} W^" for name in layers})

    def runner(self, path: Path, **runtime_options: Any) -> ToyRunner:
        return ToyRunner(path)


@pytest.fixture
def toy():
    exporter = register(ToyExporter())
    yield exporter
    unregister("toy")


def _quantized(mlp: MLP, batches: list[torch.Tensor]) -> nn.Module:
    return squeezer.quantize(mlp, "w8", calib=batches)


def test_registered_format_by_name_suffix_and_runtime(tmp_path, toy, mlp, mlp_batches):
    q = _quantized(mlp, mlp_batches)
    assert formats()[-1] == "toy"
    by_suffix = squeezer.export(q, mlp_batches[0], tmp_path / "m.npz", factory="tests.conftest:MLP")
    by_name = squeezer.export(q, mlp_batches[0], tmp_path / "m.bin", format="toy", factory="tests.conftest:MLP",
                              precision="float16")
    assert set(by_suffix.layers) == {"fc1", "fc2", "head"} and by_name.layers["fc1"] == "float16 W^"
    assert np.load(tmp_path / "m.bin")["fc1.weight"].dtype == np.float16
    x = mlp_batches[1]
    with torch.no_grad():
        ref = q(x)
    run = squeezer.runtime.load(tmp_path / "m.npz")
    assert isinstance(run, ToyRunner) and torch.allclose(run(x), ref, atol=1e-5)


def test_unknown_option_and_unknown_format(tmp_path, toy, mlp, mlp_batches):
    q = _quantized(mlp, mlp_batches)
    with pytest.raises(ConfigError, match=r"\['opset'\] are not understood by the toy export; it takes: \['factory', 'precision'\]"):
        squeezer.export(q, mlp_batches[0], tmp_path / "m.npz", opset=17)
    with pytest.raises(ConfigError, match="unknown export format 'coreml'.*onnx, tflite, executorch, toy"):
        squeezer.export(q, mlp_batches[0], tmp_path / "m.npz", format="coreml")
    with pytest.raises(ConfigError, match=r"unknown export format '\.bin'.*\.onnx, \.tflite, \.pte, \.npz"):
        squeezer.export(q, mlp_batches[0], tmp_path / "m.bin")
    with pytest.raises(ConfigError, match="already registered"):
        register(ToyExporter())


def test_unregistered_format_is_gone(tmp_path, mlp, mlp_batches):
    register(ToyExporter())
    unregister("toy")
    assert "toy" not in formats()
    (tmp_path / "m.npz").write_bytes(b"")
    with pytest.raises(ModelError, match="unknown export format '.npz'"):
        squeezer.runtime.load(tmp_path / "m.npz")
    with pytest.raises(ConfigError, match="unknown export format 'toy'"):
        unregister("toy")


def test_cli_exports_and_lists_a_registered_format(tmp_path, toy):
    from typer.testing import CliRunner

    from squeezer.cli import app

    x = torch.randn(64, 40, generator=torch.Generator().manual_seed(3))
    np.save(tmp_path / "x.npy", x.numpy())
    runner = CliRunner()
    done = runner.invoke(app, ["quantize", "--model", "tests.conftest:MLP", "--preset", "w8", "--calib",
                               str(tmp_path / "x.npy"), "--out", str(tmp_path / "ck")])
    assert done.exit_code == 0, done.output
    out = tmp_path / "m.bin"
    result = runner.invoke(app, ["export", str(tmp_path / "ck"), "--model", "tests.conftest:MLP", "--format", "toy", "--out", str(out), "--json",
                                 "--option", "factory=tests.conftest:MLP", "--option", "precision=float16"])
    assert result.exit_code == 0, result.output
    assert set(json.loads(result.stdout)["layers"]) == {"fc1", "fc2", "head"}
    assert np.load(out)["head.weight"].dtype == np.float16
    bad = runner.invoke(app, ["export", str(tmp_path / "ck"), "--out", str(tmp_path / "m.npz"), "--option", "bits=4"])
    assert bad.exit_code == 2 and "['bits'] are not understood by the toy export" in bad.output
    helped = runner.invoke(app, ["export", "--help"], env={"TERMINAL_WIDTH": "400"})
    assert helped.exit_code == 0
    text = " ".join(helped.output.split())
    for listed in ("onnx (.onnx)", "tflite (.tflite)", "executorch (.pte)", "toy (.npz): numpy arrays, a test format",
                   "precision=float32: stored weight type", "opset=17: ONNX opset version"):
        assert listed in text, listed


def test_options_from_text_follow_the_field_types():
    from squeezer.exporters import get, options_from_text

    onnx = get("onnx")
    assert options_from_text("onnx", onnx.options, {"opset": "18", "compact": "false", "dynamic_axes": "none"}) == \
        {"opset": 18, "compact": False, "dynamic_axes": None}
    with pytest.raises(ConfigError, match="option 'opset' of the onnx export: expected int, got 'x'"):
        options_from_text("onnx", onnx.options, {"opset": "x"})
    with pytest.raises(ConfigError, match=r"\['bits'\] are not understood by the onnx export"):
        options_from_text("onnx", onnx.options, {"bits": "4"})
    with pytest.raises(ConfigError, match="option 'calib' of the tflite export: .* cannot be given as text"):
        options_from_text("tflite", get("tflite").options, {"calib": "x.npy"})

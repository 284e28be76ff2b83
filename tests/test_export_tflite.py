"""TFLite export: squeezer's int8 codes and scales are in the file, the runner matches the model."""

from __future__ import annotations

import importlib.util
import json
import itertools
import sys

import numpy as np
import pytest
import torch

import squeezer
from squeezer import ConfigError, QuantConfig
from squeezer import export
from squeezer.modules import quant_layers
from squeezer.prune import magnitude_prune
from squeezer.quant.levels import lookup

from .conftest import MLP, export_per_tensor_dynamic, export_per_token_asymmetric

needs_tflite = pytest.mark.skipif(
    importlib.util.find_spec("litert_torch") is None or importlib.util.find_spec("ai_edge_litert") is None,
    reason="needs the tflite extra: pip install 'squeezer[tflite]'")


def _rel(out, ref) -> float:
    return float((torch.as_tensor(out) - ref).norm() / ref.norm())


def _expected_codes(layer) -> np.ndarray:
    """Squeezer's int8 codes: uniform codes, or a codebook's integer levels."""
    qt = layer.weight_qtensor()
    codes = qt.codes if qt.spec.mapping == "uniform" else lookup(qt.codes.long(), qt.qparams.levels.reshape(-1))
    return codes.to(torch.int8).numpy()


def _int8_weights(path) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(codes moved to (O, ...) with size-1 axes dropped, per-channel scales)`` of every int8 constant."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    interpreter = Interpreter(model_path=str(path), experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    interpreter.allocate_tensors()
    found = []
    for d in interpreter.get_tensor_details():
        q = d["quantization_parameters"]
        if d["dtype"] != np.int8 or len(q["scales"]) < 2:
            continue
        codes = np.moveaxis(interpreter.get_tensor(d["index"]), q["quantized_dimension"], 0)
        found.append((codes.reshape(codes.shape[0], *[s for s in codes.shape[1:] if s > 1]), q["scales"]))
    return found


def _is_constant(path, index: int) -> bool:
    """Whether tensor ``index`` of the TFLite file has data in the file."""
    from ai_edge_litert import schema_py_generated as fb

    model = fb.Model.GetRootAsModel(path.read_bytes(), 0)
    return model.Buffers(model.Subgraphs(0).Tensors(index).Buffer()).DataLength() > 0


def _assert_file_holds_squeezers_integers(path, model, folded: tuple[str, ...] = ()) -> None:
    """Each layer's codes (up to TFLite's layout: OHWI, depthwise 1HWO, conv1d as 2-D) and float32 scales
    (for the ``folded`` layers, whose scales carry a BatchNorm's factor, the codes only)."""
    stored = _int8_weights(path)
    for name, layer in quant_layers(model).items():
        expected = _expected_codes(layer)
        expected = expected.reshape(expected.shape[0], *[s for s in expected.shape[1:] if s > 1])
        scale = layer.weight_qtensor().qparams.scale.float().reshape(-1).numpy()
        matches = [codes for codes, s in stored if name in folded or np.array_equal(s, scale)]
        assert matches, f"{name}: no int8 tensor with squeezer's scales"
        layouts = [expected.transpose(0, *p) for p in itertools.permutations(range(1, expected.ndim))]
        assert any(np.array_equal(c, e) for c in matches for e in layouts), f"{name}: codes differ"


@needs_tflite
def test_mlp_w8a8_matches_to_float_rounding(tmp_path, mlp, mlp_batches):
    q = squeezer.quantize(mlp, "w8a8")
    path = tmp_path / "mlp.tflite"
    report = export(q, mlp_batches[0], path)
    assert set(report.layers) == {"fc1", "fc2", "head"} and not report.warnings
    _assert_file_holds_squeezers_integers(path, q)
    run = squeezer.runtime.load(path)
    for x in (mlp_batches[1], mlp_batches[2][:5]):  # the exported batch, then another one
        with torch.no_grad():
            ref = q(x)
        out = run(x)
        assert isinstance(out, torch.Tensor) and out.shape == ref.shape
        assert _rel(out, ref) < 1e-5
    assert isinstance(run(mlp_batches[1].numpy()), np.ndarray)


@needs_tflite
def test_dynamic_per_tensor_runs_per_row_with_a_warning(tmp_path, mlp, mlp_batches):
    q, path = export_per_tensor_dynamic(tmp_path, mlp, mlp_batches, "tflite",
                                        "per-row quantization (the nearest supported)")
    _assert_file_holds_squeezers_integers(path, q)


@needs_tflite
def test_asymmetric_per_token_runs_as_symmetric_rows_with_a_warning(tmp_path, mlp, mlp_batches):
    q, path = export_per_token_asymmetric(tmp_path, mlp, mlp_batches, "tflite",
                                          "symmetric per-row quantization (the nearest supported)", 0.03)
    _assert_file_holds_squeezers_integers(path, q)


@needs_tflite
def test_cnn_static_full_integer_hides_int8_io(tmp_path, cnn, cnn_batches):
    from ai_edge_litert.interpreter import Interpreter

    q = squeezer.quantize(cnn, "w8a8-static", calib=cnn_batches, fold_bn=False)  # conv1's BatchNorm stays a node
    path = tmp_path / "cnn.tflite"
    report = export(q, cnn_batches[0][:1], path, calib=cnn_batches)  # default: all-int8 graph
    interpreter = Interpreter(model_path=str(path))
    assert interpreter.get_input_details()[0]["dtype"] == np.int8  # the file takes and returns int8
    assert interpreter.get_output_details()[0]["dtype"] == np.int8
    # conv2 -> relu -> conv1d -> relu -> fc reuse squeezer's grids; conv1 (then BatchNorm) and fc need their own
    assert sorted(w.split("'")[1] for w in report.warnings) == ["conv1", "fc"]
    assert all("output grid" in w for w in report.warnings)
    _assert_file_holds_squeezers_integers(path, q)
    x = cnn_batches[1]
    with torch.no_grad():
        ref = q(x)
    own_grids = _rel(squeezer.runtime.load(path)(x), ref)
    assert own_grids < 0.03  # float in, float out; 4 rows through a 1-row model

    # "float": conv1 and fc, whose outputs squeezer leaves in float, run as float ops on squeezer's W^,
    # stored as squeezer's int8 codes + DEQUANTIZE (every layer's integers are in the file; no float weights)
    default = tmp_path / "cnn_float_outputs.tflite"
    report = export(q, cnn_batches[0][:1], default, unquantized_outputs="float")
    warned = {w.split("'")[1]: w for w in report.warnings}
    assert sorted(warned) == ["conv1", "fc"]
    assert "DEQUANTIZE" in warned["fc"] and "fused" in warned["conv1"]  # conv1 + bn + relu: one int8 kernel
    assert "float op" in report.layers["fc"] and "static int8" in report.layers["conv1"]
    interpreter = Interpreter(model_path=str(default))
    assert interpreter.get_output_details()[0]["dtype"] == np.float32
    _assert_file_holds_squeezers_integers(default, q, folded=("conv1",))  # conv1's scales carry bn's factor
    float_weights = [d["name"] for d in interpreter.get_tensor_details()
                     if d["dtype"] == np.float32 and len(d["shape"]) > 1 and _is_constant(default, d["index"])]
    assert float_weights == []
    assert _rel(squeezer.runtime.load(default)(x), ref) < own_grids
    assert _rel(squeezer.runtime.load(default, xnnpack=True)(x), ref) < own_grids  # XNNPACK reads the DEQUANTIZE too
    with pytest.raises(ConfigError, match="unquantized_outputs"):
        export(q, cnn_batches[0][:1], tmp_path / "bad.tflite", unquantized_outputs="int4")


@needs_tflite
def test_quantized_embeddings_keep_int8_rows(tmp_path):
    from .test_onnx import TextModel

    torch.manual_seed(0)
    model = TextModel().eval()
    ids = torch.randint(1, 100, (1, 6))
    example = {"input_ids": ids, "attention_mask": torch.ones(1, 6)}
    for preset in ("w8a8", "w8"):
        q = squeezer.quantize(model, preset)
        path = tmp_path / f"{preset}.tflite"
        report = export(q, example, path)
        assert "EMBEDDING_LOOKUP" in report.layers["embed"]
        assert not any("'embed'" in w for w in report.warnings)  # token ids are not quantized: no warning
        _assert_file_holds_squeezers_integers(path, q)
        with torch.no_grad():
            ref = q(**example)
        assert _rel(squeezer.runtime.load(path)(**example), ref) < (1e-5 if preset == "w8a8" else 0.03)


@needs_tflite
def test_weight_only_codebook_and_float_fallback(tmp_path, mlp, mlp_batches):
    cfg = QuantConfig(weight={"bits": 2, "mapping": "ternary"},
                      overrides={"^head$": {"weight": {"bits": 4, "mapping": "uniform", "symmetric": False, "signed": False,
                                                    "granularity": "group:64"}}})
    q = squeezer.quantize(mlp, cfg)
    with pytest.raises(ConfigError, match="'head'.*uint4 asym group\\(64\\).*unsupported='float'"):
        export(q, mlp_batches[0], tmp_path / "bad.tflite")
    assert not list(tmp_path.iterdir())  # nothing half-written
    path = tmp_path / "ternary.tflite"
    report = export(q, mlp_batches[0], path, unsupported="float")
    assert "float32" in report.layers["head"] and any("'head'" in w and "float32" in w for w in report.warnings)
    assert all(any(f"'{n}'" in w and "run time" in w for w in report.warnings) for n in ("fc1", "fc2"))
    # TFLite's dynamic-range converter then quantizes the float head itself: said, not silent
    assert any("converter quantized" in w and "head" in w for w in report.warnings)
    stored = _int8_weights(path)
    for name in ("fc1", "fc2"):
        expected = _expected_codes(q.get_submodule(name))
        assert set(np.unique(expected)) <= {-1, 0, 1}
        assert any(np.array_equal(c, expected) for c, _ in stored), name
    with torch.no_grad():
        ref = q(mlp_batches[1])
    assert _rel(squeezer.runtime.load(path)(mlp_batches[1]), ref) < 0.03  # TFLite also quantizes activations


@needs_tflite
def test_pruned_float_model_and_refusals(tmp_path, mlp_batches):
    torch.manual_seed(0)
    model = MLP().eval()
    magnitude_prune(model, 0.5, inplace=True)  # masks as parametrizations: float export of the effective weight
    path = tmp_path / "pruned.tflite"
    report = export(model, mlp_batches[0], path)
    assert report.layers == {} and not report.warnings
    with torch.no_grad():
        ref = model(mlp_batches[1])
    assert _rel(squeezer.runtime.load(path)(mlp_batches[1]), ref) < 1e-5
    mixed = squeezer.quantize(model, QuantConfig(weight={"bits": 8}, activation={"bits": 8, "symmetric": False, "granularity": "tensor"},
                                                 activation_mode="static", overrides={"^head$": {"activation": None, "activation_mode": "none"}}),
                              calib=mlp_batches)
    with pytest.raises(ConfigError, match="'head'.*static"):
        export(mixed, mlp_batches[0], tmp_path / "mixed.tflite")


def test_missing_extra_names_it(tmp_path, monkeypatch, mlp, mlp_batches):
    q = squeezer.quantize(mlp, "w8")
    monkeypatch.setitem(sys.modules, "litert_torch", None)  # import fails
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)
    with pytest.raises(ConfigError, match=r"pip install 'squeezer\[tflite\]'"):
        export(q, mlp_batches[0], tmp_path / "m.tflite")
    (tmp_path / "m.tflite").write_bytes(b"TFL3")
    with pytest.raises(ConfigError, match=r"pip install 'squeezer\[tflite\]'"):
        squeezer.runtime.load(tmp_path / "m.tflite")
    with pytest.raises(ConfigError, match="unknown export format"):
        export(q, mlp_batches[0], tmp_path / "m.bin")


@needs_tflite
def test_cli_exports_a_checkpoint_to_tflite(tmp_path):
    from typer.testing import CliRunner

    from squeezer.cli import app

    x = torch.randn(64, 40, generator=torch.Generator().manual_seed(3))
    np.save(tmp_path / "x.npy", x.numpy())
    runner = CliRunner()
    done = runner.invoke(app, ["quantize", "--model", "tests.conftest:MLP", "--preset", "w8a8", "--calib",
                               str(tmp_path / "x.npy"), "--out", str(tmp_path / "ck")])
    assert done.exit_code == 0, done.output
    out = tmp_path / "m.tflite"
    result = runner.invoke(app, ["export", str(tmp_path / "ck"), "--model", "tests.conftest:MLP", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    assert out.is_file() and set(json.loads(result.stdout[result.stdout.index("{"):])["layers"]) == {"fc1", "fc2", "head"}
    q = squeezer.load(tmp_path / "ck", model=MLP)
    run = squeezer.runtime.load(out)
    assert _rel(run(x[:1]), q(x[:1]).detach()) < 1e-4
    bad = runner.invoke(app, ["export", str(tmp_path / "ck"), "--out", str(tmp_path / "m.onnx"), "--unsupported", "float"])
    assert bad.exit_code == 2 and "not understood by the onnx export" in bad.output
    static = runner.invoke(app, ["quantize", "--model", "tests.conftest:MLP", "--preset", "w8a8-static", "--calib",
                                 str(tmp_path / "x.npy"), "--out", str(tmp_path / "st")])
    assert static.exit_code == 0, static.output
    for mode, expected in (("int8", "output grid"), ("float", "float op")):
        result = runner.invoke(app, ["export", str(tmp_path / "st"), "--model", "tests.conftest:MLP", "--out", str(tmp_path / f"{mode}.tflite"), "--json",
                                     "--unquantized-outputs", mode, "--calib", str(tmp_path / "x.npy")])
        assert result.exit_code == 0, result.output
        warnings = json.loads(result.stdout[result.stdout.index("{"):])["warnings"]
        assert warnings and all(expected in w for w in warnings), warnings


def test_channel_scales_recover_folded_factors():
    from squeezer.exporters.tflite.int8_weights import channel_scales

    g = torch.Generator().manual_seed(0)
    codes = torch.randint(-127, 128, (6, 5, 3), generator=g, dtype=torch.int8).numpy()
    codes[2] = 0  # an all-zero channel keeps a positive scale
    scale = np.float32([0.02, 0.5, 0.1, 1e-3, 3.0, 0.7]) * np.float32([1.0, 0.9, 1.0, 2.5, 1.0, 0.3])  # s * bn factor
    values = codes.astype(np.float32) * scale.reshape(-1, 1, 1)
    found = channel_scales(values, codes, 0)
    assert found is not None and np.allclose(found[[0, 1, 3, 4, 5]], scale[[0, 1, 3, 4, 5]], rtol=1e-6) and found[2] > 0
    moved = np.moveaxis(codes, 0, 2)  # channels on the last axis, as a depthwise filter
    assert np.allclose(channel_scales(np.moveaxis(values, 0, 2), moved, 2)[[0, 1]], scale[[0, 1]], rtol=1e-6)
    off = values.copy()
    off[1, 0, 0] += 0.01 * abs(off[1, 0, 0]) + 1e-3  # not q * c in channel 1
    assert channel_scales(off, codes, 0) is None
    assert channel_scales(-values, codes, 0) is None  # scales must be positive


def _conv_bn_relu6_net() -> torch.nn.Module:
    """Stem conv -> BN -> ReLU6 -> depthwise conv -> BN -> ReLU6 -> pooling -> linear, with norm gains of 2-6 so
    that the convolutions' outputs reach past 6 before the ReLU6."""
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU6(),
                          nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.ReLU6(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    with torch.no_grad():
        for bn in (model[1], model[4]):
            bn.weight.uniform_(2, 6)
            bn.bias.uniform_(-1, 3)
    return model.eval()


@needs_tflite
def test_conv_bn_relu6_output_grid_is_taken_after_the_activation(tmp_path, monkeypatch):
    """With its norm folded, a convolution followed by ReLU6 has no grid of its own before the activation: the
    stem's output goes straight onto the next layer's input grid, the depthwise one (then pooling) gets an own
    grid on [0, 6] (TFLite's fused RELU6); the file is closer to squeezer's simulation than with min-max grids
    on the pre-activation outputs."""
    from squeezer.exporters.tflite import convert

    model = _conv_bn_relu6_net()
    g = torch.Generator().manual_seed(3)
    calib = [torch.rand(16, 3, 12, 12, generator=g) * 2 - 1 for _ in range(4)]
    x = torch.rand(64, 3, 12, 12, generator=g) * 2 - 1
    q = squeezer.quantize(model, "w8a8-static", calib=calib, progress=False)
    with torch.no_grad():
        sim = q(x)

    def exported(name: str) -> tuple[dict[str, str], float]:
        path = tmp_path / f"{name}.tflite"
        report = export(q, x[:1], path, calib=calib)
        _assert_file_holds_squeezers_integers(path, q)
        return {w.split("'")[1]: w for w in report.warnings}, _rel(squeezer.runtime.load(path)(x), sim)

    warned, error = exported("fused")
    assert sorted(warned) == ["3", "8"]  # '0' reuses layer '3''s input grid; '3' is followed by pooling
    assert f"scale {6 / 255:.3g}, zero point -128 (range [0, 6] after the activation" in warned["3"]
    monkeypatch.setattr(convert, "CLIPS", {})  # min-max grids on the convolutions' outputs, before their ReLU6
    warned, unfused_error = exported("unfused")
    assert sorted(warned) == ["0", "3", "8"] and "range [-" in warned["3"]
    assert error < unfused_error


class _ResidualNet(torch.nn.Module):
    """stem -> [branch, skip] -> branch + skip -> head: the stem's output feeds the branch and the addition."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.branch = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.head = torch.nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.stem(x)
        return self.head(self.branch(skip) + skip)


def _activation_grids(path) -> set[tuple[float, int]]:
    """``(scale, zero point)`` of every per-tensor int8 tensor of a TFLite file that is not a constant."""
    from ai_edge_litert.interpreter import Interpreter

    grids = set()
    for d in Interpreter(model_path=str(path)).get_tensor_details():
        q = d["quantization_parameters"]
        if d["dtype"] == np.int8 and len(q["scales"]) == 1 and not _is_constant(path, d["index"]):
            grids.add((round(float(q["scales"][0]), 7), int(q["zero_points"][0])))
    return grids


def _calibrated_output_grid(model, name: str, batches) -> tuple[float, int]:
    """The int8 asymmetric min-max grid of layer ``name``'s output over ``batches``: ``s = (hi - lo) / 255``,
    ``z = -128 - round(lo / s)``, with ``lo <= 0 <= hi``."""
    seen = []
    hook = model.get_submodule(name).register_forward_hook(lambda _m, _i, y: seen.append(y.detach()))
    with torch.no_grad():
        for batch in batches:
            model(batch)
    hook.remove()
    y = torch.cat(seen)
    lo, hi = min(float(y.min()), 0.0), max(float(y.max()), 0.0)
    scale = (hi - lo) / 255
    return round(scale, 7), -128 - round(lo / scale)


@needs_tflite
def test_residual_grids_are_squeezers_or_calibrated(tmp_path):
    """Every activation grid of a residual CNN's file comes from the calibration data: the stem's output, read by
    the branch and by the addition, sits on the branch's input grid (no grid of its own, no requantization); the
    addition's output on the head's input grid; the branch's and the head's outputs, which no squeezer layer
    quantizes, on the min-max range those layers' outputs reach on the calibration batches."""
    from squeezer.exporters.qdq import static_input_grid

    g = torch.Generator().manual_seed(5)
    torch.manual_seed(5)
    model = _ResidualNet().eval()
    calib = [torch.randn(8, 3, 10, 10, generator=g) for _ in range(4)]
    x = torch.randn(32, 3, 10, 10, generator=g)
    q = squeezer.quantize(model, "w8a8-static", calib=calib, progress=False)
    path = tmp_path / "residual.tflite"
    report = export(q, x[:1], path, calib=calib)
    assert sorted(w.split("'")[1] for w in report.warnings) == ["branch", "head"]  # the stem reuses squeezer's grid
    inputs = {name: static_input_grid(q.get_submodule(name), name, "TFLite") for name in ("stem", "branch", "head")}
    squeezers = {(round(s, 7), z) for s, z in inputs.values()}
    calibrated = {_calibrated_output_grid(q, name, calib) for name in ("branch", "head")}  # not the example
    found = _activation_grids(path)
    close = lambda a, b: a[1] == b[1] and abs(a[0] - b[0]) <= 1e-6 * b[0]  # noqa: E731
    assert all(any(close(f, e) for e in squeezers | calibrated) for f in found), (found, squeezers, calibrated)
    assert all(any(close(f, e) for f in found) for e in squeezers | calibrated)
    _assert_file_holds_squeezers_integers(path, q)
    with torch.no_grad():
        sim = q(x)
    assert _rel(squeezer.runtime.load(path)(x), sim) < 0.05

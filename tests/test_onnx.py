"""ONNX export: ONNX Runtime loads it, outputs match squeezer's model, integer nodes are present."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

import squeezer
from squeezer import ConfigError, ModelError
from squeezer.exporters.onnx.graph import nbits_tensors

from .conftest import TextModel

# relative tolerance vs squeezer's PyTorch model: ORT's MatMulNBits (accuracy_level 4) and its
# fused int8 weight kernels quantize activations internally, which costs up to ~1-2 %; ORT
# rounds x / s of static activations its own way (a few codes differ)
TOLERANCE = {"w4g128": 0.03, "w8": 0.02, "w8g128": 0.02, "w8a8-static": 0.01, "q8_0": 0.02, "q4_0": 0.03}
EXPECTED_OPS = {
    "w8": {"MatMulNBits"}, "w8g128": {"MatMulNBits"}, "w4g128": {"MatMulNBits"}, "w8a8": {"MatMulInteger"},
    "w8a8-tensor": {"DynamicQuantizeLinear", "MatMulInteger"}, "w8a8-asym": {"QuantizeLinear", "MatMulInteger"},
    "w8a8-static": {"QuantizeLinear", "DequantizeLinear"}, "w2g64": {"Cast", "Sub"}, "w3g128": {"Cast", "Sub"},
    "ternary": {"Gather"}, "binary": {"Gather"}, "log2-w4": {"Gather"}, "kmeans-w4": {"Gather"},
    "q8_0": {"MatMulNBits"}, "q4_0": {"MatMulNBits"},
}


def _ops(path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(96, 256), nn.ReLU(), nn.Linear(256, 200), nn.ReLU(), nn.Linear(200, 48)).eval()


@pytest.mark.parametrize("preset", list(squeezer.PRESETS))
def test_export_runs_in_onnxruntime(tmp_path, preset):
    model = _model()
    q = squeezer.quantize(model, preset, calib=[torch.randn(16, 96) for _ in range(2)])
    path = tmp_path / "m.onnx"
    report = squeezer.export_onnx(q, torch.randn(1, 96), path)
    assert EXPECTED_OPS[preset] <= _ops(path)
    assert set(report.layers) == {"0", "2", "4"} and not report.warnings
    run = squeezer.runtime.load(path)
    for x in (torch.randn(1, 96), torch.randn(7, 96)):  # dynamic batch
        with torch.no_grad():
            ref = q(x)
        out = run(x)
        assert isinstance(out, torch.Tensor) and out.shape == ref.shape
        assert (out - ref).norm() / ref.norm() < TOLERANCE.get(preset, 1e-4), preset
    assert isinstance(run(x.numpy()), np.ndarray)


def test_onnx_file_is_small(tmp_path):
    model = _model()
    fp32 = tmp_path / "fp32.onnx"
    torch.onnx.export(model, (torch.randn(1, 96),), str(fp32), dynamo=False)
    sizes = {}
    for preset in ("w8", "w4g128"):
        squeezer.export_onnx(squeezer.quantize(model, preset), torch.randn(1, 96), tmp_path / f"{preset}.onnx")
        sizes[preset] = (tmp_path / f"{preset}.onnx").stat().st_size
    assert fp32.stat().st_size / sizes["w8"] > 3.5
    assert fp32.stat().st_size / sizes["w4g128"] > 5.5


def test_weights_in_file_are_squeezers_integers(tmp_path):
    model = _model()
    names = ("0", "2", "4")
    for preset in ("w8a8", "w8", "w8g128"):
        q = squeezer.quantize(model, preset)
        path = tmp_path / f"{preset}.onnx"
        squeezer.export_onnx(q, torch.randn(1, 96), path)
        graph = onnx.load(str(path)).graph
        consts = [numpy_helper.to_array(t) for t in graph.initializer]
        expected = [q.get_submodule(name).weight_qtensor().codes.numpy() for name in names]
        if preset == "w8a8":  # MatMulInteger (u8 x u8): W^T as uint8 codes + 128
            found = [c.T.astype(np.int16) - 128 for c in consts if c.dtype == np.uint8 and c.ndim == 2]
        else:  # MatMulNBits 8 bits: (N, blocks, block) uint8; signed codes + 128, unsigned (w8g128) as they are
            offset = 128 if q.get_submodule(names[0]).weight_spec.signed else 0
            found = [c.reshape(c.shape[0], -1).astype(np.int16) - offset for c in consts if c.dtype == np.uint8 and c.ndim == 3]
        assert len(found) == 3
        for e in expected:
            assert any(f.shape[0] == e.shape[0] and np.array_equal(f[:, : e.shape[1]], e) for f in found), preset


@pytest.mark.parametrize("preset", ["w8a8", "w8a8-asym", "w8a8-tensor", "w8a8-static"])
def test_uint8_activations_meet_uint8_weights(tmp_path, preset):
    """ONNX Runtime's x86 u8 x s8 kernels add product pairs in saturating int16 on CPUs without VNNI
    (outputs 10-30 % off): with uint8 activations the weight codes are written as uint8 ``q + 128``, so
    the file is exact on any CPU, not only on the one running this test."""
    q = squeezer.quantize(_model(), preset, calib=[torch.randn(16, 96) for _ in range(2)])
    path = tmp_path / "m.onnx"
    squeezer.export_onnx(q, torch.randn(1, 96), path)
    weights = [numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer if len(t.dims) == 2]
    assert len(weights) == 3 and all(w.dtype == np.uint8 for w in weights), [w.dtype for w in weights]
    expected = [q.get_submodule(name).weight_qtensor().codes.numpy() for name in ("0", "2", "4")]
    assert all(np.array_equal(w.T.astype(np.int16) - 128, e) for w, e in zip(weights, expected))


def test_matmul_nbits_layout_short_last_group():
    from squeezer.quant.core import quantize
    from squeezer.quant.spec import QuantSpec

    w = torch.randn(16, 200)
    qt = quantize(w, QuantSpec(4, symmetric=False, granularity="group:64"))
    b, scales, zp = nbits_tensors(qt)
    assert b.shape == (16, 4, 32) and scales.shape == (16, 4) and zp.shape == (16, 2)
    codes = torch.stack([b & 0xF, b >> 4], dim=-1).reshape(16, 256)[:, :200]
    assert torch.equal(codes.to(torch.int8), qt.codes)
    zps = torch.stack([zp & 0xF, zp >> 4], dim=-1).reshape(16, 4)
    assert torch.equal(zps.to(torch.int32), qt.qparams.zero_point)


def test_cnn_static_and_packed_export(tmp_path, cnn, cnn_batches):
    q = squeezer.quantize(cnn, "w8a8-static", calib=cnn_batches)
    squeezer.pack(q, inplace=True)
    path = tmp_path / "cnn.onnx"
    report = squeezer.export_onnx(q, cnn_batches[0][:1], path)
    assert report.layers["conv1"].startswith("DequantizeLinear") and "Conv" in _ops(path)
    with torch.no_grad():
        ref = q(cnn_batches[0])
    out = squeezer.runtime.load(path)(cnn_batches[0])
    assert (out - ref).norm() / ref.norm() < 0.02


def test_cnn_dynamic_runs_integer_convolutions(tmp_path, cnn, cnn_batches):
    q = squeezer.quantize(cnn, "w8a8")  # dynamic int8: one activation scale per sample
    path = tmp_path / "cnn_dynamic.onnx"
    report = squeezer.export_onnx(q, cnn_batches[0], path)
    assert all(report.layers[n].startswith("ConvInteger") for n in ("conv1", "conv2", "conv1d"))
    assert report.layers["fc"].startswith("MatMulInteger") and not report.warnings
    assert {"ConvInteger", "MatMulInteger"} <= _ops(path)
    x = torch.cat([cnn_batches[1][:2] * 10, cnn_batches[1][2:]])  # samples of different ranges
    with torch.no_grad():
        ref = q(x)
    assert (squeezer.runtime.load(path)(x) - ref).norm() / ref.norm() < 1e-5


@pytest.mark.parametrize("activation", [{"bits": 6, "symmetric": False, "granularity": "token"},
                                        {"bits": 4, "granularity": "token"},
                                        {"bits": 8, "signed": False, "granularity": "token"},
                                        {"bits": 8, "granularity": "tensor"},
                                        {"bits": 6, "symmetric": False, "granularity": "tensor"}])
def test_other_dynamic_activations_are_exact_in_float_ops(tmp_path, mlp, mlp_batches, activation):
    cfg = squeezer.QuantConfig(weight={"bits": 8, "granularity": "channel"}, activation=activation,
                               activation_mode="dynamic")
    q = squeezer.quantize(mlp, cfg)
    path = tmp_path / "dyn.onnx"
    report = squeezer.export_onnx(q, mlp_batches[0], path)
    assert "MatMulInteger" not in _ops(path)  # no int8 x int8 kernel for these: float fake quantization, warned
    assert any("float fake-quantization" in w for w in report.warnings)
    x = mlp_batches[1] * torch.logspace(-1, 1, len(mlp_batches[1]))[:, None]  # rows of different ranges
    with torch.no_grad():
        ref = q(x)
    # ONNX Runtime's DequantizeLinear -> MatMulNBits fusion runs with fp32 activations in the runner
    assert (squeezer.runtime.load(path)(x) - ref).norm() / ref.norm() < 1e-5


@pytest.mark.parametrize("signed", [True, False])
def test_asymmetric_per_token_8bit_is_an_exact_integer_gemm(tmp_path, mlp, mlp_batches, signed):
    """``w8a8-asym`` and its unsigned variant: per-row scale and zero point, uint8 codes, MatMulInteger and
    the int32 zero-point correction give squeezer's outputs, on rows of 100x different ranges, one-sided
    rows and a 3-D input."""
    cfg = squeezer.QuantConfig(weight={"bits": 8, "granularity": "channel"}, activation_mode="dynamic",
                               activation={"bits": 8, "symmetric": False, "signed": signed, "granularity": "token"})
    q = squeezer.quantize(mlp, cfg)
    path = tmp_path / "asym.onnx"
    report = squeezer.export_onnx(q, mlp_batches[0].reshape(2, 8, -1), path)  # (batch, tokens, features)
    assert {"QuantizeLinear", "MatMulInteger"} <= _ops(path) and not report.warnings
    assert all("asymmetric" in kind for kind in report.layers.values())
    run = squeezer.runtime.load(path)
    x = (mlp_batches[1] * torch.logspace(-1, 1, len(mlp_batches[1]))[:, None]).reshape(2, 8, -1)
    for inputs in (x, torch.relu(x)):
        with torch.no_grad():
            ref = q(inputs)
        assert (run(inputs) - ref).norm() / ref.norm() < 1e-5


def test_w8a8_tensor_is_onnx_runtimes_dynamic_quantize_matmul(tmp_path):
    import onnxruntime as ort

    q = squeezer.quantize(_model(), "w8a8-tensor")
    path, fused = tmp_path / "t.onnx", tmp_path / "t_opt.onnx"
    report = squeezer.export_onnx(q, torch.randn(2, 5, 96), path)  # 3-D inputs (batch, tokens, features)
    assert all("DynamicQuantizeLinear" in kind for kind in report.layers.values()) and not report.warnings
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(fused)
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    assert "DynamicQuantizeMatMul" in _ops(fused) and "MatMulInteger" not in _ops(fused)
    x = torch.randn(3, 5, 96) * torch.logspace(-1, 1, 5)[:, None]  # tokens of different ranges
    with torch.no_grad():
        ref = q(x)
    out = squeezer.runtime.load(path)(x)
    assert out.shape == ref.shape and (out - ref).norm() / ref.norm() < 1e-5


def test_cnn_dynamic_per_tensor_is_exact_in_float_ops(tmp_path, cnn, cnn_batches):
    q = squeezer.quantize(cnn, "w8a8-tensor")
    path = tmp_path / "cnn_tensor.onnx"
    report = squeezer.export_onnx(q, cnn_batches[0], path)
    assert report.layers["fc"].startswith("MatMulInteger")
    assert {w.split("'")[1] for w in report.warnings} == {"conv1", "conv2", "conv1d"}
    x = torch.cat([cnn_batches[1][:2] * 10, cnn_batches[1][2:]])
    with torch.no_grad():
        ref = q(x)
    assert (squeezer.runtime.load(path)(x) - ref).norm() / ref.norm() < 1e-5


def test_w8a8_per_token_on_3d_inputs(tmp_path):
    torch.manual_seed(0)
    q = squeezer.quantize(TextModel().eval(), "w8a8")
    path = tmp_path / "t8.onnx"
    squeezer.export_onnx(q, {"input_ids": torch.randint(1, 100, (2, 6)), "attention_mask": torch.ones(2, 6)}, path)
    assert {"QuantizeLinear", "MatMulInteger"} <= _ops(path)
    longer = {"input_ids": torch.randint(1, 100, (3, 9)), "attention_mask": torch.ones(3, 9)}
    with torch.no_grad():
        ref = q(**longer)
    out = squeezer.runtime.load(path)(**longer)
    assert out.shape == ref.shape and (out - ref).norm() / ref.norm() < 1e-5


def test_keyword_inputs_and_embedding(tmp_path):
    torch.manual_seed(0)
    model = TextModel().eval()
    q = squeezer.quantize(model, "w8")
    ids = torch.randint(1, 100, (2, 6))
    example = {"input_ids": ids, "attention_mask": torch.ones(2, 6)}
    path = tmp_path / "t.onnx"
    report = squeezer.export_onnx(q, example, path)
    assert "Gather int8 rows" in report.layers["embed"]
    run = squeezer.runtime.load(path)
    quiet = squeezer.runtime.load(path, threads=1, spinning=False)
    assert quiet.session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"
    longer = {"input_ids": torch.randint(1, 100, (3, 9)), "attention_mask": torch.ones(3, 9)}
    with torch.no_grad():
        ref = q(**longer)
    assert (run(**longer) - ref).norm() / ref.norm() < 0.02
    assert torch.equal(quiet(**longer), run(**longer))
    with pytest.raises(ModelError, match="no input 'ids'"):
        run(ids=ids)


def test_export_errors(tmp_path, mlp):
    with pytest.raises(ModelError, match="no quantized layers"):
        squeezer.export_onnx(mlp, torch.randn(1, 40), tmp_path / "x.onnx")
    conv = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(ConfigError, match="'0'.*padding"):
        squeezer.export_onnx(squeezer.quantize(conv, "w8"), torch.randn(1, 1, 5, 5), tmp_path / "c.onnx")
    assert not list(tmp_path.iterdir()), "a failed export leaves no file behind"
    with pytest.raises(ModelError, match="does not exist"):
        squeezer.runtime.load(tmp_path / "missing.onnx")


def test_cli_export_from_quantize_checkpoint(tmp_path):
    from typer.testing import CliRunner

    from squeezer.cli import app

    runner = CliRunner()
    np.save(tmp_path / "calib.npy", np.random.default_rng(0).standard_normal((20, 40)).astype(np.float32))
    ckpt, onnx_path = tmp_path / "ckpt", tmp_path / "m.onnx"
    result = runner.invoke(app, ["quantize", "--model", "tests.conftest:MLP", "--preset", "w8a8",
                                 "--calib", str(tmp_path / "calib.npy"), "--out", str(ckpt)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["export", str(ckpt), "--model", "tests.conftest:MLP", "--format", "onnx", "--out", str(onnx_path), "--json"])
    assert result.exit_code == 0, result.output
    assert set(json.loads(result.stdout)["layers"]) == {"fc1", "fc2", "head"}
    loaded = squeezer.load(ckpt, model=__import__("tests.conftest", fromlist=["MLP"]).MLP)
    x = torch.randn(4, 40)
    with torch.no_grad():
        assert torch.allclose(squeezer.runtime.load(onnx_path)(x), loaded(x), rtol=1e-3, atol=1e-4)
    bad = runner.invoke(app, ["export", str(ckpt), "--format", "coreml", "--out", str(tmp_path / "m.mlmodel")])
    assert bad.exit_code == 2 and "unknown export format 'coreml'" in bad.output


def test_compact_export_same_outputs_smaller_file_layer_names(tmp_path):
    from squeezer.runtime import load as load_runtime

    model = _model()
    q = squeezer.quantize(model, "w8a8-static", calib=[torch.randn(16, 96) for _ in range(2)])
    x = torch.randn(3, 96)
    plain, compact = tmp_path / "plain.onnx", tmp_path / "compact.onnx"
    squeezer.export_onnx(q, torch.randn(1, 96), plain, compact=False)
    squeezer.export_onnx(q, torch.randn(1, 96), compact)
    assert compact.stat().st_size < plain.stat().st_size
    assert np.array_equal(load_runtime(str(compact))(x.numpy()), load_runtime(str(plain))(x.numpy()))
    graph = onnx.load(str(compact)).graph
    assert not [n for n in graph.node if n.op_type == "Constant"]  # all constants are initializers
    assert [i.name for i in graph.input] == ["input"] and [o.name for o in graph.output] == ["output"]
    # the quantized layers' nodes are named after their modules ("2", "2#1", ...), the rest unnamed
    assert {n.name.split("#")[0] for n in graph.node if n.op_type == "DequantizeLinear"} == {"0", "2", "4"}
    onnx.checker.check_model(onnx.load(str(compact)))


def test_compact_onnx_deduplicates_and_keeps_subgraph_names():
    from onnx import TensorProto, helper

    from squeezer.exporters.onnx.compact import compact_onnx, module_of

    assert module_of("/encoder/layer.0/attention/self/query/MatMul") == "encoder.layer.0.attention.self.query"
    assert module_of("/Relu_1") == ""
    two = helper.make_tensor("v", TensorProto.FLOAT, [], [2.0])
    big = helper.make_tensor("w", TensorProto.FLOAT, [10, 10], [1.0] * 100)  # above SHARED_MAX_ELEMENTS: not shared
    eye = helper.make_tensor("h", TensorProto.FLOAT, [10, 10], np.eye(10, dtype=np.float32).reshape(-1).tolist())
    nodes = [helper.make_node("Constant", [], ["/a/c0"], name="/a/Constant", value=two),
             helper.make_node("Constant", [], ["/b/c1"], name="/b/Constant", value=two),
             helper.make_node("Constant", [], ["/a/w"], name="/a/Constant_1", value=big),
             helper.make_node("Constant", [], ["/b/w"], name="/b/Constant_1", value=big),
             helper.make_node("Constant", [], ["/a/h"], name="/a/Constant_2", value=eye),
             helper.make_node("Constant", [], ["/b/h"], name="/b/Constant_2", value=eye),
             helper.make_node("Mul", ["x", "/a/c0"], ["/a/m"], name="/a/Mul"),
             helper.make_node("Mul", ["/a/m", "/b/c1"], ["/b/m"], name="/b/Mul"),
             helper.make_node("Add", ["/b/m", "/a/w"], ["/a/s"], name="/a/Add"),
             helper.make_node("Add", ["/a/s", "/b/w"], ["/b/s"], name="/b/Add"),
             helper.make_node("MatMul", ["/b/s", "/a/h"], ["/a/r"], name="/a/MatMul"),
             helper.make_node("MatMul", ["/a/r", "/b/h"], ["y"], name="/b/MatMul")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [10, 10])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [10, 10])])
    m = compact_onnx(helper.make_model(graph))
    assert len(m.graph.initializer) == 4
    assert [n.op_type for n in m.graph.node] == ["Mul", "Mul", "Add", "Add", "MatMul", "MatMul"]
    assert [n.name for n in m.graph.node] == ["a", "b", "a#1", "b#1", "a#2", "b#2"]
    scalar = m.graph.node[0].input[1]
    assert m.graph.node[1].input[1] == scalar and m.graph.node[2].input[1] != m.graph.node[3].input[1]
    assert m.graph.node[4].input[1] == m.graph.node[5].input[1]  # equal float MatMul weights: one copy
    onnx.checker.check_model(m)
    import onnxruntime as ort
    x = np.arange(100, dtype=np.float32).reshape(10, 10)
    y = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.array_equal(y, x * 4 + 2)
    # a node with a subgraph: constants still become initializers, names stay as they were
    branch = helper.make_graph([helper.make_node("Identity", ["/a/c0"], ["o"])], "b", [],
                               [helper.make_tensor_value_info("o", TensorProto.FLOAT, [])])
    cond = helper.make_node("If", ["x"], ["y"], name="/if", then_branch=branch, else_branch=branch)
    graph = helper.make_graph([nodes[0], cond], "g", [helper.make_tensor_value_info("x", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])])
    m = compact_onnx(helper.make_model(graph))
    assert [t.name for t in m.graph.initializer] == ["/a/c0"] and m.graph.node[0].name == "/if"

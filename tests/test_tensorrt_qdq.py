"""TensorRT's QDQ conventions on squeezer's ONNX export: the checker, and an engine build where a GPU is present."""

from __future__ import annotations

import importlib.util

import onnx
import pytest
import torch

import squeezer
from squeezer import ModelError
from squeezer import export
from squeezer.exporters.onnx.tensorrt import (
    TENSORRT_CONFIG,
    check_tensorrt,
    tensorrt_violations,
)

# why each preset is not in TensorRT's form (a phrase one of its violations contains)
REJECTED = {"w8a8-static": "zero point", "w8": "com.microsoft", "w8a8": "MatMulInteger", "kmeans-w4": "uint8"}


def _export(tmp_path, model, config, batches, name):
    q = squeezer.quantize(model, config, calib=batches)
    path = tmp_path / f"{name}.onnx"
    squeezer.export_onnx(q, batches[0][:1], path)
    return path


def test_symmetric_static_int8_is_ready(tmp_path, mlp, mlp_batches, cnn, cnn_batches):
    for model, batches, name in ((mlp, mlp_batches, "mlp"), (cnn, cnn_batches, "cnn")):
        path = _export(tmp_path, model, TENSORRT_CONFIG, batches, name)
        assert tensorrt_violations(path) == [], name
        check_tensorrt(path)
        ops = {n.op_type for n in onnx.load(str(path)).graph.node}
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops


@pytest.mark.parametrize("preset", list(REJECTED))
def test_other_presets_are_rejected_with_reasons(tmp_path, mlp, mlp_batches, preset):
    path = _export(tmp_path, mlp, preset, mlp_batches, preset)
    problems = tensorrt_violations(path)
    assert problems and any(REJECTED[preset] in p for p in problems)
    with pytest.raises(ModelError, match=f"{path.name}.*not ready for TensorRT"):
        check_tensorrt(path)


def test_export_dispatches_onnx_also_for_float_models(tmp_path, mlp, mlp_batches):
    path = tmp_path / "fp32.onnx"
    assert export(mlp, mlp_batches[0], path).layers == {}  # plain fp32: no quantized layer needed
    x = mlp_batches[1]
    with torch.no_grad():
        ref = mlp(x)
    assert float((squeezer.runtime.load(path)(x) - ref).norm() / ref.norm()) < 1e-5
    q = squeezer.quantize(mlp, "w8a8")
    report = export(q, mlp_batches[0], tmp_path / "q.bin", format="onnx")
    assert set(report.layers) == {"fc1", "fc2", "head"}
    with pytest.raises(ModelError, match="no quantized layers"):
        squeezer.export_onnx(mlp, mlp_batches[0], tmp_path / "strict.onnx")


def test_checker_flags_each_convention():
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(torch.ones(4, 3, dtype=torch.int8).numpy(), "w")  # MatMul B (K=4, N=3)
    scales = numpy_helper.from_array(torch.full((4,), 0.1).numpy(), "s")  # per channel on axis 0: the input axis
    zero = numpy_helper.from_array(torch.zeros(4, dtype=torch.int8).numpy(), "z")
    nodes = [helper.make_node("DequantizeLinear", ["w", "s", "z"], ["wq"], axis=0),
             helper.make_node("MatMul", ["x", "wq"], ["y"], name="mm")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])], [w, scales, zero])
    problems = tensorrt_violations(helper.make_model(graph))
    assert any("input 0 ('x') has no Q/DQ" in p for p in problems)
    assert any("axis 0, not on the output axis 1" in p for p in problems)


def test_tensorrt_builds_an_engine(tmp_path, mlp, mlp_batches):
    if importlib.util.find_spec("tensorrt") is None:
        pytest.skip("the tensorrt package is not installed (it needs an NVIDIA GPU)")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT needs an NVIDIA GPU; none is visible")
    import tensorrt as trt

    path = _export(tmp_path, mlp, TENSORRT_CONFIG, mlp_batches, "mlp")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse(path.read_bytes()), [parser.get_error(i).desc() for i in range(parser.num_errors)]
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape("input", (1, 40), (16, 40), (64, 40))
    config.add_optimization_profile(profile)
    assert builder.build_serialized_network(network, config) is not None

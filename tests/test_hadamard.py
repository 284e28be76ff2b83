"""Hadamard input rotation: the rotation itself, function preservation, lower error on outlier columns,
rotated statistics, chains (first step only), and the paths that carry it (save / load, pack, ONNX,
TFLite, ExecuTorch)."""

from __future__ import annotations

import copy
import importlib.util
import json

import pytest
import torch
from torch import nn

import squeezer
from squeezer import ConfigError, ModelError
from squeezer.algorithms import LayerStats, make_algorithm
from squeezer.config import PRESETS
from squeezer.resolve import resolve_config
from squeezer.modules.layers import QuantLinear
from squeezer.quant.rotation import hadamard, rotate, rotate_butterfly, rotation_block

from .conftest import MLP


def _stats(x: torch.Tensor) -> LayerStats:
    stats = LayerStats(x.shape[1])
    stats.update(x)
    return stats


def _outlier_layer(k: int = 256, n: int = 96, seed: int = 0) -> tuple[nn.Linear, torch.Tensor, torch.Tensor]:
    """A layer whose weight has a few very large input columns (the case rotation is for)."""
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) / k**0.5)
        lin.weight[:, [5, 70, 140, 200]] *= 25
    return lin, torch.randn(1024, k, generator=g), torch.randn(512, k, generator=g)


def _layer(lin: nn.Linear, preset: str) -> QuantLinear:
    q = QuantLinear.from_float(copy.deepcopy(lin), PRESETS[preset].scheme)
    q.calibrate_weight()
    return q


def _rel_error(lin: nn.Linear, q: QuantLinear, test: torch.Tensor) -> float:
    with torch.no_grad():
        ref, out = lin(test), q(test)
    return float(((ref - out) ** 2).sum() / (ref**2).sum())


def test_hadamard_is_symmetric_orthonormal_and_rotation_is_its_own_inverse():
    for b in (1, 2, 8, 128):
        h = hadamard(b)
        assert torch.allclose(h, h.T) and torch.allclose(h @ h, torch.eye(b), atol=1e-6)
        assert torch.allclose(h.abs(), torch.full((b, b), b**-0.5))
    x = torch.randn(3, 5, 384)
    h = hadamard(128)
    assert torch.allclose(rotate(rotate(x, h), h), x, atol=1e-5)
    assert torch.allclose(rotate_butterfly(x, 128), rotate(x, h), atol=1e-5)  # the exports' form
    blocks = rotate(x, h).reshape(3, 5, 3, 128)
    assert torch.allclose(blocks[..., 1, :], x.reshape(3, 5, 3, 128)[..., 1, :] @ h)  # block-diagonal
    assert [rotation_block(k, 128) for k in (384, 1536, 96, 40, 10, 7)] == [128, 128, 32, 8, 2, 1]
    assert rotation_block(384, 64) == 64
    with pytest.raises(ValueError, match="power-of-two"):
        hadamard(12)


def test_rotation_preserves_the_float_function_and_reports_against_the_given_weights(mlp):
    x = torch.randn(7, 40)
    q = squeezer.quantize(mlp, "w8-hadamard", calib=[x])
    assert (q.fc1.input_rotation, q.fc2.input_rotation, q.head.input_rotation) == (8, 4, 4)  # 40 = 8*5, 300 = 4*75
    assert torch.allclose(q.fc2.effective_weight(), mlp.fc2.weight, atol=0.02)
    assert not torch.allclose(q.fc2.weight, mlp.fc2.weight, atol=0.02)  # the stored weight is the rotated one
    squeezer.modules.set_mode(q, "float")
    with torch.no_grad():
        assert torch.allclose(q(x), mlp(x), atol=1e-5)
    squeezer.modules.set_mode(q, "simulate")
    assert all(layer.weight_error.sqnr_db > 35 for layer in (q.fc1, q.fc2, q.head))


@pytest.mark.parametrize("preset,algorithm", [("w4g128", "hadamard"), ("w4g128", "hadamard+gptq"), ("w3g128", "hadamard+gptq")])
def test_rotation_beats_the_unrotated_grid_on_outlier_columns(preset, algorithm):
    lin, x, test = _outlier_layer()
    rotated = _layer(lin, preset)
    make_algorithm(algorithm).quantize_layer(rotated, _stats(x))
    plain = _layer(lin, preset)
    make_algorithm(algorithm.replace("hadamard+", "").replace("hadamard", "rtn")).quantize_layer(plain, _stats(x))
    assert rotated.input_rotation == 64 and plain.input_rotation == 1  # the default block
    assert _rel_error(lin, rotated, test) < 0.5 * _rel_error(lin, plain, test)


def test_rotated_stats_equal_stats_of_rotated_inputs():
    _, x, _ = _outlier_layer()
    x = x * torch.linspace(0.1, 3.0, x.shape[1])
    h = hadamard(128)
    got, want = _stats(x).rotated(h), _stats(rotate(x, h))
    for name in ("xtx", "sum", "sample"):
        a, b = getattr(got, name), getattr(want, name)
        assert (a - b).abs().max() <= 1e-5 * b.abs().max(), name
    assert got.count == want.count
    assert torch.all(got.abs_max <= want.abs_max + 1e-6)  # the sample's maxima: never above the true ones
    assert torch.allclose(got.mean_abs(), want.mean_abs(), rtol=1e-4)  # every row is in the sample here


def test_chain_is_rotation_then_gptq_on_the_rotated_inputs():
    lin, x, _ = _outlier_layer()
    chained = _layer(lin, "w4g128")
    make_algorithm("hadamard+gptq").quantize_layer(chained, _stats(x))
    by_hand = _layer(lin, "w4g128")
    make_algorithm("hadamard").quantize_layer(by_hand, _stats(x))
    make_algorithm("gptq").quantize_layer(by_hand, _stats(rotate(x, hadamard(64))))  # the default block
    assert torch.allclose(chained.quantized_weight(), by_hand.quantized_weight(), atol=1e-5)


def test_rotation_only_as_the_first_step():
    assert resolve_config("w4g128-hadamard+gptq").algorithm == "hadamard+gptq"
    with pytest.raises(ConfigError, match="'hadamard' rotates the layer's input and must be the first step"):
        resolve_config("w4g128-gptq+hadamard")
    with pytest.raises(ConfigError, match="hadamard: block must be a power of two"):
        make_algorithm("hadamard", {"block": 48})
    lin, x, _ = _outlier_layer()
    q = _layer(lin, "w4g128")
    q.input_scale = torch.ones(lin.in_features)
    with pytest.raises(ConfigError, match="before any other input transform"):
        make_algorithm("hadamard").quantize_layer(q, None)
    assert not make_algorithm("hadamard").applies_to(_layer(nn.Linear(7, 3), "w8"))  # 7: no power-of-two block


@pytest.mark.parametrize("preset,tol", [("w8a8-hadamard+smoothquant", 1e-5), ("w4g128-hadamard+gptq", 0.05)])
def test_save_load_pack_and_onnx_carry_the_rotation(tmp_path, mlp, mlp_batches, preset, tol):
    q = squeezer.quantize(mlp, preset, calib=mlp_batches)
    x = mlp_batches[0]
    with torch.no_grad():
        expected = q(x)
    squeezer.save(q, tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / "manifest.json").read_text())["layers"]["fc2"]["input_rotation"] == 4
    loaded = squeezer.load(tmp_path / "ckpt", MLP)
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)
    packed = squeezer.load(tmp_path / "ckpt", MLP, packed=True)
    with torch.no_grad():
        assert float((packed(x) - expected).norm() / expected.norm()) < tol
    path = tmp_path / "m.onnx"
    squeezer.export_onnx(q, x[:1], path)
    import onnx

    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("MatMul") >= 3  # one H_b product per layer
    out = squeezer.runtime.load(path)(x)
    assert float((torch.as_tensor(out) - expected).norm() / expected.norm()) < tol


def test_checkpoint_with_a_bad_rotation_names_the_layer(tmp_path, mlp, mlp_batches):
    from typer.testing import CliRunner

    from squeezer.cli import app
    from squeezer.io.checkpoint import TENSORS
    from squeezer.io.manifest import digest

    squeezer.save(squeezer.quantize(mlp, "w8-hadamard"), tmp_path / "ckpt")
    info = CliRunner().invoke(app, ["info", str(tmp_path / "ckpt")])
    assert info.exit_code == 0 and "Hadamard" in info.stdout
    manifest = tmp_path / "ckpt" / "manifest.json"
    data = json.loads(manifest.read_text())
    data["layers"]["fc2"]["input_rotation"] = 16  # does not divide 300
    data["sha256"] = digest(data, tmp_path / "ckpt" / TENSORS)  # forged: the content check must still refuse it
    manifest.write_text(json.dumps(data))
    with pytest.raises(ModelError, match="checkpoint layer 'fc2': input_rotation 16"):
        squeezer.load(tmp_path / "ckpt", MLP)


MISSING_EXTRA = {"tflite": any(importlib.util.find_spec(m) is None for m in ("litert_torch", "ai_edge_litert")),
                 "executorch": importlib.util.find_spec("executorch") is None}


@pytest.mark.parametrize("fmt,suffix,preset,tol", [("tflite", "tflite", "w8a8-hadamard", 1e-4),
                                                   ("executorch", "pte", "w8a8-static-hadamard", 1e-3)])
def test_tflite_and_executorch_carry_the_rotation(tmp_path, mlp, mlp_batches, fmt, suffix, preset, tol):
    if MISSING_EXTRA[fmt]:
        pytest.skip(f"needs the {fmt} extra: pip install 'squeezer[{fmt}]'")
    q = squeezer.quantize(mlp, preset, calib=mlp_batches)
    path = tmp_path / f"m.{suffix}"
    squeezer.export(q, mlp_batches[0], path)
    with torch.no_grad():
        ref = q(mlp_batches[1])
    out = squeezer.runtime.load(path)(mlp_batches[1])
    assert float((torch.as_tensor(out) - ref).norm() / ref.norm()) < tol


def test_onnx_file_holds_one_hadamard_matrix_per_block_size(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 8)).eval()
    x = torch.randn(4, 256)
    q = squeezer.quantize(model, "w8a8-hadamard", calib=[x])
    path = tmp_path / "m.onnx"
    squeezer.export_onnx(q, x, path)
    import onnx

    matrices = [t for t in onnx.load(str(path)).graph.initializer if list(t.dims) == [64, 64]]  # the default block
    assert len(matrices) == 1
    with torch.no_grad():
        expected = q(x)
    assert float((torch.as_tensor(squeezer.runtime.load(path)(x)) - expected).norm() / expected.norm()) < 1e-5

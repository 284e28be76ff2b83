"""ExecuTorch export: squeezer's int8 codes and scales are in the .pte, the runner matches the model."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest
import torch

import squeezer
from squeezer import ConfigError, QuantConfig
from squeezer import export
from squeezer.modules import quant_layers
from squeezer.prune import magnitude_prune

from .conftest import MLP, export_per_tensor_dynamic, export_per_token_asymmetric

needs_executorch = pytest.mark.skipif(importlib.util.find_spec("executorch") is None,
                                      reason="needs the executorch extra: pip install 'squeezer[executorch]'")


def _rel(out, ref) -> float:
    return float((torch.as_tensor(out) - ref).norm() / ref.norm())


def _assert_file_holds_squeezers_integers(path, model) -> None:
    """Each layer's int8 codes and float32 scales are whole tensors of the program: portable constants
    (padded to 16 bytes) or XNNPACK's named data."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    pte = deserialize_pte_binary(path.read_bytes())
    blobs = [bytes(b.storage) for b in pte.program.constant_buffer] + (list(pte.named_data.buffers) if pte.named_data else [])

    def held(t: torch.Tensor) -> bool:
        return any(b.startswith(t.numpy().tobytes()) and len(b) - t.nbytes < 16 for b in blobs)

    for name, layer in quant_layers(model).items():
        qt = layer.weight_qtensor()
        assert held(qt.codes.to(torch.int8)), f"{name}: codes"
        assert held(qt.qparams.scale.float().reshape(-1)), f"{name}: scales"


@needs_executorch
def test_mlp_static_int8(tmp_path, mlp, mlp_batches):
    q = squeezer.quantize(mlp, "w8a8-static", calib=mlp_batches)
    path = tmp_path / "mlp.pte"
    report = export(q, mlp_batches[0], path)
    # fc2's output reaches head's quantizer through a ReLU: XNNPACK int8; fc1 (then LayerNorm) and head: portable
    assert report.layers["fc2"].endswith("XNNPACK") and report.layers["head"].endswith("portable kernels")
    assert not report.warnings
    _assert_file_holds_squeezers_integers(path, q)
    run = squeezer.runtime.load(path)
    for x in (mlp_batches[1], mlp_batches[2][:5]):  # dynamic batch
        with torch.no_grad():
            ref = q(x)
        out = run(x)
        assert isinstance(out, torch.Tensor) and out.shape == ref.shape and _rel(out, ref) < 1e-3
    assert isinstance(run(mlp_batches[1].numpy()), np.ndarray)


@needs_executorch
def test_cnn_static_is_exact(tmp_path, cnn, cnn_batches):
    q = squeezer.quantize(cnn, "w8a8-static", calib=cnn_batches)
    path = tmp_path / "cnn.pte"
    export(q, cnn_batches[0][:1], path)
    _assert_file_holds_squeezers_integers(path, q)
    x = cnn_batches[1]
    with torch.no_grad():
        ref = q(x)
    assert _rel(squeezer.runtime.load(path)(x), ref) < 1e-4  # portable q / dq + float ops: squeezer's arithmetic


@needs_executorch
def test_dynamic_and_float_fallback_warn(tmp_path, mlp, mlp_batches):
    cfg = QuantConfig(weight={"bits": 8}, activation={"bits": 8, "granularity": "token"}, activation_mode="dynamic",
                      overrides={"^head$": {"weight": {"bits": 4, "symmetric": False, "signed": False, "granularity": "group:64"},
                                            "activation": None, "activation_mode": "none"}})
    q = squeezer.quantize(mlp, cfg)
    with pytest.raises(ConfigError, match="'head'.*uint4 asym group\\(64\\).*ExecuTorch"):
        export(q, mlp_batches[0], tmp_path / "bad.pte")
    assert not list(tmp_path.iterdir())  # nothing half-written
    path = tmp_path / "dyn.pte"
    report = export(q, mlp_batches[0], path, unsupported="float", max_batch=8)
    assert [w.split("'")[1] for w in report.warnings] == ["fc1", "fc2", "head"]
    assert "nearest" in report.warnings[0] and "float32" in report.warnings[2]
    x = torch.cat(mlp_batches[:2])  # 32 rows through a program planned for 8: blocks of 8
    with torch.no_grad():
        ref = q(x)
    assert _rel(squeezer.runtime.load(path)(x), ref) < 0.03  # XNNPACK's per-row asymmetric int8


@needs_executorch
def test_dynamic_per_tensor_runs_per_row_with_a_warning(tmp_path, mlp, mlp_batches):
    export_per_tensor_dynamic(tmp_path, mlp, mlp_batches, "pte", "per row in XNNPACK's GEMMs): the nearest supported")


@needs_executorch
def test_asymmetric_per_token_runs_as_xnnpack_rows_with_a_warning(tmp_path, mlp, mlp_batches):
    export_per_token_asymmetric(tmp_path, mlp, mlp_batches, "pte", "per row in XNNPACK's GEMMs): the nearest supported",
                                0.03)


@needs_executorch
def test_pruned_float_model(tmp_path, mlp_batches):
    torch.manual_seed(0)
    model = MLP().eval()
    magnitude_prune(model, 0.5)
    path = tmp_path / "pruned.pte"
    assert export(model, mlp_batches[0], path).layers == {}
    with torch.no_grad():
        ref = model(mlp_batches[1])
    assert _rel(squeezer.runtime.load(path)(mlp_batches[1]), ref) < 1e-5
    with pytest.raises(ConfigError, match="max_batch"):
        export(model, mlp_batches[0], tmp_path / "m.pte", max_batch=0)


def test_missing_extra_names_it(tmp_path, monkeypatch, mlp, mlp_batches):
    q = squeezer.quantize(mlp, "w8")
    monkeypatch.setitem(sys.modules, "executorch.exir", None)  # import fails
    monkeypatch.setitem(sys.modules, "executorch.runtime", None)
    with pytest.raises(ConfigError, match=r"pip install 'squeezer\[executorch\]'"):
        export(q, mlp_batches[0], tmp_path / "m.pte")
    (tmp_path / "m.pte").write_bytes(b"ET")
    with pytest.raises(ConfigError, match=r"pip install 'squeezer\[executorch\]'"):
        squeezer.runtime.load(tmp_path / "m.pte")


@needs_executorch
def test_static_model_with_embedding(tmp_path):
    from .test_onnx import TextModel

    torch.manual_seed(0)
    model = TextModel().eval()
    calib = [{"input_ids": torch.randint(1, 100, (2, 6)), "attention_mask": torch.ones(2, 6)} for _ in range(3)]
    q = squeezer.quantize(model, "w8a8-static", calib=calib)
    path = tmp_path / "text.pte"
    report = export(q, calib[0], path)  # token ids reach the embedding unquantized
    assert "weight-only" in report.layers["embed"] and "static" in report.layers["proj"]
    assert not any("'embed'" in w for w in report.warnings)
    _assert_file_holds_squeezers_integers(path, q)
    with torch.no_grad():
        ref = q(**calib[1])
    assert _rel(squeezer.runtime.load(path)(calib[1]["input_ids"], calib[1]["attention_mask"]), ref) < 1e-3

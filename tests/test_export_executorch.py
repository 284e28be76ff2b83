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
def test_static_layers_before_a_dropout_run_in_xnnpack(tmp_path):
    """Linear -> ReLU -> Dropout -> next quantizer (the credit model's blocks): in eval mode the dropout
    is the identity and is left out of the program, so both hidden layers fuse into XNNPACK's int8 GEMM
    instead of running float ops on dequantized weights; the user's model keeps its dropouts."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Dropout(0.2),
                                torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Dropout(0.2),
                                torch.nn.Linear(32, 1)).eval()
    batches = [torch.randn(64, 16) for _ in range(4)]
    q = squeezer.quantize(model, "w8a8-static", calib=batches)
    path = tmp_path / "dropout.pte"
    report = export(q, batches[0][:1], path, max_batch=1)
    assert report.layers["0"].endswith("XNNPACK") and report.layers["3"].endswith("XNNPACK"), report.layers
    assert report.layers["6"].endswith("portable kernels")  # its output has no squeezer grid
    assert isinstance(q[2], torch.nn.Dropout) and isinstance(q[5], torch.nn.Dropout)
    run = squeezer.runtime.load(path)
    x = batches[1][:1]
    with torch.no_grad():
        assert _rel(run(x), q(x)) < 1e-3


@needs_executorch
def test_weight_only_linear_runs_in_xnnpack_or_exactly_on_request(tmp_path, mlp, mlp_batches, cnn, cnn_batches):
    """w8 Linear layers: XNNPACK's dynamic int8 GEMM on squeezer's codes by default (its int8 input rows
    are not in squeezer's model: warned, within the dynamic tolerance); ``weight_only="exact"``: float
    inputs on portable kernels, squeezer's arithmetic. A convolution keeps the exact form."""
    q = squeezer.quantize(mlp, "w8")
    x = mlp_batches[1]
    with torch.no_grad():
        ref = q(x)
    fast, exact = tmp_path / "fast.pte", tmp_path / "exact.pte"
    report = export(q, mlp_batches[0], fast)
    assert all(report.layers[n].endswith("XNNPACK") for n in ("fc1", "fc2", "head")), report.layers
    assert any("fc1, fc2, head: weight-only in squeezer" in w and "weight_only='exact'" in w for w in report.warnings)
    _assert_file_holds_squeezers_integers(fast, q)
    assert 1e-5 < _rel(squeezer.runtime.load(fast)(x), ref) < 0.03
    report = export(q, mlp_batches[0], exact, weight_only="exact")
    assert all(report.layers[n].endswith("portable kernels") for n in ("fc1", "fc2", "head")) and not report.warnings
    assert _rel(squeezer.runtime.load(exact)(x), ref) < 1e-5
    qc = squeezer.quantize(cnn, "w8")
    report = export(qc, cnn_batches[0][:1], tmp_path / "cnn.pte", max_batch=4)
    assert report.layers["conv1"].endswith("portable kernels") and "conv1" not in " ".join(report.warnings)
    with pytest.raises(ConfigError, match="weight_only must be one of dynamic, exact"):
        export(q, mlp_batches[0], tmp_path / "bad.pte", weight_only="float")
    assert not (tmp_path / "bad.pte").exists()


@needs_executorch
def test_cnn_static_is_exact(tmp_path, cnn, cnn_batches):
    # the batch norm kept between conv1 and its ReLU keeps every conv on portable kernels, codes stored as they are
    q = squeezer.quantize(cnn, "w8a8-static", calib=cnn_batches, fold_bn=False)
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
    magnitude_prune(model, 0.5, inplace=True)
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


@needs_executorch
def test_cli_weight_only_option(tmp_path):
    import json

    from typer.testing import CliRunner

    from squeezer.cli import app

    np.save(tmp_path / "x.npy", torch.randn(64, 40, generator=torch.Generator().manual_seed(3)).numpy())
    runner = CliRunner()
    done = runner.invoke(app, ["quantize", "--model", "tests.conftest:MLP", "--preset", "w8", "--calib",
                               str(tmp_path / "x.npy"), "--out", str(tmp_path / "ck")])
    assert done.exit_code == 0, done.output
    for mode, kernels in (("exact", "portable kernels"), ("dynamic", "XNNPACK")):
        result = runner.invoke(app, ["export", str(tmp_path / "ck"), "--model", "tests.conftest:MLP", "--out", str(tmp_path / f"{mode}.pte"), "--json",
                                     "--weight-only", mode])
        assert result.exit_code == 0, result.output
        layers = json.loads(result.stdout[result.stdout.index("{"):])["layers"]
        assert all(kind.endswith(kernels) for kind in layers.values()), layers
    bad = runner.invoke(app, ["export", str(tmp_path / "ck"), "--out", str(tmp_path / "m.onnx"), "--weight-only", "exact"])
    assert bad.exit_code == 2 and "not understood by the onnx export" in bad.output

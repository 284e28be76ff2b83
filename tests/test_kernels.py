"""Packed execution: every path equals the dequantized reference; choice, sizes, freeing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from squeezer.transform import report_of
import squeezer
from squeezer import QuantConfig, QuantSpec
from squeezer.kernels import PATHS, LinearProblem, PackedWeight
from squeezer.kernels.select import BUCKETS, bucket_of

SHAPES = [(64, 200), (48, 128), (32, 96)]  # K = 200 is not a multiple of the int4 group (64)
ROWS = [1, 3, 17, 300]


def _problem(preset_or_cfg, n: int, k: int, calib: bool = True) -> tuple[LinearProblem, torch.Tensor, torch.Tensor]:
    torch.manual_seed(n * k)
    layer = nn.Linear(k, n)
    q = squeezer.quantize(nn.Sequential(layer), preset_or_cfg, calib=[torch.randn(32, k)] if calib else None)
    ql = q[0]
    qt = ql.weight_qtensor()
    problem = LinearProblem(PackedWeight.from_qtensor(qt), ql.bias.detach(), ql.scheme, ql.act_qparams)
    return problem, qt.dequantize(), ql


def _reference(problem: LinearProblem, w_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Float activations times the dequantized weight: what every path approximates."""
    return torch.nn.functional.linear(x, w_hat, problem.bias)


CASES = [("w8", "int8_weight_bf16"), ("w4g128", "int4_weight_bf16"),
         (QuantConfig(weight=QuantSpec(4, symmetric=False, granularity="group:64"), name="w4g64"), "int4_weight_bf16"),
         ("w8a8", "int_mm"), ("w8a8", "fbgemm_dynamic"), ("w8a8-static", "int_mm"), ("w8a8", "int8_codes_bf16"),
         (QuantConfig(QuantSpec(8, granularity="channel:0"), QuantSpec(8, granularity="tensor"), activation_mode="static",
                      name="w8a8-static-sym"), "int8_codes_bf16"),
         ("w8a8-tensor", "int_mm"), ("w8a8-tensor", "fbgemm_dynamic"), ("w8a8-asym", "int_mm"),
         ("w8a8-tensor", "int8_codes_bf16"), ("w8a8-asym", "int8_codes_bf16"), ("w8a8-static", "int8_codes_bf16"),
         ("w8a8-asym", "fbgemm_dynamic"),
         ("w2g64", "dequant_matmul"), ("kmeans-w4", "dequant_matmul"), ("w8", "dequant_matmul")]


@pytest.mark.parametrize("cfg, path_name", CASES, ids=[f"{c if isinstance(c, str) else c.name}-{p}" for c, p in CASES])
@pytest.mark.parametrize("n, k", SHAPES)
def test_each_path_matches_dequantized_reference(cfg, path_name, n, k):
    problem, w_hat, layer = _problem(cfg, n, k)
    path = next(p for p in PATHS if p.name == path_name)
    for m in ROWS:
        if not path.eligible(problem, m):
            continue
        x = torch.randn(m, k)
        state = path.prepare(problem)
        y = path.run(state, x)
        ref = _reference(problem, w_hat, x)
        rel = (y - ref).norm() / ref.norm()
        # bf16 activations / int8 activations cost < 1 %; exact float paths ~1e-7
        assert rel < (0.02 if path.name != "dequant_matmul" else 1e-5) or problem.scheme.activation_mode != "none"
        if problem.scheme.activation_mode != "none":
            assert rel < 0.03
            with torch.no_grad():
                sim = layer(x)
            if path.name == "int_mm":  # same integers as the simulated layer: equal up to float rounding
                assert torch.allclose(y, sim, rtol=1e-4, atol=1e-4)
            elif path.name == "int8_codes_bf16":  # the same integers (less the zero point), the sum rounded to bf16
                assert (y - sim).norm() / sim.norm() < 4e-3
            elif cfg in ("w8a8-tensor", "w8a8-asym") and path.name == "fbgemm_dynamic":  # fbgemm's scheme is squeezer's (asymmetric uint8
                # over the tensor = over the one row), but for the zero point's rounding
                assert (y - sim).norm() / sim.norm() < 2e-3


def test_int8_weight_bf16_keeps_each_channel_scale_in_float32():
    """bf16 activations round each product a little, but no output channel may be off by a constant
    factor: per channel the least-squares gain of the output over the reference is 1 to 1e-3 (a scale
    rounded to bf16 is off by up to 2^-8 = 4e-3)."""
    problem, w_hat, _ = _problem("w8", 64, 128)
    path = next(p for p in PATHS if p.name == "int8_weight_bf16")
    x = torch.randn(300, 128).bfloat16().float()  # exact in bf16: only the kernel's own rounding is left
    y = path.run(path.prepare(problem), x)
    ref = _reference(problem, w_hat, x)
    y, ref = y - problem.bias, ref - problem.bias
    gain = (y * ref).sum(0) / (ref * ref).sum(0)
    assert (gain - 1).abs().max() < 1e-3, (gain - 1).abs().max()


def test_eligibility_rules(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_vnni_supported", lambda: True)  # fbgemm's rules on a VNNI CPU
    p4, _, _ = _problem("w4g128", 64, 200)
    names = {p.name for p in PATHS if p.eligible(p4, 1)}
    assert "int4_weight_bf16" not in names, "K = 200 is not a multiple of the group: no int4 kernel"
    p8w, _, _ = _problem("w8", 64, 200)
    assert {p.name for p in PATHS if p.eligible(p8w, 1)} == {"dequant_matmul"}, "int8pack_mm is wrong for K % 16 != 0"
    p4, _, _ = _problem("w4g128", 40, 256)
    assert not any(p.name == "int4_weight_bf16" and p.eligible(p4, 1) for p in PATHS), "N % 16 != 0"
    p8, _, _ = _problem("w8a8", 64, 128)
    fb = next(p for p in PATHS if p.name == "fbgemm_dynamic")
    assert fb.eligible(p8, 1) and not fb.eligible(p8, 8), "per-tensor fbgemm only equals per-token for one row"
    assert {p.name for p in PATHS if p.eligible(p8, 8)} == {"int_mm", "int8_codes_bf16", "dequant_matmul"}
    pt, _, _ = _problem("w8a8-tensor", 64, 128)
    assert all({p.name for p in PATHS if p.eligible(pt, m)} == {"int_mm", "fbgemm_dynamic", "int8_codes_bf16", "dequant_matmul"}
               for m in ROWS), "per-tensor uint8 activations: fbgemm's own scheme at every batch size"
    signed = QuantConfig(QuantSpec(8, granularity="channel:0"), QuantSpec(8, granularity="tensor"), activation_mode="dynamic")
    ps, _, _ = _problem(signed, 64, 128)
    assert not fb.eligible(ps, 8) and fb.eligible(ps, 1) is False, "symmetric per-tensor is not fbgemm's scheme"
    monkeypatch.setattr(torch.cpu, "_is_vnni_supported", lambda: False)
    assert not fb.eligible(pt, 1), "without VNNI fbgemm's int16 pair sums saturate"


def test_int_mm_dynamic_per_tensor_uses_the_whole_input_range():
    problem, _, layer = _problem("w8a8-tensor", 32, 96)
    path = next(p for p in PATHS if p.name == "int_mm")
    x = torch.randn(20, 96) * torch.logspace(-2, 1, 20)[:, None]  # rows of very different ranges
    y = path.run(path.prepare(problem), x)
    with torch.no_grad():
        assert torch.allclose(y, layer(x), rtol=1e-4, atol=1e-4)
        per_row = torch.cat([layer(r[None]) for r in x])  # each row alone: its own range, other codes
    assert not torch.allclose(y, per_row, rtol=1e-4, atol=1e-4)


def test_int_mm_unsigned_symmetric_per_tensor_shifts_codes_exactly():
    """uint8 codes with no zero point: shifted to int8 by 128 and corrected by ``128 colsum(W_q)``."""
    cfg = QuantConfig(QuantSpec(8, granularity="channel:0"), QuantSpec(8, signed=False, granularity="tensor"),
                      activation_mode="dynamic")
    problem, _, layer = _problem(cfg, 32, 96)
    path = next(p for p in PATHS if p.name == "int_mm")
    assert path.eligible(problem, 8)
    x = torch.relu(torch.randn(20, 96))
    with torch.no_grad():
        assert torch.allclose(path.run(path.prepare(problem), x), layer(x), rtol=1e-4, atol=1e-5)
    per_token = QuantConfig(QuantSpec(8, granularity="channel:0"), QuantSpec(8, signed=False, granularity="token"),
                            activation_mode="dynamic")
    token_problem, _, _ = _problem(per_token, 32, 96)
    assert not path.eligible(token_problem, 8), "unsigned symmetric per token has no +-127 integer form here"


def test_int_mm_asymmetric_per_token_is_exact_and_uses_one_sided_ranges():
    """Each row gets its own scale and zero point: equal to the simulated layer on rows of 100x different
    ranges, and on one-sided (post-GELU) rows closer to float than symmetric per-token codes."""
    torch.manual_seed(0)
    path = next(p for p in PATHS if p.name == "int_mm")
    asym, w_hat, layer = _problem("w8a8-asym", 32, 96)
    x = torch.nn.functional.gelu(torch.randn(20, 96) * 3) * torch.logspace(-1, 1, 20)[:, None]
    y = path.run(path.prepare(asym), x)
    with torch.no_grad():
        assert torch.allclose(y, layer(x), rtol=1e-4, atol=1e-5)
    sym, _, _ = _problem("w8a8", 32, 96)
    sym.weight = asym.weight  # same weight codes: only the activation grid differs
    ref = _reference(asym, w_hat, x)
    y_sym = path.run(path.prepare(sym), x)
    assert (y - ref).norm() < 0.75 * (y_sym - ref).norm()


@pytest.mark.parametrize("preset", list(squeezer.PRESETS))
def test_packed_model_matches_simulated(preset):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32)).eval()
    q = squeezer.quantize(model, preset, calib=[torch.randn(16, 64) for _ in range(2)])
    x1, x3 = torch.randn(1, 64), torch.randn(2, 3, 64)
    with torch.no_grad():
        sim1, sim3 = q(x1), q(x3)
    rows = report_of(squeezer.pack(q, inplace=True)).layers
    assert q[0].weight is None and all(m.mode == "packed" for m in squeezer.modules.quant_layers(q).values())
    with torch.no_grad():
        out1, out3 = q(x1), q(x3)
    assert out3.shape == (2, 3, 32)
    for sim, out in ((sim1, out1), (sim3, out3)):
        assert (out - sim).norm() / sim.norm() < 0.03
    for row in rows:
        if preset in {"w8", "w8a8", "w8a8-asym", "w8a8-tensor", "w8a8-static"} or (preset == "w4g128" and row.name == "2"):
            assert row.warning is None, (row.name, row.kernels)
        elif preset == "w4g128":  # K = 64 < group 128 gives one short group: not the kernel's layout
            assert row.warning and "no integer kernel" in row.warning
        else:
            assert row.warning and "no integer kernel" in row.warning


def test_packing_frees_float_weights_and_sizes(mlp):
    q = squeezer.quantize(mlp, "w4g128")
    rows = report_of(squeezer.pack(q, inplace=True)).layers
    fp32 = sum(p.numel() * 4 for n, p in mlp.named_parameters() if n.endswith("weight") and p.dim() == 2)
    assert all(name not in dict(q.named_parameters()) for name in ("fc1.weight", "fc2.weight", "head.weight"))
    packed = sum(r.runtime_bytes for r in rows)
    assert packed < fp32 / 3, "int4 weights plus the kernel layout stay far below fp32"


def test_save_from_packed_and_load_packed(tmp_path, mlp):
    q = squeezer.quantize(mlp, "w8a8")
    squeezer.pack(q, inplace=True)
    squeezer.save(q, tmp_path / "p")
    loaded = squeezer.load(tmp_path / "p", model=type(mlp), packed=True)
    x = torch.randn(5, 40)
    assert torch.equal(q(x), loaded(x))
    with pytest.raises(RuntimeError, match="'fc1' is packed"):
        squeezer.modules.set_mode(loaded, "simulate")


def test_cnn_and_embedding_pack(cnn, cnn_batches):
    from .conftest import TextModel

    q = squeezer.quantize(cnn, "w8", calib=cnn_batches)
    with torch.no_grad():
        sim = q(cnn_batches[0])
        rows = report_of(squeezer.pack(q, inplace=True)).layers
        out = q(cnn_batches[0])
        assert (out - sim).norm() / sim.norm() < 0.01  # fc may run on bf16 activations
    assert next(r for r in rows if r.name == "conv1").warning.startswith("no integer convolution")
    torch.manual_seed(0)
    text = TextModel().eval()
    asym_rows = QuantConfig(QuantSpec(8, symmetric=False, granularity="channel:0"))
    for preset in ("w8", "w4g128", "kmeans-w4", asym_rows):
        q = squeezer.quantize(text, preset)
        ids, mask = torch.randint(0, 100, (3, 7)), torch.ones(3, 7)
        with torch.no_grad():
            sim, sim_rows = q(ids, mask), q.embed(ids)
            squeezer.pack(q, inplace=True)
            assert torch.equal(q.embed(ids), sim_rows), "gathered rows are exact"
            out = q(ids, mask)
            assert (out - sim).norm() / sim.norm() < 0.01


def test_kernel_choice_is_cached_on_disk(tmp_path, monkeypatch):
    import json

    from squeezer.kernels import select

    monkeypatch.setenv("SQUEEZER_CACHE_DIR", str(tmp_path))
    problem, _, _ = _problem("w8a8", 48, 96)
    first = select.timed_choice(problem, PATHS)
    saved = [json.loads(f.read_text()) for f in (tmp_path / "kernels").glob("*.json")]
    assert sorted(e["key"]["bucket"] for e in saved) == [0, 1, 2, 3]
    assert all(e["path"] == first[e["key"]["bucket"]] for e in saved)
    calls = []
    monkeypatch.setattr(select, "time_paths", lambda *a, **k: calls.append(a) or {})
    assert select.timed_choice(problem, PATHS) == first and not calls
    assert [bucket_of(m) for m in (1, 2, 16, 17, 128, 129)] == [0, 1, 1, 2, 2, 3] and len(BUCKETS) == 4

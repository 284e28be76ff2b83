"""The sliced, in-place uniform quantizer gives exactly ``clip(round(x / S) + Z)`` of whole tensors, and the int4
kernel's layout written by squeezer is the kernel's own, byte for byte."""

from __future__ import annotations

import pytest
import torch

from squeezer.kernels.paths import INT4_CPU, _int4pack
from squeezer.quant import core
from squeezer.quant.blocks import from_blocks, to_blocks
from squeezer.quant.core import code_dtype, compute_qparams, fake_quantize, quantize
from squeezer.quant.spec import QuantSpec

SPECS = [QuantSpec(8, granularity="channel"), QuantSpec(4, symmetric=False, granularity="group:32"),
         QuantSpec(3, symmetric=False, granularity="group:48"), QuantSpec(8, symmetric=False, granularity="tensor")]


def _whole(x: torch.Tensor, spec: QuantSpec, dequantize: bool) -> torch.Tensor:
    """The formula on whole fp32 blocks, one full-size temporary per step."""
    qp = compute_qparams(x, spec)
    b = to_blocks(x.float(), spec.granularity)
    scale = qp.scale.reshape(-1, 1)
    zero = 0 if qp.zero_point is None else qp.zero_point.reshape(-1, 1)
    q = torch.clamp(torch.round(b.data / scale) + zero, spec.qmin, spec.qmax)
    if dequantize:
        return from_blocks((q - zero) * scale, x.shape, spec.granularity).to(x.dtype)
    return from_blocks(q, x.shape, spec.granularity).to(code_dtype(spec))


@pytest.mark.parametrize("slice_elements", [50, 1000, core.SLICE])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
def test_sliced_quantizer_equals_the_whole_tensor_formula(spec, dtype, slice_elements, monkeypatch):
    monkeypatch.setattr(core, "SLICE", slice_elements)  # 50: rows and columns both sliced
    torch.manual_seed(0)
    x = (torch.randn(37, 200) * 3).to(dtype)  # 200 = 4 groups of 48 + a padded one
    qp = compute_qparams(x, spec)
    qt = quantize(x, spec, qp)
    assert qt.codes.dtype == code_dtype(spec) and qt.codes.is_contiguous()
    assert torch.equal(qt.codes, _whole(x, spec, dequantize=False))
    x_hat = fake_quantize(x, spec, qp)
    assert x_hat.dtype == dtype and torch.equal(x_hat, _whole(x, spec, dequantize=True))


@pytest.mark.skipif(not hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"), reason="no int4 CPU kernel")
@pytest.mark.parametrize("n", [64, 96, 112, 2048 + 48])
def test_int4_layout_is_the_kernels_own_bytes(n):
    spec = QuantSpec(4, symmetric=False, granularity="group:128")
    codes = torch.randint(0, 16, (n, 256), dtype=code_dtype(spec), generator=torch.Generator().manual_seed(n))
    held = INT4_CPU.hold(codes, spec)
    assert held is not None and torch.equal(held, _int4pack(codes))

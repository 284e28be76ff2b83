"""A packed layer holds one copy of its codes: the kernel's layout where the codes are recoverable from it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import squeezer
from squeezer.kernels import PATHS, PackedWeight
from squeezer.kernels.base import BIT_PACKED, ONE_BYTE, storage_bytes
from squeezer.kernels.paths import INT4_CPU
from squeezer.quant.core import quantize
from squeezer.quant.spec import QuantSpec


class Stack(nn.Module):
    """Shapes every int8 / int4 kernel takes (K % 128 == 0, N % 16 == 0); 112 rows leave a tail after the int4
    layout's 32- or 64-row blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(256, 96)
        self.b = nn.Linear(256, 112, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x).sum(-1, keepdim=True) + self.b(x)


def _storages(layer) -> dict[int, int]:
    """data_ptr -> bytes of every storage a packed layer's runtime holds (weight + states), bias excluded."""
    runtime = layer.runtime
    held = [*runtime.weight.tensors(), *(t for n, s in runtime.states.items() for t in runtime.paths[n].held(s))]
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in held
            if layer.bias is None or t.untyped_storage().data_ptr() != layer.bias.untyped_storage().data_ptr()}


@pytest.mark.parametrize("n", [64, 96, 112, 2048 + 48])
def test_int4_cpu_layout_gives_the_codes_back_exactly(n):
    torch.manual_seed(n)
    spec = QuantSpec(4, symmetric=False, granularity="group:128")
    qt = quantize(torch.randn(n, 256), spec)
    weight = PackedWeight.from_qtensor(qt).relaid(INT4_CPU)
    assert weight is not None and weight.layout is INT4_CPU
    assert torch.equal(weight.codes(), qt.codes)
    assert torch.equal(weight.packed, PackedWeight.from_qtensor(qt).data)  # same bytes as bit-packing them


@pytest.mark.parametrize("preset, path", [("w8", "int8_weight_bf16"), ("w8a8", "int8_codes_bf16"),
                                          ("w8a8", "int_mm"), ("w4g128", "int4_weight_bf16")])
def test_packed_layer_holds_one_copy_of_its_codes(preset, path):
    torch.manual_seed(0)
    model = Stack()
    q = squeezer.quantize(model, preset, calib=[torch.randn(8, 256)])
    x = torch.randn(3, 256)
    kernels = {"a": path, "b": [path, path, path, "dequant_matmul"]}  # a fallback bucket shares the kernel's copy
    packed = squeezer.pack(q, kernels=kernels)
    reference = squeezer.pack(q, kernels=kernels)
    for name in ("a", "b"):
        layer = getattr(packed, name)
        weight = layer.runtime.weight
        assert weight.layout is {"int4_weight_bf16": INT4_CPU}.get(path, ONE_BYTE)
        code_bytes = weight.data.untyped_storage().nbytes()
        codes = [b for b in _storages(layer).values() if b >= code_bytes]
        assert codes == [code_bytes], "the codes are held once"
        assert layer.runtime.nbytes() == sum(_storages(layer).values())
        assert torch.equal(weight.codes(), getattr(q, name).weight_qtensor().codes)
    assert torch.equal(packed(x), reference(x))
    big = torch.randn(400, 256)  # the dequant_matmul bucket reads the same codes
    assert torch.allclose(packed.b(big), q.b(big), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("preset", ["w8", "w4g128", "w8a8"])
def test_save_load_packed_is_bit_identical(tmp_path, preset):
    torch.manual_seed(1)
    q = squeezer.quantize(Stack(), preset, calib=[torch.randn(8, 256)])
    packed = squeezer.pack(q)
    squeezer.save(packed, tmp_path / "p")
    loaded = squeezer.load(tmp_path / "p", model=Stack, packed=True)
    for name in ("a", "b"):
        saved, back = getattr(packed, name).weight_qtensor(), getattr(loaded, name).weight_qtensor()
        assert torch.equal(saved.codes, back.codes) and torch.equal(saved.qparams.scale, back.qparams.scale)
        assert torch.equal(saved.codes, getattr(q, name).weight_qtensor().codes)
    for rows in (1, 5, 300):
        x = torch.randn(rows, 256)
        assert torch.equal(packed(x), loaded(x))


def test_fallback_only_layer_stays_bit_packed():
    torch.manual_seed(2)
    q = squeezer.quantize(Stack(), "w4g128")
    packed = squeezer.pack(q, kernels={"a": "dequant_matmul", "b": "dequant_matmul"})
    weight = packed.a.runtime.weight
    assert weight.layout is BIT_PACKED and weight.data.numel() == 96 * 256 // 2
    assert packed.a.runtime.nbytes() == storage_bytes(weight.tensors())


def test_paths_that_share_the_codes_name_a_layout():
    assert {p.name for p in PATHS if p.layout is ONE_BYTE} == {"int_mm", "int8_weight_bf16", "int8_codes_bf16"}

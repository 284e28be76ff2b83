"""A new layer type is one quantized class plus one registration (squeezer.modules.register_layer_type)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import squeezer
from squeezer.kernels import packed_kernels, register_packer, unregister_packer
from squeezer.kernels.pack import linear_problem
from squeezer.modules import LayerType, QuantMixin, layer_type_names, register_layer_type, unregister_layer_type
from squeezer.quant.scheme import LayerScheme


class Doubled(nn.Module):
    """A user's own weighted layer: ``y = 2 (x W^T + b)``."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in) / n_in**0.5)
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: Tensor) -> Tensor:
        return 2 * F.linear(x, self.weight, self.bias)


class QuantDoubled(QuantMixin, Doubled):
    """``y = 2 (fq_a(x) fq_w(W)^T + b)``."""

    @classmethod
    def from_float(cls, layer: Doubled, scheme: LayerScheme, copy: bool = True) -> "QuantDoubled":
        new = cls(layer.weight.shape[1], layer.weight.shape[0])
        with torch.no_grad():
            new.weight.copy_(layer.weight)
            new.bias.copy_(layer.bias)
        new._init_quant(scheme)
        return new

    def _op(self, x: Tensor, weight: Tensor) -> Tensor:
        return 2 * F.linear(x, weight, self.bias)


@pytest.fixture
def doubled():
    register_layer_type(LayerType("doubled", QuantDoubled, lambda m: type(m) is Doubled))
    yield
    unregister_layer_type("doubled")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), Doubled(32, 8)).eval()


def test_a_registered_layer_type_is_quantized_like_a_builtin_one(doubled) -> None:
    model, x = _model(), torch.randn(4, 16)
    q = squeezer.quantize(model, "w8", calib=[x], progress=False)
    assert isinstance(q[2], QuantDoubled) and "doubled" in layer_type_names()
    report = squeezer.report_of(q)
    assert {layer.name for layer in report.layers} == {"0", "2"} and not report.skipped
    with torch.no_grad():
        assert not torch.equal(q(x), model(x))  # the quantized weight is what runs
        assert (q(x) - model(x)).norm() / model(x).norm() < 0.02
    only_new = squeezer.quantize(model, {"layer_types": ["doubled"]}, progress=False)
    assert isinstance(only_new[2], QuantDoubled) and type(only_new[0]) is nn.Linear


def test_an_unregistered_layer_type_stays_float_and_is_refused_by_name() -> None:
    q = squeezer.quantize(_model(), "w8", progress=False)
    assert type(q[2]) is Doubled
    assert [s.name for s in squeezer.report_of(q).skipped] == ["2"]
    with pytest.raises(squeezer.ConfigError, match="unknown layer type.*doubled"):
        squeezer.QuantConfig(layer_types=("doubled",))


def test_registry_refuses_duplicates_and_keeps_the_builtin_types(doubled) -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_layer_type(LayerType("doubled", QuantDoubled, lambda m: False))
    with pytest.raises(ValueError, match="built-in"):
        unregister_layer_type("linear")
    assert layer_type_names()[:4] == ("linear", "conv1d", "conv2d", "embedding")


def test_a_registered_type_packs_once_it_names_its_packed_runtime(doubled) -> None:
    model, x = _model(), torch.randn(4, 16)
    q = squeezer.quantize(model, "w8", calib=[x], progress=False)
    with pytest.raises(squeezer.ConfigError, match="layer '2' is a QuantDoubled, which has no packed runtime"):
        squeezer.pack(q)

    def pack_doubled(name, layer, context):
        linear, warning = context.linear(name, linear_problem(layer))
        return _Twice(linear), warning

    register_packer(QuantDoubled, pack_doubled)
    try:
        packed = squeezer.pack(q)
    finally:
        unregister_packer(QuantDoubled)
    assert packed[2].is_packed and packed_kernels(packed)["2"]
    with torch.no_grad():
        assert (packed(x) - q(x)).norm() / q(x).norm() < 0.02  # same codes, kernel rounding apart


class _Twice:
    """A packed runtime built on the linear one: ``2 linear(x)``."""

    def __init__(self, linear) -> None:
        self.linear, self.weight = linear, linear.weight

    def __call__(self, x: Tensor) -> Tensor:
        return 2 * self.linear(x)

    def describe(self) -> dict[str, str]:
        return self.linear.describe()

    def nbytes(self) -> int:
        return self.linear.nbytes()

"""A subclass of a supported torch layer that redefines its function runs its own forward on the quantized weight
(``Quant<Subclass>``), never a plain quantized layer computing something else: simulated, packed, saved / loaded and
exported (ONNX, TFLite, ExecuTorch), each computing the subclass's function; one whose function cannot be reproduced
is refused by name with the reason."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import squeezer
from squeezer.kernels.pack import PackReport
from squeezer.modules import QuantConv2d, QuantLinear
from squeezer.modules.layers import OwnForward


class Conv2dStaticSamePadding(nn.Conv2d):
    """EfficientNet's conv: "same" zero padding computed for a fixed image size, then a conv with padding 0
    (its ``__init__`` takes other arguments than ``nn.Conv2d``'s)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, image_size: int = 8):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, bias=False)
        out = math.ceil(image_size / stride)
        pad = max((out - 1) * stride + kernel_size - image_size, 0)
        self.static_padding = nn.ZeroPad2d((pad // 2, pad - pad // 2, pad // 2, pad - pad // 2))

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(self.static_padding(x), self.weight, self.bias, self.stride, self.padding,
                        self.dilation, self.groups)


class StandardizedConv2d(nn.Conv2d):
    """Weight standardisation: ``W' = (W - mean) / std`` per output channel, through ``_conv_forward`` only."""

    def _conv_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        flat = weight.flatten(1)
        w = ((flat - flat.mean(1, keepdim=True)) / (flat.std(1, keepdim=True) + 1e-5)).view_as(weight)
        return super()._conv_forward(x, w, bias)


class ScaledLinear(nn.Linear):
    """``y = s (x W^T + b)`` with a learned output scale ``s``."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__(n_in, n_out)
        self.scale = nn.Parameter(torch.full((n_out,), 3.0))

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x) * self.scale


class NamedLinear(nn.Linear):
    """A subclass that keeps ``nn.Linear``'s function: quantized as a plain ``QuantLinear``."""


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.same = Conv2dStaticSamePadding(3, 8, 3, stride=2, image_size=8)
        self.std = StandardizedConv2d(8, 8, 3, padding=1)
        self.scaled = ScaledLinear(8 * 4 * 4, 16)
        self.named = NamedLinear(16, 4)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.std(torch.relu(self.same(x))))
        return self.named(torch.relu(self.scaled(x.flatten(1))))


def _rel(a: Tensor, b: Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture
def model_and_input() -> tuple[nn.Module, Tensor]:
    torch.manual_seed(0)
    return Net().eval(), torch.randn(4, 3, 8, 8)


def test_subclasses_run_their_own_forward_on_the_quantized_weight(model_and_input) -> None:
    model, x = model_and_input
    q = squeezer.quantize(model, "w8", calib=[x], progress=False)
    assert type(q.same).__name__ == "QuantConv2dStaticSamePadding" and isinstance(q.same, QuantConv2d)
    assert type(q.std).__name__ == "QuantStandardizedConv2d" and type(q.scaled).__name__ == "QuantScaledLinear"
    assert type(q.named) is QuantLinear  # no redefined function: the plain quantized layer, packable
    assert isinstance(q.same.static_padding, nn.ZeroPad2d) and torch.equal(q.scaled.scale, model.scaled.scale)
    with torch.no_grad():
        out, ref = q(x), model(x)
        assert out.shape == ref.shape and not torch.equal(out, ref)  # the quantized weights run
        assert _rel(out, ref) < 0.02
        for name in ("same", "std", "scaled"):  # each layer alone: its own function, on fq(W)
            layer, float_layer = q.get_submodule(name), model.get_submodule(name)
            inp = torch.randn(2, 3, 8, 8) if name == "same" else torch.randn(2, 8, 4, 4) if name == "std" \
                else torch.randn(2, 128)
            assert _rel(layer(inp), float_layer(inp)) < 0.02
            assert layer.weight is not None and torch.equal(layer.weight, float_layer.weight)  # float weight kept
            layer.mode = "float"
            assert torch.allclose(layer(inp), float_layer(inp))
            layer.mode = "simulate"
    report = squeezer.report_of(q)
    kinds = {layer.name: layer.kind for layer in report.layers}
    assert kinds == {"same": "QuantConv2dStaticSamePadding", "std": "QuantStandardizedConv2d",
                     "scaled": "QuantScaledLinear", "named": "QuantLinear"}
    assert not report.skipped and report.float_params == 8 + 16 + 16 + 4  # biases and the scale stay float
    assert type(model.same) is Conv2dStaticSamePadding  # the input model is untouched


def test_the_quantized_subclass_is_one_class_per_subclass_and_trains(model_and_input) -> None:
    model, x = model_and_input
    a = squeezer.quantize(model, "w8", progress=False)
    b = squeezer.quantize(model, "w8a8", progress=False)
    assert type(a.same) is type(b.same) and issubclass(type(a.same), (OwnForward, Conv2dStaticSamePadding))
    a.train()
    a(x).sum().backward()  # straight-through gradients reach the float weight through the user's forward
    assert a.same.weight.grad is not None and a.same.weight.grad.abs().sum() > 0


SUBCLASS_LAYERS = ("same", "std", "scaled")


def _calib() -> list[Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(4, 3, 8, 8, generator=gen) for _ in range(3)]


@pytest.mark.parametrize("preset", ["w8", "w8a8", "w8a8-static", "w4g128"])
def test_packed_and_loaded_subclass_layers_compute_their_simulation(model_and_input, preset, tmp_path) -> None:
    model, x = model_and_input
    q = squeezer.quantize(model, preset, calib=_calib(), progress=False)
    packed = squeezer.pack(q)
    rows = {r.name: r for r in squeezer.report_of(packed, PackReport).layers}
    assert "Conv2dStaticSamePadding runs its own forward" in rows["same"].warning
    squeezer.save(packed, tmp_path / "ckpt")
    loaded = squeezer.load(tmp_path / "ckpt", Net)
    assert type(loaded.same).__name__ == "QuantConv2dStaticSamePadding" and torch.equal(loaded.scaled.scale, model.scaled.scale)
    with torch.no_grad():
        for name in SUBCLASS_LAYERS:  # each layer alone, on its own input: packed = simulated up to float rounding
            sim, run = q.get_submodule(name), packed.get_submodule(name)
            assert run.is_packed and isinstance(run, OwnForward)
            inp = torch.randn(2, 3, 8, 8) if name == "same" else torch.randn(2, 8, 4, 4) if name == "std" \
                else torch.randn(2, 128)
            assert torch.allclose(run(inp), sim(inp), atol=1e-5, rtol=1e-4), name
        assert torch.equal(loaded(x), q(x))  # a checkpoint restores the simulated model bit for bit
        assert _rel(packed(x), q(x)) < 0.01


@pytest.mark.parametrize("preset", ["w8", "w8a8-static"])
@pytest.mark.parametrize("suffix", ["onnx", "tflite", "pte"])
def test_exported_subclass_layers_run_their_own_forward(model_and_input, preset, suffix, tmp_path) -> None:
    model, x = model_and_input
    q = squeezer.quantize(model, preset, calib=_calib(), progress=False)
    path = tmp_path / f"m.{suffix}"
    report = squeezer.export(q, x, path)
    if suffix == "onnx":
        assert report.layers["same"].startswith("Conv2dStaticSamePadding's own forward on DequantizeLinear")
        import onnx
        graph = onnx.load(str(path)).graph
        ops = [n.op_type for n in graph.node]
        assert "Pad" in ops and ops.count("DequantizeLinear") >= 3  # the padding, around the three subclasses' int8 weights
    runner = squeezer.runtime.load(path)
    with torch.no_grad():
        out, sim, ref = torch.as_tensor(runner(x)), q(x), model(x)
    assert out.shape == ref.shape
    assert _rel(out, sim) < 0.02, _rel(out, sim)  # dynamic-range TFLite also quantizes inputs: a little further
    assert _rel(out, ref) < 0.05


def test_a_subclass_whose_function_cannot_be_reproduced_is_refused_with_the_reason(model_and_input, tmp_path) -> None:
    model, x = model_and_input
    q = squeezer.quantize(model, "w8", progress=False)
    q.scaled.input_scale = torch.full((128,), 0.5)  # as SmoothQuant / AWQ fold W diag(s), x / s
    for action, run in (("pack", lambda: squeezer.pack(q)), ("save", lambda: squeezer.save(q, tmp_path / "c")),
                        ("export_onnx", lambda: squeezer.export(q, x, tmp_path / "m.onnx"))):
        with pytest.raises(squeezer.ConfigError, match=rf"{action}: layer 'scaled' is a ScaledLinear.*input scale.*ignore"):
            run()


def test_ignore_keeps_subclass_layers_float(model_and_input) -> None:
    model, x = model_and_input
    kept = squeezer.quantize(model, {"ignore": list(SUBCLASS_LAYERS)}, progress=False)
    assert type(kept.same) is Conv2dStaticSamePadding
    skipped = {s.name: s.reason for s in squeezer.report_of(kept).skipped}
    assert set(skipped) == set(SUBCLASS_LAYERS) and "ignored by pattern" in skipped["same"]
    packed = squeezer.pack(kept)
    with torch.no_grad():
        assert packed(x).shape == model(x).shape and _rel(packed(x), model(x)) < 0.02

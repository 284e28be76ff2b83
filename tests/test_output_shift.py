"""``squeezer.quantize(..., correct_bias=True)``: each convolution's mean output shift (weight and input rounding,
measured on its own function: depthwise, subclass that pads first) is folded into its bias, so a following batch
norm with a large gain no longer amplifies it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import squeezer
from squeezer.errors import DataError


class PadFirstConv(nn.Conv2d):
    """A depthwise 3x3 convolution that zero-pads in its own forward (padding 0 in the torch layer)."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels, channels, 3, groups=channels, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(F.pad(x, (1, 1, 1, 1)), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _net_with_a_near_dead_channel() -> nn.Module:
    """Conv (depthwise, pads first) -> BN whose channel 0 sees a large mean and a tiny variance on positive
    inputs (gain ``1 / sqrt(var + eps)`` ~ 30), then pooling."""
    torch.manual_seed(0)
    conv = PadFirstConv(8)
    bn = nn.BatchNorm2d(8, eps=1e-3)
    with torch.no_grad():
        conv.weight.uniform_(0.2, 1.0)
        x = torch.rand(64, 8, 12, 12) + 1.0
        y = conv(x)
        bn.running_mean.copy_(y.mean((0, 2, 3)))
        bn.running_var.copy_(y.var((0, 2, 3)))
        bn.running_var[0] = 0.0
    return nn.Sequential(conv, bn, nn.Flatten(1)).eval()


def _rel(a: Tensor, b: Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("preset", ["w8", "w8a8-static"])
def test_correct_bias_removes_the_mean_shift_a_batch_norm_amplifies(preset: str) -> None:
    model = _net_with_a_near_dead_channel()
    calib = [torch.rand(16, 8, 12, 12) + 1.0 for _ in range(4)]
    x = torch.rand(32, 8, 12, 12) + 1.0
    plain = squeezer.quantize(model, preset, calib=calib, progress=False)
    corrected = squeezer.quantize(model, preset, calib=calib, progress=False, correct_bias=True)
    with torch.no_grad():
        ref, before, after = model(x), plain(x), corrected(x)
        mean_shift = lambda out: (out - ref).reshape(32, 8, -1).mean((0, 2)).abs().max().item()  # noqa: E731
    assert corrected[0].bias is not None and model[0].bias is None  # the input model is left untouched
    assert mean_shift(after) < 0.2 * mean_shift(before)
    assert _rel(after, ref) < 0.7 * _rel(before, ref)


def test_correct_bias_keeps_pack_and_tflite_export_in_step(tmp_path) -> None:
    model = _net_with_a_near_dead_channel()
    calib = [torch.rand(16, 8, 12, 12) + 1.0 for _ in range(4)]
    x = torch.rand(8, 8, 12, 12) + 1.0
    q = squeezer.quantize(model, "w8a8-static", calib=calib, progress=False, correct_bias=True)
    packed = squeezer.pack(q)
    path = tmp_path / "net.tflite"
    squeezer.export(q, x[:1], path, calib=calib)
    with torch.no_grad():
        sim, run = q(x), packed(x)
    lite = torch.as_tensor(squeezer.runtime.load(path)(x))
    assert _rel(run, sim) < 0.01 and _rel(lite, sim) < 0.05


def test_correct_bias_needs_calibration_batches() -> None:
    with pytest.raises(DataError, match="correct_bias"):
        squeezer.quantize(_net_with_a_near_dead_channel(), "w8", correct_bias=True)

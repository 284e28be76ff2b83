"""GPTQ: lower layer-output error than round-to-nearest, exact codes, groups, act-order, pipeline."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import squeezer
from squeezer import ConfigError
from squeezer.algorithms import ALGORITHMS, LayerStats, make_algorithm, stages
from squeezer.algorithms.gptq import GPTQ, gptq_quantize, inverse_hessian_factor
from squeezer.algorithms.stats import input_rows
from squeezer.quant.scheme import LayerScheme
from squeezer.modules import quant_layers
from squeezer.modules.layers import QuantConv2d, QuantLinear
from squeezer.quant.core import compute_qparams, fake_quantize, quantize
from squeezer.quant.metrics import sqnr_db
from squeezer.quant.spec import PerChannel, PerGroup, PerTensor, QuantSpec


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small matrices: intra-op threads only add overhead (and thrash on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- helpers
def correlated_inputs(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """``x = z A`` with a random mixing ``A`` and uneven feature scales: ``H`` far from diagonal."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5
    scales = torch.exp(0.5 * torch.randn(k, generator=g))
    return (torch.randn(n, k, generator=g) @ mix) * scales


def stats_of(x: torch.Tensor) -> LayerStats:
    s = LayerStats(x.shape[1])
    s.update(x)
    return s


def out_err(x: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor) -> float:
    return float(((x.double() @ (w.double() - w_hat.double()).T) ** 2).sum())


def rtn(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    return fake_quantize(w, spec, compute_qparams(w, spec))


def naive_gptq(w: torch.Tensor, h: torch.Tensor, spec: QuantSpec, damp: float, act_order: bool) -> torch.Tensor:
    """Unblocked textbook GPTQ (float64, immediate updates), groups by original column index; returns codes."""
    w = w.double().clone()
    h = h.double().clone()
    n, k = w.shape
    dead = torch.diagonal(h) == 0
    h[dead.nonzero()[:, 0], dead.nonzero()[:, 0]] = 1.0
    w[:, dead] = 0
    perm = torch.argsort(torch.diagonal(h), descending=True, stable=True) if act_order else torch.arange(k)
    inv = torch.argsort(perm)
    hp = h[perm][:, perm]
    hp = hp + damp * torch.diagonal(hp).mean() * torch.eye(k, dtype=torch.float64)
    u = torch.linalg.cholesky(torch.linalg.inv(hp), upper=True)
    wp = w[:, perm]
    size = spec.granularity.size if isinstance(spec.granularity, PerGroup) else None
    row_spec = replace(spec, granularity=PerChannel(0)) if size else spec
    fixed = None if size else compute_qparams(w.float(), spec)
    params: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    codes = torch.zeros_like(wp)
    for j in range(k):
        if size:
            grp = int(perm[j]) // size
            if grp not in params:
                cols = torch.arange(grp * size, min(grp * size + size, k))
                qp = compute_qparams(wp[:, inv[cols]].float(), row_spec)
                params[grp] = (qp.scale.double(), torch.zeros(n, dtype=torch.float64) if qp.zero_point is None
                               else qp.zero_point.double())
            s, z = params[grp]
        else:
            s = fixed.scale.double().expand(n)
            z = torch.zeros(n, dtype=torch.float64) if fixed.zero_point is None else fixed.zero_point.double().expand(n)
        q = torch.clamp(torch.round(wp[:, j] / s) + z, spec.qmin, spec.qmax)
        err = (wp[:, j] - (q - z) * s) / u[j, j]
        wp[:, j + 1:] -= err[:, None] * u[j, j + 1:][None, :]
        codes[:, j] = q
    return codes[:, inv]


SPECS = {
    "channel-sym": QuantSpec(bits=4, symmetric=True, granularity=PerChannel(0)),
    "channel-asym": QuantSpec(bits=4, symmetric=False, granularity=PerChannel(0)),
    "group32-asym": QuantSpec(bits=4, symmetric=False, granularity=PerGroup(32)),   # K=200: last group of 8
    "group64-sym": QuantSpec(bits=4, symmetric=True, granularity=PerGroup(64)),
    "tensor-asym": QuantSpec(bits=4, symmetric=False, granularity=PerTensor()),
}


@pytest.fixture(scope="module")
def layer_data():
    torch.manual_seed(0)
    x = correlated_inputs(1600, 200)
    w = torch.randn(48, 200)
    return x, w, stats_of(x).hessian()


# ----------------------------------------------------------------------------- layer-level accuracy
@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("name", list(SPECS))
def test_gptq_beats_rtn_on_layer_output(layer_data, name, act_order, bits):
    x, w, h = layer_data
    spec = replace(SPECS[name], bits=bits)
    result = gptq_quantize(w, h, spec, act_order=act_order)
    ratio = out_err(x, w, result.weight) / out_err(x, w, rtn(w, spec))
    assert ratio <= 1.0
    if bits <= 4:
        assert ratio < 0.75, f"{name} act_order={act_order} {bits} bits: GPTQ/RTN = {ratio:.3f}"


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("name", ["channel-asym", "group32-asym"])
def test_clip_option(layer_data, name, act_order):
    x, w, h = layer_data
    spec = replace(SPECS[name], bits=3)
    plain = gptq_quantize(w, h, spec, act_order=act_order)
    clipped = gptq_quantize(w, h, spec, clip=True, act_order=act_order)
    assert out_err(x, w, clipped.weight) < 0.75 * out_err(x, w, rtn(w, spec))
    assert torch.equal(quantize(clipped.weight, spec, clipped.qparams).codes.float(), clipped.codes)
    if not act_order:  # parameters fixed before any error update: a shrink of the min-max range
        first = slice(None) if name == "channel-asym" else (slice(None), 0)
        assert (clipped.qparams.scale[first] <= plain.qparams.scale[first] * (1 + 1e-6)).all()
        assert (clipped.qparams.scale[first] < plain.qparams.scale[first]).any()


# ----------------------------------------------------------------------------- exactness and shapes
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("name", list(SPECS))
def test_codes_reproduce_and_param_shapes(layer_data, name, act_order):
    _, w, h = layer_data
    spec = SPECS[name]
    result = gptq_quantize(w, h, spec, act_order=act_order, block_size=48)
    expected = {PerChannel: (48,), PerGroup: (48, -(-200 // getattr(spec.granularity, "size", 1))), PerTensor: (1,)}
    assert tuple(result.qparams.scale.shape) == expected[type(spec.granularity)]
    if spec.symmetric:
        assert result.qparams.zero_point is None
    else:
        assert result.qparams.zero_point.shape == result.qparams.scale.shape
        assert result.qparams.zero_point.dtype == torch.int32
    qt = quantize(result.weight, spec, result.qparams)
    assert torch.equal(qt.codes.float(), result.codes)
    assert torch.equal(qt.dequantize(), result.weight)
    assert int(result.codes.min()) >= spec.qmin and int(result.codes.max()) <= spec.qmax


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("name", ["channel-asym", "group32-asym", "group64-sym", "tensor-asym"])
def test_matches_unblocked_reference(layer_data, name, act_order):
    """Lazy batches and groups straddling blocks (group 32 / 64 vs block 24) change nothing."""
    x, w, h = layer_data
    spec = SPECS[name]
    result = gptq_quantize(w, h, spec, act_order=act_order, block_size=24)
    ref = naive_gptq(w, h, spec, 0.01, act_order)
    agree = float((result.codes == ref).double().mean())
    assert agree > 0.995, f"codes agree on {agree:.4f} only"


def test_block_size_does_not_change_result(layer_data):
    x, w, h = layer_data
    spec = SPECS["group32-asym"]
    results = [gptq_quantize(w, h, spec, block_size=b) for b in (1, 7, 32, 128, 1000)]
    for r in results[1:]:
        assert float((r.codes == results[0].codes).double().mean()) > 0.995


@pytest.mark.parametrize("act_order", [False, True])
def test_result_does_not_depend_on_the_hessian_scale(layer_data, act_order):
    """X^T X may stand for H = 2 X^T X / n: the same codes up to float rounding."""
    _, w, h = layer_data
    spec = QuantSpec(bits=4, granularity=PerGroup(32))
    base = gptq_quantize(w, h, spec, act_order=act_order)
    for c in (7.3, 1e-3):
        other = gptq_quantize(w, h * c, spec, act_order=act_order)
        assert float((other.codes == base.codes).double().mean()) > 0.999


def test_inverse_hessian_factor_is_cholesky_of_damped_inverse(layer_data):
    _, _, h = layer_data
    u = inverse_hessian_factor(h, 0.01)
    damped = h + 0.01 * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    assert u.dtype == torch.float32 and torch.equal(u, torch.triu(u)) and (torch.diagonal(u) > 0).all()
    u = u.double()
    assert torch.allclose(u.T @ u @ damped, torch.eye(h.shape[0], dtype=h.dtype), atol=1e-5)
    # a singular Hessian with damp=0 is rescued by raising the damping
    low_rank = torch.randn(10, 40, dtype=torch.float64)
    assert torch.isfinite(inverse_hessian_factor(low_rank.T @ low_rank, 0.0)).all()


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 12), k=st.integers(1, 40), bits=st.integers(2, 8), symmetric=st.booleans(),
    group=st.sampled_from([None, 0, 1, 4, 7, 16]), act_order=st.booleans(), block=st.integers(1, 20),
    clip=st.booleans(), seed=st.integers(0, 2**16),
)
def test_property_codes_reproduce(n, k, bits, symmetric, group, act_order, block, clip, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g)
    x = torch.randn(3 * k + 1, k, generator=g) @ torch.randn(k, k, generator=g)
    x[:, torch.rand(k, generator=g) < 0.2] = 0  # some dead columns
    gran = PerTensor() if group == 0 else (PerChannel(0) if group is None else PerGroup(group))
    spec = QuantSpec(bits=bits, symmetric=symmetric, granularity=gran)
    result = gptq_quantize(w, stats_of(x).hessian(), spec, block_size=block, act_order=act_order, clip=clip)
    assert torch.isfinite(result.weight).all()
    qt = quantize(result.weight, spec, result.qparams)
    assert torch.equal(qt.codes.float(), result.codes)
    assert result.qparams.scale.shape == compute_qparams(w, spec).scale.shape


# ----------------------------------------------------------------------------- layers
def test_linear_layer_and_registry(layer_data):
    x, w, _ = layer_data
    assert ALGORITHMS["gptq"] is GPTQ
    algo = make_algorithm("gptq", {"damp": 0.02, "block_size": 64, "act_order": True, "clip": False})
    lin = nn.Linear(200, 48)
    with torch.no_grad():
        lin.weight.copy_(w)
    layer = QuantLinear.from_float(lin, LayerScheme(weight=SPECS["group32-asym"]))
    assert algo.applies_to(layer)
    algo.quantize_layer(layer, stats_of(x))
    assert torch.equal(layer.quantized_weight(), layer.weight.detach())  # the weight sits on its grid
    assert layer.weight_qparams.scale.shape == (48, 7)
    assert out_err(x, w, layer.weight.detach()) < 0.75 * out_err(x, w, rtn(w, layer.weight_spec))


@pytest.mark.parametrize("options", [{"damp": -1.0}, {"block_size": 0}, {"act_order": "yes"}, {"unknown": 1}])
def test_bad_options(options):
    with pytest.raises(ConfigError):
        make_algorithm("gptq", options)


@pytest.mark.parametrize("spec", [QuantSpec(bits=4, symmetric=False, granularity=PerChannel(0)),
                                  QuantSpec(bits=4, symmetric=False, granularity=PerGroup(32))])
def test_conv2d_layer(spec):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, padding=1)
    mix = torch.randn(8, 8)
    # spatially smooth, channel-correlated images: strongly correlated im2col columns
    img = torch.einsum("nchw,cd->ndhw", F.avg_pool2d(torch.randn(64, 8, 16, 16), 3, 1, 1), mix)
    layer = QuantConv2d.from_float(conv, LayerScheme(weight=spec))
    stats = stats_of(input_rows(layer, img))
    assert stats.xtx.shape == (72, 72)
    w = layer.weight.detach().clone()
    with torch.no_grad():
        ref = conv(img)  # before: the quantized layer shares its weight's storage with `conv`
        err_rtn = float(((conv._conv_forward(img, rtn(w, spec), conv.bias) - ref) ** 2).sum())
    GPTQ().quantize_layer(layer, stats)
    assert layer.weight.shape == (16, 8, 3, 3)
    codes = layer.weight_qtensor().codes
    assert torch.equal(fake_quantize(layer.weight.detach(), spec, layer.weight_qparams), layer.weight.detach())
    assert codes.shape == (16, 8, 3, 3)
    with torch.no_grad():
        err_gptq = float(((layer._op(img, layer.weight) - ref) ** 2).sum())
    assert 0 < err_gptq < 0.8 * err_rtn


def test_grouped_conv_and_codebooks_are_not_treated():
    grouped = QuantConv2d.from_float(nn.Conv2d(4, 4, 3, groups=2), LayerScheme(weight=QuantSpec(bits=4)))
    kmeans = QuantLinear.from_float(nn.Linear(8, 4), LayerScheme(weight=QuantSpec(bits=4, mapping="kmeans")))
    other_axis = QuantLinear.from_float(nn.Linear(8, 4), LayerScheme(weight=QuantSpec(bits=4, granularity=PerChannel(1))))
    assert not any(GPTQ().applies_to(layer) for layer in (grouped, kmeans, other_axis))


# ----------------------------------------------------------------------------- dead columns
def test_dead_input_columns_give_no_nan(layer_data):
    x, w, _ = layer_data
    x = x.clone()
    dead = [0, 3, 50, 199]
    x[:, dead] = 0
    spec = SPECS["group32-asym"]
    for act_order in (False, True):
        result = gptq_quantize(w, stats_of(x).hessian(), spec, act_order=act_order)
        assert torch.isfinite(result.weight).all() and torch.isfinite(result.qparams.scale).all()
        assert (result.weight[:, dead] == 0).all()
        assert out_err(x, w, result.weight) < out_err(x, w, rtn(w, spec))
    silent = gptq_quantize(w, stats_of(torch.zeros(10, 200)).hessian(), spec)
    assert torch.isfinite(silent.weight).all()
    codes = quantize(silent.weight, spec, silent.qparams).codes
    assert torch.equal(codes.float(), silent.codes)


def test_layer_without_statistics_keeps_rtn():
    lin = QuantLinear.from_float(nn.Linear(16, 4), LayerScheme(weight=SPECS["channel-asym"]))
    before = lin.weight.detach().clone()
    GPTQ().quantize_layer(lin, None)
    GPTQ().quantize_layer(lin, LayerStats(16))
    assert torch.equal(lin.weight.detach(), before)
    assert torch.equal(lin.quantized_weight(), rtn(before, lin.weight_spec))


# ----------------------------------------------------------------------------- end to end
class MLP(nn.Module):
    def __init__(self, d_in: int = 64, hidden: int = 256, d_out: int = 16) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, d_out)

    def forward(self, x):
        return self.head(F.gelu(self.fc2(F.gelu(self.fc1(x)))))


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, 2 * d)
        self.down = nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.down(F.gelu(self.up(self.norm(x))))


class Stacked(nn.Module):
    def __init__(self, d_in: int = 64, d: int = 128, n: int = 3) -> None:
        super().__init__()
        self.inp = nn.Linear(d_in, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(n))
        self.out = nn.Linear(d, 16)

    def forward(self, x):
        h = self.inp(x)
        for block in self.blocks:
            h = block(h)
        return self.out(h)


def _sqnr(model: nn.Module, config, calib, held_out) -> float:
    q = squeezer.quantize(model, config, calib=calib, progress=False)
    with torch.no_grad():
        return sqnr_db(model(held_out), q(held_out))


@pytest.mark.parametrize("model_cls", [MLP, Stacked])
@pytest.mark.parametrize("preset", ["w4g128", "w3g128"])
def test_end_to_end_beats_rtn(model_cls, preset):
    torch.manual_seed(0)
    model = model_cls().eval()
    data = correlated_inputs(1536, 64, seed=1)
    calib, held_out = list(data[:1024].split(128)), data[1024:]
    if model_cls is Stacked:
        names = list(quant_layers(squeezer.quantize(model, preset)))
        assert ["blocks.0.up", "blocks.0.down"] in stages(model, names)
    rtn_db = _sqnr(model, preset, calib, held_out)
    gptq_db = _sqnr(model, f"{preset}-gptq", calib, held_out)
    assert gptq_db > rtn_db + 1.0, f"{model_cls.__name__} {preset}: gptq {gptq_db:.2f} dB vs rtn {rtn_db:.2f} dB"


def test_end_to_end_options_and_cnn(cnn, cnn_batches):
    cfg = replace(squeezer.PRESETS["w4g128"], algorithm="gptq", algorithm_options={"act_order": True, "clip": True})
    q = squeezer.quantize(cnn, cfg, calib=cnn_batches, progress=False)
    with torch.no_grad():
        out, ref = q(cnn_batches[0]), cnn(cnn_batches[0])
    assert torch.isfinite(out).all()
    assert sqnr_db(ref, out) > 10
    for layer in quant_layers(q).values():
        assert torch.equal(layer.quantized_weight(), layer.weight.detach()) or getattr(layer, "groups", 1) != 1


def test_kmeans_config_falls_back_to_rtn(mlp, mlp_batches):
    plain = squeezer.quantize(mlp, "kmeans-w4", calib=mlp_batches, progress=False)
    with_gptq = squeezer.quantize(mlp, "kmeans-w4-gptq", calib=mlp_batches, progress=False)
    for (name, a), (_, b) in zip(quant_layers(plain).items(), quant_layers(with_gptq).items()):
        assert not GPTQ().applies_to(b), name
        assert torch.equal(a.quantized_weight(), b.quantized_weight()), name

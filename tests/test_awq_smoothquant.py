"""AWQ and SmoothQuant: function-preserving input scaling, lower output error than round-to-nearest
on layers with outlier input channels, the alpha searches, and the end-to-end paths (quantize,
save / load, pack, ONNX)."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import squeezer
from squeezer import ConfigError
from squeezer.algorithms import ALGORITHMS, LayerStats, make_algorithm
from squeezer.algorithms.awq import AWQ, awq_scales, scaled_error
from squeezer.algorithms.smoothquant import SmoothQuant, layer_output_error, smooth_scales
from squeezer.config import PRESETS, QuantConfig
from squeezer.resolve import resolve_config
from squeezer.modules.layers import QuantConv2d, QuantLinear
from squeezer.quant.metrics import sqnr_db
from squeezer.quant.spec import PerGroup, QuantSpec

OUTLIERS = (3, 77, 150, 201)


def _layer_and_data(k: int = 256, n: int = 128, seed: int = 0, rows: int = 1024, outliers=OUTLIERS):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) / k**0.5)
        lin.bias.copy_(torch.randn(n, generator=g) * 0.1)
    x = torch.randn(rows, k, generator=g)
    test = torch.randn(512, k, generator=g)
    x[:, list(outliers)] *= 50
    test[:, list(outliers)] *= 50
    return lin, x, test


def _quant_layer(lin: nn.Linear, preset: str) -> QuantLinear:
    q = QuantLinear.from_float(copy.deepcopy(lin), PRESETS[preset].scheme)  # from_float shares the weight storage
    q.calibrate_weight()
    return q


def _stats(x: torch.Tensor) -> LayerStats:
    stats = LayerStats(x.shape[1])
    for chunk in x.split(512):
        stats.update(chunk)
    return stats


def _relative_error(lin: nn.Linear, preset: str, algorithm: str | None, x, test, **options) -> float:
    """``||y - y^||^2 / ||y||^2`` on held-out rows of one layer quantized with ``algorithm`` (None: RTN)."""
    q = _quant_layer(lin, preset)
    if algorithm is not None:
        make_algorithm(algorithm, options).quantize_layer(q, _stats(x))
    if q.scheme.activation_mode == "static":
        q.mode = "observe"
        q(x)
        q.freeze_activation()
    q.mode = "simulate"
    with torch.no_grad():
        ref, out = lin(test), q(test)
    return float(((ref - out) ** 2).sum() / (ref**2).sum())


# ----------------------------------------------------------------------------- registry / options
def test_registered_and_presets_resolve():
    assert ALGORITHMS["awq"] is AWQ and ALGORITHMS["smoothquant"] is SmoothQuant
    from squeezer.resolve import resolve_config

    assert resolve_config("w4g128-awq").algorithm == "awq"
    assert resolve_config("w8a8-smoothquant").algorithm == "smoothquant"


@pytest.mark.parametrize("name,options", [
    ("awq", {"grid": 0}), ("awq", {"clip": "yes"}), ("awq", {"bogus": 1}),
    ("smoothquant", {"alpha": 1.5}), ("smoothquant", {"alpha": -0.1}), ("smoothquant", {"grid": 0}),
    ("smoothquant", {"alpha": True}),
])
def test_bad_options_are_config_errors(name, options):
    with pytest.raises(ConfigError, match=name):
        make_algorithm(name, options)


def test_applies_to():
    lin = nn.Linear(16, 8)
    conv = nn.Conv2d(4, 8, 3)
    w4 = QuantLinear.from_float(copy.deepcopy(lin), PRESETS["w4g128"].scheme)
    w8a8 = QuantLinear.from_float(copy.deepcopy(lin), PRESETS["w8a8"].scheme)
    codebook = QuantLinear.from_float(copy.deepcopy(lin), PRESETS["kmeans-w4"].scheme)
    conv_a = QuantConv2d.from_float(conv, PRESETS["w8a8"].scheme)
    assert AWQ().applies_to(w4) and AWQ().applies_to(w8a8)
    assert not AWQ().applies_to(codebook) and not AWQ().applies_to(conv_a)
    assert SmoothQuant().applies_to(w8a8)
    assert not SmoothQuant().applies_to(w4) and not SmoothQuant().applies_to(conv_a)


@pytest.mark.parametrize("name,preset", [("awq", "w4g128"), ("smoothquant", "w8a8")])
def test_no_calibration_rows_keeps_rtn(name, preset):
    lin, _, test = _layer_and_data(k=64, n=32, outliers=(3, 40))
    q = _quant_layer(lin, preset)
    rtn = _quant_layer(lin, preset)
    make_algorithm(name).quantize_layer(q, None)
    assert q.input_scale is None
    assert torch.equal(q(test), rtn(test))


# ----------------------------------------------------------------------------- function preserved
@pytest.mark.parametrize("name,preset,options", [
    ("smoothquant", "w8a8", {}), ("smoothquant", "w8a8-static", {"alpha": None, "grid": 6}), ("smoothquant", "w8a8", {"alpha": 0.9}),
    ("awq", "w4g128", {}), ("awq", "w3g128", {"clip": False}),
])
def test_scaling_preserves_the_float_function(name, preset, options):
    lin, x, test = _layer_and_data()
    q = _quant_layer(lin, preset)
    make_algorithm(name, options).quantize_layer(q, _stats(x))
    assert q.input_scale is not None and q.input_scale.shape == (lin.in_features,)
    assert not torch.allclose(q.input_scale, torch.ones_like(q.input_scale))
    q.mode = "float"
    with torch.no_grad():
        ref, out = lin(test), q(test)
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()
    # the weight given to set_quantized is W diag(s) and its codes are the chosen ones
    assert torch.allclose(q.weight.detach() * q.input_scale, lin.weight, rtol=1e-5, atol=1e-7)
    qt = squeezer.quantize_tensor(q.weight.detach(), q.weight_spec, q.weight_qparams)
    assert torch.equal(qt.dequantize(), q.quantized_weight())


@pytest.mark.parametrize("name,preset", [("smoothquant", "w8a8"), ("awq", "w4g128")])
def test_existing_input_scale_composes(name, preset):
    """Statistics come from the already-smoothed input; the new factor multiplies the old one."""
    lin, x, test = _layer_and_data()
    q = _quant_layer(lin, preset)
    old = torch.linspace(0.5, 2.0, lin.in_features)
    with torch.no_grad():
        q.weight.div_(old)
    q.input_scale = old.clone()
    make_algorithm(name).quantize_layer(q, _stats(x * old))  # what the pipeline's hooks see
    assert not torch.allclose(q.input_scale, old)
    q.mode = "float"
    with torch.no_grad():
        ref, out = lin(test), q(test)
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()


# ----------------------------------------------------------------------------- beats RTN
@pytest.mark.parametrize("preset", ["w8a8", "w8a8-static"])
@pytest.mark.parametrize("alpha", [0.5, None])
def test_smoothquant_beats_rtn_on_outlier_channels(preset, alpha):
    lin, x, test = _layer_and_data()
    rtn = _relative_error(lin, preset, None, x, test)
    sq = _relative_error(lin, preset, "smoothquant", x, test, alpha=alpha, grid=8)
    assert sq < 0.25 * rtn, (sq, rtn)


@pytest.mark.parametrize("preset", ["w4g128", "w3g128"])
@pytest.mark.parametrize("clip", [True, False])
def test_awq_beats_rtn_on_outlier_channels(preset, clip):
    lin, x, test = _layer_and_data()
    rtn = _relative_error(lin, preset, None, x, test)
    awq = _relative_error(lin, preset, "awq", x, test, clip=clip)
    assert awq < 0.5 * rtn, (awq, rtn)
    if clip:
        assert awq <= _relative_error(lin, preset, "awq", x, test, clip=False) * 1.05


def test_awq_hessian_objective_is_the_output_error():
    """``tr(dW H dW^T) = 2/n ||X W^T - (X/s) Q(W diag(s))^T||^2`` (the search's exact shortcut)."""
    lin, x, _ = _layer_and_data(k=128, n=64, rows=512, outliers=(3, 77))
    spec = PRESETS["w4g128"].weight
    w = lin.weight.detach()
    stats = _stats(x)
    s = awq_scales(stats.mean_abs(), 0.5)
    ws = w * s
    direct = ((x @ w.T - (x / s) @ squeezer.fake_quantize(ws, spec).T) ** 2).sum().double()
    via_h = scaled_error(w.double(), s.double(), spec, stats.hessian())
    assert via_h == pytest.approx(float(2 * direct / x.shape[0]), rel=1e-3)


# ----------------------------------------------------------------------------- alpha searches
@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 10_000), factor=st.sampled_from([1.0, 5.0, 50.0]),
       bits=st.sampled_from([3, 4]), group=st.sampled_from([32, 64]), grid=st.integers(1, 12))
def test_awq_search_never_worse_than_identity(seed, factor, bits, group, grid):
    lin, x, _ = _layer_and_data(k=128, n=48, seed=seed, rows=256, outliers=(5, 60))
    x[:, [5, 60]] *= factor / 50
    spec = QuantSpec(bits=bits, symmetric=False, granularity=PerGroup(group))
    stats = _stats(x)
    h = stats.hessian().float()
    algo = AWQ(grid=grid)
    alpha, s, errors = algo.search(lin.weight.detach(), stats.mean_abs(), h, spec)
    assert algo.alphas()[0] == 0.0 and len(errors) == max(grid, 1)
    assert torch.equal(awq_scales(stats.mean_abs(), 0.0), torch.ones(128))
    assert min(errors) == errors[algo.alphas().index(alpha)] <= errors[0]
    assert scaled_error(lin.weight.detach(), s, spec, h) <= scaled_error(lin.weight.detach(), torch.ones(128), spec, h)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), factor=st.sampled_from([1.0, 10.0, 50.0]),
       preset=st.sampled_from(["w8a8", "w8a8-static"]), grid=st.integers(2, 8))
def test_smoothquant_search_never_worse_than_alpha0_or_identity(seed, factor, preset, grid):
    lin, x, _ = _layer_and_data(k=64, n=32, seed=seed, rows=256, outliers=(1, 40))
    x[:, [1, 40]] *= factor / 50
    q = _quant_layer(lin, preset)
    w = lin.weight.detach()
    rows = x
    alpha, s, errors = SmoothQuant(alpha=None, grid=grid).search(q, rows, w, x.abs().amax(0))
    best = layer_output_error(q, rows, w, s)
    assert best == min(errors.values())
    assert best <= errors[0.0] and best <= errors[None]
    assert best <= layer_output_error(q, rows, w, smooth_scales(x.abs().amax(0), w, 0.0))


@pytest.mark.parametrize("preset", ["w8a8", "w8a8-tensor"])
def test_default_smoothquant_searches_and_is_no_worse_than_paper_alpha_or_none(preset):
    """The default picks alpha per layer among the grid and the identity: its layer error on the calibration rows
    is at most that of the paper's fixed 0.5 and of no smoothing."""
    assert SmoothQuant().alpha is None
    lin, x, _ = _layer_and_data(k=64, n=32, seed=3, rows=256, outliers=(1, 40))
    w = lin.weight.detach()
    errors = {}
    for options in ({}, {"alpha": 0.5}):
        q = _quant_layer(lin, preset)
        make_algorithm("smoothquant", options).quantize_layer(q, _stats(x))
        s = None if q.input_scale is None else 1.0 / q.input_scale
        errors[str(options)] = layer_output_error(q, x, w, s)
    assert errors["{}"] <= errors["{'alpha': 0.5}"]
    assert errors["{}"] <= layer_output_error(_quant_layer(lin, preset), x, w, None)


def test_smooth_scales_dead_channels():
    act = torch.tensor([0.0, 1.0, 4.0, 9.0])
    w = torch.tensor([[1.0, 0.0, 1.0, 1.0]])
    s = smooth_scales(act, w, 0.5)
    assert s[0] == 1.0 and s[1] == 1.0 and s[2] == pytest.approx(2.0) and s[3] == pytest.approx(3.0)


# ----------------------------------------------------------------------------- end to end
class OutlierMLP(nn.Module):
    def __init__(self, d_in: int = 256, hidden: int = 128, d_out: int = 16) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _outlier_inputs(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 256, generator=g)
    x[:, list(OUTLIERS)] *= 50
    return x


@pytest.fixture(scope="module")
def e2e():
    torch.manual_seed(0)
    model = OutlierMLP().eval()
    with torch.no_grad():  # inputs with a few huge features: scale fc1's weights to keep activations sane
        model.fc1.weight.div_(8)
    calib = list(_outlier_inputs(256, 1).split(64))
    test = _outlier_inputs(256, 2)
    with torch.no_grad():
        ref = model(test)
    return model, calib, test, ref


E2E = [("w8a8-smoothquant", "w8a8"), ("w8a8-static-smoothquant", "w8a8-static"), ("w4g128-awq", "w4g128")]


@pytest.fixture(scope="module")
def quantized(e2e):
    model, calib, _, _ = e2e
    presets = {p for pair in E2E for p in pair}
    return {p: squeezer.quantize(model, p, calib=calib, progress=False) for p in presets}


@pytest.mark.parametrize("algo,base", E2E)
def test_end_to_end_beats_rtn(e2e, quantized, algo, base):
    model, _, test, ref = e2e
    with torch.no_grad():
        out_algo, out_rtn = quantized[algo](test), quantized[base](test)
    gain = sqnr_db(ref, out_algo) - sqnr_db(ref, out_rtn)
    assert gain > (5.0 if "smoothquant" in algo else 2.0), (algo, sqnr_db(ref, out_algo), sqnr_db(ref, out_rtn))
    assert quantized[algo].fc1.input_scale is not None
    assert squeezer.report_of(quantized[algo]).config["algorithm"] == algo.rsplit("-", 1)[1]
    # the float function is unchanged
    squeezer.modules.set_mode(quantized[algo], "float")
    try:
        with torch.no_grad():
            assert torch.allclose(quantized[algo](test), ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    finally:
        squeezer.modules.set_mode(quantized[algo], "simulate")


@pytest.mark.parametrize("algo", ["w8a8-smoothquant", "w8a8-static-smoothquant", "w4g128-awq"])
def test_save_load_pack_and_onnx(tmp_path, e2e, quantized, algo):
    model, _, test, _ = e2e
    q = quantized[algo]
    with torch.no_grad():
        expected = q(test)
    squeezer.save(q, tmp_path / "ckpt")
    loaded = squeezer.load(tmp_path / "ckpt", lambda: OutlierMLP().eval())
    assert loaded.fc1.input_scale is not None
    with torch.no_grad():
        assert torch.equal(loaded(test), expected)
    packed = squeezer.load(tmp_path / "ckpt", lambda: OutlierMLP().eval(), packed=True)
    with torch.no_grad():
        out = packed(test)
    assert (out - expected).norm() / expected.norm() < 0.03
    path = tmp_path / "m.onnx"
    squeezer.export_onnx(q, test[:1], path)
    out = squeezer.runtime.load(path)(test)
    assert (out - expected).norm() / expected.norm() < 0.03


def test_algorithm_options_through_config(e2e):
    model, calib, test, ref = e2e
    cfg = QuantConfig.from_dict({**PRESETS["w8a8"].to_dict(), "algorithm": "smoothquant",
                                 "algorithm_options": {"alpha": None, "grid": 5}})
    q = squeezer.quantize(model, cfg, calib=calib, progress=False)
    assert q.fc1.input_scale is not None
    with pytest.raises(ConfigError):
        squeezer.quantize(model, {**PRESETS["w4g128"].to_dict(), "algorithm": "awq",
                                  "algorithm_options": {"grid": -1}}, calib=calib, progress=False)


def test_awq_with_static_activations_runs_stage_by_stage(e2e, quantized):
    """Treated layers run in ``simulate`` while later stages are calibrated: static activations
    get a range from the pipeline by then; the final observer range replaces it afterwards."""
    model, calib, test, ref = e2e
    q = squeezer.quantize(model, "w8a8-static-awq", calib=calib, progress=False)
    rtn = quantized["w8a8-static"]
    with torch.no_grad():
        assert sqnr_db(ref, q(test)) > sqnr_db(ref, rtn(test))
    observed = q.fc1.act_observer.qparams()
    assert torch.equal(q.fc1.act_qparams.scale, observed.scale)


# ----------------------------------------------------------------------------- chains ("smoothquant+gptq")
def test_scaled_stats_equal_stats_of_scaled_inputs():
    _, x, _ = _layer_and_data()
    d = torch.linspace(-2.0, 3.0, x.shape[1])
    got, want = _stats(x).scaled(d), _stats(x * d)
    for name in ("xtx", "sum", "abs_sum", "abs_max", "sample"):  # up to float rounding of the sums
        a, b = getattr(got, name), getattr(want, name)
        assert (a - b).abs().max() <= 1e-5 * b.abs().max(), name
    assert got.count == want.count


def test_chain_is_smoothquant_then_gptq_on_the_smoothed_inputs():
    """The chain's result equals SmoothQuant, then GPTQ given the statistics of ``x / s`` by hand."""
    lin, x, test = _layer_and_data()
    chained = _quant_layer(lin, "w8a8")
    make_algorithm("smoothquant+gptq", {"gptq": {"act_order": True}}).quantize_layer(chained, _stats(x))
    by_hand = _quant_layer(lin, "w8a8")
    make_algorithm("smoothquant").quantize_layer(by_hand, _stats(x))
    make_algorithm("gptq", {"act_order": True}).quantize_layer(by_hand, _stats(x * by_hand.input_scale))
    assert torch.equal(chained.input_scale, by_hand.input_scale)
    assert torch.allclose(chained.quantized_weight(), by_hand.quantized_weight(), atol=1e-6)
    # GPTQ's rounding of the smoothed weight beats round-to-nearest of it on the smoothed inputs
    sq_only = _quant_layer(lin, "w8a8")
    make_algorithm("smoothquant").quantize_layer(sq_only, _stats(x))
    xs = x * chained.input_scale
    w_s = lin.weight.detach() / chained.input_scale

    def err(q: QuantLinear) -> float:
        return float(((xs @ (w_s - q.quantized_weight()).T) ** 2).sum())

    assert err(chained) < 0.9 * err(sq_only)


def test_chain_names_and_options():
    cfg = resolve_config("w8a8-smoothquant+gptq")
    assert cfg.algorithm == "smoothquant+gptq" and cfg.activation == PRESETS["w8a8"].activation
    assert make_algorithm("smoothquant+gptq").name == "smoothquant+gptq"
    with pytest.raises(ConfigError, match="unknown algorithm 'gpt' in 'smoothquant\\+gpt'"):
        resolve_config("w8a8-smoothquant+gpt")
    with pytest.raises(ConfigError, match="repeats a step"):
        make_algorithm("gptq+gptq")
    with pytest.raises(ConfigError, match="options are given per step"):
        make_algorithm("smoothquant+gptq", {"act_order": True})
    with pytest.raises(ConfigError, match="algorithm 'gptq': bad options"):
        make_algorithm("smoothquant+gptq", {"gptq": {"nope": 1}})

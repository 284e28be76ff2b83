"""squeezer.quantize end to end: every preset on an MLP and a CNN, batches, reports, errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import squeezer
from squeezer import ConfigError, DataError, QuantConfig, QuantSpec
from squeezer.quant.scheme import LayerScheme
from squeezer.modules import QuantConv1d, QuantConv2d, QuantEmbedding, QuantLinear, quant_layers, set_mode
from squeezer.quant.metrics import sqnr_db

from .conftest import TextModel

PRESETS = list(squeezer.PRESETS)
MIN_OUTPUT_SQNR = {"w8": 30, "w8a8": 25, "w8a8-tensor": 20, "w8a8-static": 20, "w4g128": 8, "kmeans-w4": 8, "log2-w4": 5}


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_on_mlp(preset, mlp, mlp_batches):
    q = squeezer.quantize(mlp, preset, calib=mlp_batches)
    report = squeezer.report_of(q)
    assert [l.name for l in report.layers] == ["fc1", "fc2", "head"]
    assert [s.name for s in report.skipped] == ["norm"]
    assert all(isinstance(m, QuantLinear) for m in quant_layers(q).values())
    assert not any(isinstance(m, QuantLinear) for m in mlp.modules()), "the original model must stay float"
    x = mlp_batches[0]
    with torch.no_grad():
        ref, out = mlp(x), q(x)
    assert torch.isfinite(out).all() and not torch.equal(ref, out)
    assert report.model_output_error is not None and report.model_output_error.cosine > 0.5
    assert math.isclose(report.model_output_error.sqnr_db, sqnr_db(torch.cat([mlp(b) for b in mlp_batches]).detach(),
                                                                    torch.cat([q(b) for b in mlp_batches]).detach()),
                        rel_tol=1e-4)
    if preset in MIN_OUTPUT_SQNR:
        assert report.model_output_error.sqnr_db > MIN_OUTPUT_SQNR[preset]
    for layer in report.layers:
        assert layer.output_error is not None
        assert layer.bytes_after < layer.bytes_before
        assert layer.bits == q.get_submodule(layer.name).weight_spec.bits


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_on_cnn(preset, cnn, cnn_batches):
    q = squeezer.quantize(cnn, preset, calib=cnn_batches)
    types = {name: type(m) for name, m in quant_layers(q).items()}
    assert types == {"conv1": QuantConv2d, "conv2": QuantConv2d, "conv1d": QuantConv1d, "fc": QuantLinear}
    assert q.conv2.groups == 2 and q.conv2.stride == (2, 2)
    with torch.no_grad():
        out = q(cnn_batches[0])
    assert out.shape == (4, 10) and torch.isfinite(out).all()
    report = squeezer.report_of(q)
    assert report.skipped == [] and report.folded_norms == {"bn": "conv1"}  # the norm went into conv1


def test_int8_is_close_and_int4_smaller(mlp, mlp_batches):
    w8 = squeezer.report_of(squeezer.quantize(mlp, "w8"))
    w4 = squeezer.report_of(squeezer.quantize(mlp, "w4g128"))
    assert w8.weight_compression > 3.9
    assert w4.weight_compression > 7.0
    assert w8.weight_sqnr_db > w4.weight_sqnr_db + 15


def test_weights_equal_fake_quantized_float_weights(mlp):
    q = squeezer.quantize(mlp, "w4g128")
    layer = q.fc1
    expected = squeezer.fake_quantize(mlp.fc1.weight.detach(), layer.weight_spec)
    assert torch.equal(layer.quantized_weight(), expected)
    x = torch.randn(3, 40)
    assert torch.allclose(q.fc1(x), torch.nn.functional.linear(x, expected, mlp.fc1.bias), atol=1e-6)


def test_dynamic_activations_are_quantized_per_token(mlp):
    q = squeezer.quantize(mlp, "w8a8")
    x = torch.randn(2, 3, 40)
    x[0, 0] *= 100  # one loud token must not coarsen the others' scales
    qx = q.fc1.quantize_input(x)
    spec = q.fc1.act_spec
    for t in range(3):
        step = x[1, t].abs().max() / spec.qmax
        assert (qx[1, t] - x[1, t]).abs().max() <= step / 2 + 1e-6


def test_static_activations_use_calibrated_range(mlp, mlp_batches):
    q = squeezer.quantize(mlp, "w8a8-static", calib=mlp_batches)
    lo = min(float(b.min()) for b in mlp_batches)
    hi = max(float(b.max()) for b in mlp_batches)
    qp = q.fc1.act_qparams
    assert math.isclose(float(qp.scale), (hi - lo) / 255, rel_tol=1e-5)
    big = q.fc1.quantize_input(torch.full((1, 40), 1e3))
    assert torch.allclose(big, torch.full_like(big, (255 - float(qp.zero_point)) * float(qp.scale)))


def test_static_without_calibration_fails(mlp):
    with pytest.raises(DataError, match="calib"):
        squeezer.quantize(mlp, "w8a8-static")


def test_keyword_and_tuple_batches():
    torch.manual_seed(0)
    model = TextModel().eval()
    ids = torch.randint(1, 100, (8, 6))
    batches = [{"input_ids": ids, "attention_mask": torch.ones(8, 6)}]
    q = squeezer.quantize(model, "w8a8-static", calib=batches)
    assert isinstance(q.embed, QuantEmbedding) and q.embed.padding_idx == 0
    assert q.embed.act_spec is not None and q.proj.act_qparams is not None
    assert squeezer.report_of(q).model_output_error.sqnr_db > 20
    q2 = squeezer.quantize(model, "w8", calib=[(ids, torch.ones(8, 6))])
    assert squeezer.report_of(q2).calibration_batches == 1


def test_include_ignore_and_layer_types(mlp, cnn):
    q = squeezer.quantize(mlp, QuantConfig(ignore=[r"^head$"]))
    assert set(quant_layers(q)) == {"fc1", "fc2"}
    skipped = {s.name: s.reason for s in squeezer.report_of(q).skipped}
    assert "ignored" in skipped["head"] and skipped["norm"] == "type not quantizable"
    q = squeezer.quantize(mlp, QuantConfig(include=[r"fc\d"]))
    assert set(quant_layers(q)) == {"fc1", "fc2"}
    q = squeezer.quantize(cnn, QuantConfig(layer_types=["conv2d"]))
    assert set(quant_layers(q)) == {"conv1", "conv2"}


def test_overrides_change_one_layer(mlp):
    cfg = QuantConfig(weight=QuantSpec(4, symmetric=False, granularity="group:64"),
                      overrides={r"^head$": {"weight": {"bits": 8}}})
    q = squeezer.quantize(mlp, cfg)
    assert q.head.weight_spec.bits == 8 and q.head.weight_spec.granularity == squeezer.PerGroup(64)
    assert q.fc1.weight_spec.bits == 4
    bits = {l.name: l.bits for l in squeezer.report_of(q).layers}
    assert bits == {"fc1": 4, "fc2": 4, "head": 8}


def test_type_overrides_and_low_bit_presets_keep_embeddings_int8():
    q = squeezer.quantize(TextModel(), "w4g128")
    assert q.embed.weight_spec == squeezer.PRESETS["w8"].weight
    assert q.proj.weight_spec == squeezer.PRESETS["w4g128"].weight
    cfg = QuantConfig(overrides={"type:linear": {"weight": {"bits": 3}}, "embed": {"weight": {"bits": 5}}})
    q = squeezer.quantize(TextModel(), cfg)
    assert (q.proj.weight_spec.bits, q.embed.weight_spec.bits) == (3, 5)
    with pytest.raises(ConfigError, match="unknown layer type in overrides.*type:bilinear"):
        QuantConfig(overrides={"type:bilinear": {"weight": {"bits": 4}}})


def test_transformers_style_conv1d_becomes_linear():
    class Conv1D(nn.Module):  # same contract as transformers.pytorch_utils.Conv1D
        def __init__(self, nf: int, nx: int) -> None:
            super().__init__()
            self.nf = nf
            self.weight = nn.Parameter(torch.randn(nx, nf))
            self.bias = nn.Parameter(torch.randn(nf))

        def forward(self, x):
            return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(*x.shape[:-1], self.nf)

    model = nn.Sequential(Conv1D(12, 20))
    q = squeezer.quantize(model, QuantConfig(weight=QuantSpec(16)))
    assert isinstance(q[0], QuantLinear) and q[0].weight.shape == (12, 20)
    x = torch.randn(2, 5, 20)
    assert torch.allclose(q(x), model(x), atol=1e-3)


def test_modes_float_and_compare(mlp, mlp_batches):
    q = squeezer.quantize(mlp, "w4g128")
    x = mlp_batches[0]
    set_mode(q, "float")
    assert torch.equal(q(x), mlp(x))
    set_mode(q, "simulate")
    assert not torch.equal(q(x), mlp(x))


def test_qat_gradient_flows_through_quantized_module(mlp):
    q = squeezer.quantize(mlp, "w8")
    q.train()
    loss = q(torch.randn(4, 40)).pow(2).sum()
    loss.backward()
    assert q.fc1.weight.grad is not None and q.fc1.weight.grad.abs().sum() > 0


def test_inplace_changes_the_given_model(mlp):
    weight = mlp.fc1.weight
    q = squeezer.quantize(mlp, "w8", inplace=True)
    assert q is mlp and isinstance(mlp.fc1, QuantLinear)
    assert mlp.fc1.weight.data_ptr() == weight.data_ptr(), "the quantized layer reuses the float layer's storage"


def test_copy_leaves_the_given_model_untouched(mlp, mlp_batches):
    before = {k: v.clone() for k, v in mlp.state_dict().items()}
    q = squeezer.quantize(mlp, "w4g128-gptq", calib=mlp_batches)
    assert not any(isinstance(m, QuantLinear) for m in mlp.modules())
    assert all(torch.equal(before[k], v) for k, v in mlp.state_dict().items())
    assert not torch.equal(q.fc1.weight, mlp.fc1.weight), "GPTQ rewrote the copy's weight"


class TiedModel(nn.Module):
    """A language-model head whose weight is the embedding table's (weight tying)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 32)
        self.mid = nn.Linear(32, 32)
        self.head = nn.Linear(32, 50, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.mid(self.embed(ids))))


def test_tied_weights_get_their_own_copies_in_place():
    """GPTQ rewrites the head's float weight in place: the tied embedding must keep its own."""
    torch.manual_seed(0)
    model = TiedModel().eval()
    table, mid = model.embed.weight.detach().clone(), model.mid.weight
    batches = [torch.randint(0, 50, (8, 6)) for _ in range(4)]
    q = squeezer.quantize(model, {"weight": {"bits": 4, "granularity": "channel"}, "algorithm": "gptq",
                                  "layer_types": ["linear", "embedding"]}, calib=batches, inplace=True)
    assert isinstance(q.head, QuantLinear) and isinstance(q.embed, QuantEmbedding)
    assert q.head.weight.data_ptr() != q.embed.weight.data_ptr()
    assert not torch.equal(q.head.weight, table), "GPTQ changed the head's weight"
    assert torch.equal(q.embed.weight, table), "the embedding table is untouched by the head's rounding"
    assert q.mid.weight.data_ptr() == mid.data_ptr(), "an untied layer reuses its storage"


@pytest.mark.parametrize(
    "calib, message",
    [([], "empty"), ([torch.tensor([[float("nan")] * 40])], "NaN"), ([torch.ones(0, 40)], "empty"),
     (torch.ones(2, 40), "iterable"), (["text"], "batch 0")],
)
def test_bad_calibration_data(mlp, calib, message):
    with pytest.raises(DataError, match=message):
        squeezer.quantize(mlp, "w8", calib=calib)


def test_nan_weight_names_the_layer(mlp):
    with torch.no_grad():
        mlp.fc2.weight[0, 0] = float("inf")
    with pytest.raises(DataError, match="fc2"):
        squeezer.quantize(mlp, "w8")


def test_unknown_preset_lists_valid_ones(mlp):
    with pytest.raises(ConfigError, match="unknown preset 'w5'.*w4g128"):
        squeezer.quantize(mlp, "w5")


def test_config_from_yaml_and_dict(tmp_path, mlp):
    path = tmp_path / "cfg.yaml"
    path.write_text("weight: {bits: 3, symmetric: false, granularity: 'group:32'}\nignore: ['head']\n")
    q = squeezer.quantize(mlp, str(path))
    assert q.fc1.weight_spec.bits == 3 and "head" not in quant_layers(q)
    assert LayerScheme.from_dict(q.fc1.scheme.to_dict()) == q.fc1.scheme
    with pytest.raises(ConfigError, match="wieght"):
        QuantConfig.from_dict({"wieght": {}})
    with pytest.raises(ConfigError, match="observer"):
        QuantConfig(observer="median")


@pytest.mark.parametrize("spec", [
    QuantSpec(8, granularity="channel:0"), QuantSpec(4, symmetric=False, granularity="group:16"),
    QuantSpec(4, granularity="tensor"), QuantSpec(3, mapping="kmeans", granularity="channel:0"),
    QuantSpec(4, mapping="log2", granularity="group:16"),
])
def test_embedding_fake_quantizes_only_looked_up_rows(spec):
    """fq_w(W[idx]) with the rows' own parameters equals fq_w(W)[idx] exactly, keeps no
    fake-quantized copy of the table, and passes the same straight-through gradient."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(50, 40), nn.Linear(40, 3))
    q = squeezer.quantize(model, QuantConfig(weight=spec))
    emb = q[0]
    ids = torch.randint(0, 50, (4, 7))
    table = squeezer.quant.core.fake_quantize(emb.weight.detach(), emb.weight_spec, emb.weight_qparams)
    out = emb(ids)
    assert out.shape == (4, 7, 40) and torch.equal(out, nn.functional.embedding(ids, table))
    assert emb._wq_cache is None, "no table-sized copy"
    emb.weight.requires_grad_(True)
    emb(ids).square().sum().backward()
    fast = emb.weight.grad.clone()
    emb.weight.grad = None
    nn.functional.embedding(ids, squeezer.quant.core.fake_quantize(emb.weight, emb.weight_spec,
                                                                    emb.weight_qparams)).square().sum().backward()
    assert torch.allclose(fast, emb.weight.grad)


@pytest.mark.parametrize("weight", [{"bits": 8, "granularity": "channel"}, {"bits": 4, "granularity": "group:16"},
                                    {"bits": 4, "granularity": "tensor"}, {"bits": 3, "mapping": "kmeans"}])
def test_reported_weight_error_equals_the_whole_tensor_one(weight):
    """Measured in blocks of rows (a big table is never fake-quantized in full): the same stats."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(30000, 40), nn.Linear(40, 8))  # 1.2M weights: two blocks
    q = squeezer.quantize(model, {"weight": weight, "layer_types": ["linear", "embedding"]})
    for name, layer in quant_layers(q).items():
        w = layer.weight.detach()
        whole = squeezer.quant.metrics.ErrorStats.between(w, layer.weight_qtensor().dequantize())
        got = next(r for r in squeezer.report_of(q).layers if r.name == name).weight_error
        assert got.mse == pytest.approx(whole.mse, rel=1e-9) and got.cosine == pytest.approx(whole.cosine, rel=1e-12)


def test_weight_on_its_grid_is_not_copied(mlp, mlp_batches):
    """After GPTQ the float weight is W^ itself: simulation uses it directly (no second copy)."""
    q = squeezer.quantize(mlp, "w4g128-gptq", calib=mlp_batches)
    for name, layer in quant_layers(q).items():
        with torch.no_grad():
            w = layer.quantized_weight()
        assert w.data_ptr() == layer.weight.data_ptr(), name
        assert torch.equal(w, squeezer.quant.core.fake_quantize(layer.weight.detach(), layer.weight_spec,
                                                                layer.weight_qparams))
    rtn = squeezer.quantize(mlp, "w4g128")
    with torch.no_grad():
        assert rtn.fc1.quantized_weight().data_ptr() != rtn.fc1.weight.data_ptr(), "RTN keeps the user's float weight"

"""The rest of torch.nn's weighted layers: Conv3d, ConvTranspose1d/2d/3d and EmbeddingBag are quantized per
output channel, simulate the float function on fake-quantized weights, and every backend runs them or
refuses them by name."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

import squeezer
from squeezer.exporters.base import ExportReport
from squeezer.exporters.qdq import QdqLayer, checked_weight
from squeezer.modules.layers import (
    QuantConv3d,
    QuantConvTranspose,
    QuantEmbeddingBag,
    input_channels_first,
    layer_type_names,
    output_channels_first,
)
from squeezer.quant.spec import PerChannel, QuantSpec

W8 = squeezer.QuantConfig(QuantSpec(bits=8, granularity=PerChannel(0)))
W4 = squeezer.QuantConfig(QuantSpec(bits=4, granularity=PerChannel(0)))


def _conv_cases() -> list[tuple[nn.Module, tuple[int, ...]]]:
    return [
        (nn.Conv3d(4, 6, 3, stride=(1, 2, 1), padding=1, dilation=(1, 1, 2), groups=2), (2, 4, 6, 7, 8)),
        (nn.Conv3d(3, 5, (1, 2, 3), bias=False), (2, 3, 4, 5, 6)),
        (nn.ConvTranspose1d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2, dilation=2), (2, 4, 9)),
        (nn.ConvTranspose1d(3, 5, 4, bias=False), (3, 3, 7)),
        (nn.ConvTranspose2d(6, 4, (3, 2), stride=(2, 1), padding=(1, 0), output_padding=(1, 0), groups=2), (2, 6, 5, 6)),
        (nn.ConvTranspose2d(3, 8, 3, stride=2, dilation=2, bias=False), (2, 3, 4, 4)),
        (nn.ConvTranspose3d(4, 6, 2, stride=2, groups=2), (1, 4, 3, 4, 5)),
        (nn.ConvTranspose3d(3, 5, (2, 3, 1), stride=(1, 2, 1), padding=(0, 1, 0), output_padding=(0, 1, 0)), (2, 3, 3, 4, 5)),
    ]


CONVS = _conv_cases()
IDS = [f"{type(m).__name__}-{i}" for i, (m, _) in enumerate(CONVS)]


def _conv_model(case: int) -> tuple[nn.Module, Tensor]:
    torch.manual_seed(case)
    layer, shape = copy.deepcopy(CONVS[case])
    return nn.Sequential(layer, nn.ReLU()).eval(), torch.randn(*shape)


def _float_twin(layer: nn.Module, float_layer: nn.Module) -> nn.Module:
    """``float_layer`` carrying the quantized layer's fake-quantized weight in torch's layout."""
    twin = copy.deepcopy(float_layer)
    w = layer.quantized_weight().detach()
    if isinstance(layer, QuantConvTranspose):
        w = input_channels_first(w, layer.groups)
    twin.weight = nn.Parameter(w)
    return twin


def _relative(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_the_new_types_are_registered() -> None:
    assert {"conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "embedding_bag"} <= set(layer_type_names())


def test_transposed_weights_reorder_to_output_channels_first_and_back() -> None:
    w = torch.randn(6, 2, 3, 4)  # (in, out / groups, k...) with groups 3: out = 6
    first = output_channels_first(w, 3)
    assert first.shape == (6, 2, 3, 4)
    g, i, j = 1, 0, 1  # output channel g * 2 + j reads input channel g * 2 + i
    assert torch.equal(first[g * 2 + j, i], w[g * 2 + i, j])
    assert torch.equal(input_channels_first(first, 3), w)


@pytest.mark.parametrize("config", [W8, W4], ids=["w8", "w4"])
@pytest.mark.parametrize("case", range(len(CONVS)), ids=IDS)
def test_convolutions_simulate_the_float_op_on_fake_quantized_weights(case: int, config) -> None:
    model, x = _conv_model(case)
    q = squeezer.quantize(model, config, progress=False)
    layer = q[0]
    with torch.no_grad():
        y, ref = q(x), model(x)
        assert torch.equal(layer(x), _float_twin(layer, model[0])(x))  # exactly the float op on fq(W)
    error = _relative(y, ref)
    assert 0 < error < (0.02 if config == W8 else 0.2)
    # one scale per OUTPUT channel: the max |w| of that output channel's weights in torch's layout
    scale = layer.weight_qparams.scale.reshape(-1)
    assert scale.numel() == model[0].out_channels
    w = model[0].weight.detach()
    per_out = output_channels_first(w, model[0].groups) if isinstance(layer, QuantConvTranspose) else w
    qmax = 127 if config == W8 else 7
    assert torch.allclose(scale, per_out.abs().flatten(1).amax(1) / qmax)
    report = squeezer.report_of(q)
    row = next(r for r in report.layers if r.name == "0")
    assert row.kind == type(layer).__name__ and 0 < row.bytes_after < row.bytes_before


@pytest.mark.parametrize("case", [0, 2, 4, 7], ids=[IDS[i] for i in (0, 2, 4, 7)])
@pytest.mark.parametrize("preset", ["w8a8", "w8a8-static"])
def test_convolutions_with_activations(case: int, preset: str) -> None:
    model, x = _conv_model(case)
    q = squeezer.quantize(model, preset, calib=[x, x * 0.5], progress=False)
    layer = q[0]
    with torch.no_grad():
        expected = _float_twin(layer, model[0])(layer.quantize_input(x))
        assert torch.equal(layer(x), expected)
        assert 0 < _relative(q(x), model(x)) < 0.05


@pytest.mark.parametrize("case", range(len(CONVS)), ids=IDS)
def test_convolutions_save_load_pack_and_onnx(case: int, tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    model, x = _conv_model(case)
    config = W8 if case % 2 else W4
    q = squeezer.quantize(model, config, progress=False)
    with torch.no_grad():
        y = q(x)
        squeezer.save(q, tmp_path / "sim")
        assert torch.equal(squeezer.load(tmp_path / "sim", lambda: copy.deepcopy(model))(x), y)
        packed = squeezer.pack(q)
        assert torch.allclose(packed(x), y, atol=1e-5)
        squeezer.save(packed, tmp_path / "packed")
        again = squeezer.load(tmp_path / "packed", lambda: copy.deepcopy(model), packed=True)
        assert torch.equal(again(x), packed(x))
        squeezer.export(q, x, tmp_path / "m.onnx")
        out = torch.as_tensor(squeezer.runtime.load(tmp_path / "m.onnx")(x))
        assert torch.allclose(out, y, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", [0, 4, 6], ids=[IDS[i] for i in (0, 4, 6)])
def test_convolutions_have_a_qdq_form(case: int) -> None:
    model, x = _conv_model(case)
    q = squeezer.quantize(model, W8, progress=False)
    report = ExportReport("m")
    qdq = QdqLayer(q[0], "0", checked_weight(q[0], "0", "TFLite", "error", report), fold_weight=False)
    with torch.no_grad():
        assert torch.allclose(qdq(x), q[0](x), atol=1e-5)


def _bag_cases() -> list[tuple[nn.EmbeddingBag, dict[str, Tensor]]]:
    with torch.random.fork_rng():  # the tables' weights: the same whatever ran before this module's import
        torch.manual_seed(0)
        return _bag_cases_seeded()


def _bag_cases_seeded() -> list[tuple[nn.EmbeddingBag, dict[str, Tensor]]]:
    g = torch.Generator().manual_seed(0)
    ids2d = torch.randint(0, 30, (4, 6), generator=g)
    flat = torch.randint(0, 30, (11,), generator=g)
    offsets = torch.tensor([0, 3, 3, 7])
    return [
        (nn.EmbeddingBag(30, 8, mode="sum"), {"input": ids2d}),
        (nn.EmbeddingBag(30, 8, mode="mean", padding_idx=0), {"input": ids2d}),
        (nn.EmbeddingBag(30, 8, mode="max"), {"input": flat, "offsets": offsets}),
        (nn.EmbeddingBag(30, 8, mode="sum"), {"input": flat, "offsets": offsets,
                                              "per_sample_weights": torch.rand(11, generator=g)}),
        (nn.EmbeddingBag(30, 8, mode="mean", include_last_offset=True),
         {"input": flat, "offsets": torch.tensor([0, 3, 3, 7, 11])}),
    ]


class BagModel(nn.Module):
    def __init__(self, bag: nn.EmbeddingBag) -> None:
        super().__init__()
        self.bag, self.head = bag, nn.Linear(bag.embedding_dim, 3)

    def forward(self, input: Tensor, offsets: Tensor | None = None, per_sample_weights: Tensor | None = None) -> Tensor:
        return self.head(self.bag(input, offsets, per_sample_weights))


BAGS = _bag_cases()
BAG_IDS = ["sum", "mean-padding", "max-offsets", "sum-weights", "mean-last-offset"]


def _bag_model(case: int) -> tuple[BagModel, dict[str, Tensor]]:
    torch.manual_seed(case)
    bag, inputs = copy.deepcopy(BAGS[case])
    return BagModel(bag).eval(), inputs


@pytest.mark.parametrize("config", [W8, W4], ids=["w8", "w4"])
@pytest.mark.parametrize("case", range(len(BAGS)), ids=BAG_IDS)
def test_embedding_bags_simulate_the_float_op(case: int, config) -> None:
    model, inputs = _bag_model(case)
    q = squeezer.quantize(model, {"layer_types": ["embedding_bag"], "weight": config.weight.to_dict()}, progress=False)
    layer = q.bag
    assert isinstance(layer, QuantEmbeddingBag) and type(q.head) is nn.Linear
    twin = copy.deepcopy(model.bag)
    twin.weight = nn.Parameter(layer.quantized_weight().detach())
    with torch.no_grad():
        assert torch.equal(layer(**inputs), twin(**inputs))
        assert 0 < _relative(q(**inputs), model(**inputs)) < (0.02 if config == W8 else 0.2)
    assert layer.weight_qparams.scale.numel() == 30  # one scale per row
    row = next(r for r in squeezer.report_of(q).layers if r.name == "bag")
    assert row.kind == "QuantEmbeddingBag" and 0 < row.bytes_after < row.bytes_before


@pytest.mark.parametrize("case", range(len(BAGS)), ids=BAG_IDS)
def test_embedding_bags_save_load_pack_and_refusals(case: int, tmp_path) -> None:
    model, inputs = _bag_model(case)
    q = squeezer.quantize(model, "w8a8-static", calib=[inputs], progress=False)
    assert q.bag.scheme.activation_mode == "none"  # token ids are never quantized
    with torch.no_grad():
        y = q(**inputs)
        squeezer.save(q, tmp_path / "sim")
        assert torch.equal(squeezer.load(tmp_path / "sim", lambda: copy.deepcopy(model))(**inputs), y)
        packed = squeezer.pack(q)
        assert packed.bag.is_packed and torch.allclose(packed(**inputs), y, atol=1e-5)
        squeezer.save(packed, tmp_path / "packed")
        again = squeezer.load(tmp_path / "packed", lambda: copy.deepcopy(model), packed=True)
        assert torch.equal(again(**inputs), packed(**inputs))
    refusal = r"layer 'bag': format int8-channel \(in a QuantEmbeddingBag\) is not supported by {}; supported: "
    with pytest.raises(squeezer.ConfigError, match=refusal.format("ONNX")):
        squeezer.export(q, inputs, tmp_path / "m.onnx")
    with pytest.raises(squeezer.ConfigError, match=refusal.format("TFLite")):
        checked_weight(q.bag, "bag", "TFLite", "float", ExportReport("m"))


def test_conv3d_is_a_plain_convolution_of_the_family() -> None:
    model, _ = _conv_model(0)
    assert isinstance(squeezer.quantize(model, W8, progress=False)[0], QuantConv3d)


class ScaledTranspose(nn.ConvTranspose1d):
    def forward(self, x: Tensor, output_size=None) -> Tensor:
        return 2 * super().forward(x, output_size)


class WeightedBag(nn.EmbeddingBag):
    def forward(self, input: Tensor, offsets: Tensor | None = None, per_sample_weights: Tensor | None = None) -> Tensor:
        return super().forward(input, offsets, per_sample_weights) * 3


@pytest.mark.parametrize("layer", [ScaledTranspose(3, 4, 2), WeightedBag(10, 4)], ids=["transpose", "bag"])
def test_subclasses_with_their_own_forward_stay_float(layer: nn.Module) -> None:
    q = squeezer.quantize(nn.Sequential(layer), W8, progress=False)
    assert type(q[0]) is type(layer)
    assert [s.name for s in squeezer.report_of(q).skipped] == ["0"]


@pytest.mark.parametrize("preset", ["w8-gptq", "w8-bias_correction"])
def test_algorithms_run_on_models_with_the_new_types(preset: str) -> None:
    model, inputs = _bag_model(3)
    q = squeezer.quantize(model, preset, calib=[inputs, inputs], progress=False)
    rtn = squeezer.quantize(model, W8, progress=False)
    assert torch.equal(q.bag.quantized_weight(), rtn.bag.quantized_weight())  # a bag keeps round-to-nearest
    for case in (0, 4):
        conv, x = _conv_model(case)
        with torch.no_grad():
            assert 0 < _relative(squeezer.quantize(conv, preset, calib=[x, x], progress=False)(x), conv(x)) < 0.02

"""Layer schemes, the format classifier, and every backend's refusal of a format in one message shape."""

from __future__ import annotations

import importlib.util
import re

import pytest
import torch

import squeezer
from squeezer import PRESETS, ConfigError, QuantConfig, QuantSpec
from squeezer.kernels.paths import Int8WeightBF16, IntMM
from squeezer.modules import quant_layers
from squeezer.quant.formats import Format, classify, unsupported_format
from squeezer.quant.scheme import LayerScheme

REFUSAL = re.compile(r"layer '(?P<layer>[^']+)': format (?P<format>\S+) \((?P<spec>.+?)\) is not supported by "
                     r"(?P<backend>.+?); supported: (?P<supported>[^;]+)(; .+)?")

PRESET_FORMATS = {
    "w8": "int8-channel", "w8g128": "uint8-group", "w4g128": "uint4-group", "w3g128": "uint3-group",
    "w2g64": "uint2-group", "w8a8": "int8-channel/dynamic-token-int8", "w8a8-asym": "int8-channel/dynamic-token-uint8",
    "w8a8-tensor": "int8-channel/dynamic-tensor-uint8", "w8a8-static": "int8-channel/static-tensor-uint8",
    "ternary": "codebook-int8-channel", "binary": "codebook-int8-channel", "log2-w4": "codebook-channel",
    "kmeans-w4": "codebook-tensor", "q8_0": "int8-group", "q4_0": "int4-group",
}


def test_every_preset_has_its_format():
    assert set(PRESET_FORMATS) == set(PRESETS), "a new preset needs its expected format here"
    assert {name: classify(cfg.scheme).name for name, cfg in PRESETS.items()} == PRESET_FORMATS


def _w(**kw) -> LayerScheme:
    return LayerScheme(weight=QuantSpec(**kw))


SCHEMES = [
    (_w(bits=4), Format("int4-channel")),
    (_w(bits=4, granularity="channel:1"), Format("int4-channel:1")),
    (_w(bits=8, symmetric=False, granularity="group:128"), Format("uint8-group")),
    (_w(bits=8, symmetric=False, signed=True, granularity="tensor"), Format("int8-asym-tensor")),
    (_w(bits=3, symmetric=False, granularity="group:128"), Format("uint3-group")),
    (_w(bits=3), Format("int3-channel")),
    (_w(bits=2, mapping="ternary"), Format("codebook-int8-channel")),
    (_w(bits=1, mapping="binary", granularity="tensor"), Format("codebook-int8-tensor")),
    (_w(bits=2, mapping="log2"), Format("codebook-int8-channel")),  # levels {-1, 0, 1}
    (_w(bits=4, mapping="log2"), Format("codebook-channel")),
    (_w(bits=3, mapping="exp", granularity="group:32"), Format("codebook-group")),
    (_w(bits=4, mapping="kmeans", granularity="tensor"), Format("codebook-tensor")),
    (_w(bits=4, mapping="kmeans"), Format("kmeans-channel")),
    (LayerScheme(QuantSpec(8), QuantSpec(8, granularity="token"), "dynamic"), Format("int8-channel", "dynamic-token-int8")),
    (LayerScheme(QuantSpec(8), QuantSpec(8, signed=False, granularity="tensor"), "dynamic"),
     Format("int8-channel", "dynamic-tensor-uint8-sym")),
    (LayerScheme(QuantSpec(8), QuantSpec(8, symmetric=False, granularity="tensor"), "static"),
     Format("int8-channel", "static-tensor-uint8")),
    (LayerScheme(QuantSpec(4, symmetric=False, granularity="group:64"), QuantSpec(4, granularity="tensor"), "static"),
     Format("uint4-group", "static-tensor-int4")),
]


@pytest.mark.parametrize("scheme, expected", SCHEMES, ids=[f.name for _, f in SCHEMES])
def test_classify_hand_made_schemes(scheme, expected):
    assert classify(scheme) == expected
    assert LayerScheme.from_dict(scheme.to_dict()) == scheme


def test_kmeans_levels_are_data():
    """Without levels a per-tensor k-means table is a float codebook; its values can make it integral."""
    scheme = _w(bits=2, mapping="kmeans", granularity="tensor")
    assert classify(scheme, torch.tensor([[-3.0, 0.0, 2.0, 5.0]])).weight == "codebook-int8-tensor"
    assert classify(scheme, torch.tensor([[-3.0, 0.5, 2.0, 5.0]])).weight == "codebook-tensor"
    assert classify(scheme, torch.tensor([[-300.0, 0.0, 2.0, 5.0]])).weight == "codebook-tensor"  # outside int8
    per_channel = _w(bits=2, mapping="kmeans")
    assert classify(per_channel, torch.zeros(1, 4)).weight == "codebook-int8-channel"  # one row: one table
    assert classify(per_channel, torch.zeros(3, 4)).weight == "kmeans-channel"


def test_scheme_validation_and_per_layer_schemes(mlp):
    with pytest.raises(ConfigError, match="given together"):
        LayerScheme(activation=QuantSpec(8))
    with pytest.raises(ConfigError, match="unknown layer scheme field"):
        LayerScheme.from_dict({"weight": {}, "mode": "none"})
    cfg = QuantConfig(weight={"bits": 4}, overrides={"^head$": {"weight": {"bits": 8}}})
    assert cfg.for_layer("head", "linear") == LayerScheme(QuantSpec(8))
    assert cfg.for_layer("fc1", "linear") == cfg.scheme == LayerScheme(QuantSpec(4))
    q = squeezer.quantize(mlp, cfg)
    layers = quant_layers(q)
    assert {n: layer.scheme.weight.bits for n, layer in layers.items()} == {"fc1": 4, "fc2": 4, "head": 8}
    assert not any(hasattr(layer, "config") for layer in layers.values())


def test_unsupported_format_message_shape():
    err = unsupported_format("TFLite", "fc1", "uint4-group", ["int8-tensor", "int8-channel"], "uint4 asym group(64)",
                             hint="try int8")
    assert isinstance(err, ConfigError)
    assert str(err) == ("layer 'fc1': format uint4-group (uint4 asym group(64)) is not supported by TFLite; "
                        "supported: int8-channel, int8-tensor; try int8")


def _refusal(exc: pytest.ExceptionInfo, layer: str, fmt: str, backend: str) -> re.Match:
    """The refusal's parts, after checking it has the shared shape of :func:`unsupported_format`."""
    found = REFUSAL.fullmatch(str(exc.value))
    assert found, str(exc.value)
    assert (found["layer"], found["format"]) == (layer, fmt) and backend in found["backend"], str(exc.value)
    return found


def test_kernels_refuse_a_format_no_given_path_runs(mlp):
    q = squeezer.quantize(mlp, "w4g128")
    with pytest.raises(ConfigError) as exc:
        squeezer.pack(q, paths=(IntMM(), Int8WeightBF16()))
    found = _refusal(exc, "fc1", "uint4-group", "int_mm, int8_weight_bf16")
    assert "int8-channel" in found["supported"]
    with pytest.raises(ConfigError) as pinned:
        squeezer.pack(q, kernels={"fc1": "int_mm"})
    _refusal(pinned, "fc1", "uint4-group", "int_mm")


def test_onnx_refuses_static_activations_without_an_8bit_grid(tmp_path, mlp, mlp_batches):
    cfg = QuantConfig(weight={"bits": 8}, activation={"bits": 4, "symmetric": False, "granularity": "tensor"},
                      activation_mode="static")
    q = squeezer.quantize(mlp, cfg, calib=mlp_batches)
    with pytest.raises(ConfigError) as exc:
        squeezer.export(q, mlp_batches[0], tmp_path / "m.onnx")
    found = _refusal(exc, "fc1", "static-tensor-uint4", "ONNX")
    assert "static-tensor-uint8" in found["supported"]
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("suffix, backend, extra", [(".tflite", "TFLite", "litert_torch"),
                                                    (".pte", "ExecuTorch", "executorch")])
def test_qdq_exporters_refuse_weights_without_an_int8_form(tmp_path, mlp, mlp_batches, suffix, backend, extra):
    if importlib.util.find_spec(extra) is None:
        pytest.skip(f"needs {extra}")
    q = squeezer.quantize(mlp, "w4g128")
    with pytest.raises(ConfigError) as exc:
        squeezer.export(q, mlp_batches[0], tmp_path / f"m{suffix}")
    found = _refusal(exc, "fc1", "uint4-group", backend)
    assert {"int8-channel", "codebook-int8-channel"} <= set(found["supported"].split(", "))
    static = QuantConfig(weight={"bits": 8}, activation={"bits": 4, "symmetric": False, "granularity": "tensor"},
                         activation_mode="static")
    with pytest.raises(ConfigError) as act:
        squeezer.export(squeezer.quantize(mlp, static, calib=mlp_batches), mlp_batches[0], tmp_path / f"s{suffix}")
    _refusal(act, "fc1", "static-tensor-uint4", backend)

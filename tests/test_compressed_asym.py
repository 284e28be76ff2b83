"""Asymmetric sub-8-bit presets through compressed-tensors: the folder keeps the library's pack-quantized layout
(zero point packed into int32 rows, as vLLM reads it) and loads in transformers with squeezer's logits."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")

from squeezer.config import PRESETS  # noqa: E402
from squeezer.hf import quantize_pretrained  # noqa: E402
from squeezer.hf.testmodels import make_model_folder  # noqa: E402
from tests.test_pretrained import _float_weights, _logits, _reference  # noqa: E402


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    folder = make_model_folder(tmp_path_factory.mktemp("tiny_llama"), "llama", "tiny", max_shard_size="200KB")
    assert len(list(folder.glob("*.safetensors"))) > 1, "the fixture should span several shards"
    return folder


@pytest.mark.parametrize("preset", ["w4g128", "w3g128", "w2g64"])
def test_asymmetric_pack_quantized_folder_loads_in_transformers_with_squeezers_logits(tiny_llama, tmp_path, preset):
    spec = PRESETS[preset].weight
    assert not spec.symmetric and spec.bits < 8
    result = quantize_pretrained(tiny_llama, preset, tmp_path / "out", format="compressed-tensors")
    qconfig = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert qconfig["format"] == "pack-quantized" and qconfig["dequantize"] is True
    stored = _float_weights(tmp_path / "out")
    for name in result.quantized:
        module = name.removesuffix(".weight")
        rows, groups = stored[f"{module}.weight_scale"].shape
        assert stored[f"{module}.weight_zero_point"].shape == (math.ceil(rows * spec.bits / 32), groups), module

    reference = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    state = reference.state_dict()
    for name, w_hat in _reference(tiny_llama, preset, result.quantized).items():
        state[name].copy_(w_hat)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    float_model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    tokens = torch.arange(24)[None] * 7 % 256
    ours, theirs = _logits(reference, tokens), _logits(loaded, tokens)
    assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(ours, _logits(float_model, tokens), atol=1e-5), "the weights were quantized"


@pytest.mark.parametrize("preset", ["q4_0", "w8g128"])
def test_folders_without_a_packed_zero_point_keep_transformers_compressed_load(tiny_llama, tmp_path, preset):
    quantize_pretrained(tiny_llama, preset, tmp_path / "out", format="compressed-tensors")
    qconfig = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert "dequantize" not in qconfig

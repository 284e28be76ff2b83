"""Qwen2-MoE (routed experts, a shared expert and its sigmoid gate) through ``quantize_pretrained``: a seeded folder
made by ``squeezer.hf.testmodels``, compared code for code with ``squeezer.quantize`` of the same model in memory
(its fused experts unfused into the Linears the checkpoint stores)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")

import squeezer  # noqa: E402
from squeezer.hf import load_pretrained, quantize_pretrained  # noqa: E402
from squeezer.hf.moe import STORED_NAMES, unfuse_experts  # noqa: E402
from squeezer.hf.testmodels import make_model_folder  # noqa: E402
from squeezer.modules import quant_layers  # noqa: E402
from squeezer.quant.core import compute_qparams, dequantize, quantize  # noqa: E402
from squeezer.resolve import resolve_config  # noqa: E402
from tests.test_sequential import _decompressed, _stored, assert_loads_with_logits  # noqa: E402

PRESET = "q4_0-gptq"  # 4-bit symmetric: the packed layout transformers dequantizes into its fused experts
EXPERTS = [f"model.layers.{b}.mlp.experts.{e}" for b in range(2) for e in range(4)]
ROUTERS = [f"model.layers.{b}.mlp.{g}.weight" for b in range(2) for g in ("gate", "shared_expert_gate")]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_model_folder(tmp_path_factory.mktemp("qwen2_moe") / "qwen2_moe", "qwen2_moe")


@pytest.fixture(scope="module")
def calib() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (2, 24), generator=gen) for _ in range(3)]


def _stored_name(name: str) -> str:
    for model_part, stored_part in STORED_NAMES["qwen2_moe"]:
        name = (name + ".").replace(model_part, stored_part)[:-1]
    return name


def test_streamed_gives_the_in_memory_codes_and_keeps_the_routers_float(folder, calib, tmp_path):
    result = quantize_pretrained(folder, PRESET, tmp_path / "out", calib=calib, min_expert_tokens=0)
    assert result.rtn_fallback == [] and sorted(result.float_routers) == sorted(ROUTERS)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    unfuse_experts(model)
    cfg = dataclasses.replace(resolve_config(PRESET), ignore=("embed_tokens", "lm_head", "shared_expert_gate"))
    reference = {_stored_name(n): l for n, l in quant_layers(squeezer.quantize(model, cfg, calib=calib,
                                                                               progress=False)).items()}
    stored = _decompressed(tmp_path / "out")
    assert sorted(stored) == sorted(reference) and len(reference) == 2 * (4 + 3 + 4 * 3)  # attention, shared, experts
    for name, layer in reference.items():
        # the same codes (a flipped code moves a weight by a whole step, ~1e-3); some GPTQ scales of one expert of
        # the second block differ from the in-memory run's in their last float32 bit
        torch.testing.assert_close(stored[name][0], dequantize(layer.weight_qtensor()), rtol=1e-6, atol=1e-7,
                                   msg=name)
    source, written = _stored(folder), _stored(tmp_path / "out")
    assert all(torch.equal(written[n], source[n]) for n in ROUTERS) and set(ROUTERS) <= set(result.kept)


def test_experts_short_of_tokens_fall_back_to_rtn_and_the_shared_expert_does_not(folder, calib, tmp_path):
    result = quantize_pretrained(folder, "w8-gptq", tmp_path / "out", calib=calib, min_expert_tokens=10 ** 6)
    assert sorted(result.rtn_fallback) == sorted(EXPERTS)
    spec, source, stored = resolve_config("w8").weight, _stored(folder), _decompressed(tmp_path / "out")
    shared_gptq = 0
    for b in range(2):
        for module in [f"experts.{e}.{w}" for e in range(4) for w in ("gate_proj", "up_proj", "down_proj")] + [
                f"shared_expert.{w}" for w in ("gate_proj", "up_proj", "down_proj")]:
            name = f"model.layers.{b}.mlp.{module}"
            weight = source[f"{name}.weight"]
            rtn = dequantize(quantize(weight, spec, compute_qparams(weight, spec)))
            if module.startswith("experts"):
                assert torch.equal(stored[name][0], rtn), name
            else:
                shared_gptq += not torch.equal(stored[name][0], rtn)
    assert shared_gptq > 0, "the shared expert is calibrated (GPTQ) like a dense MLP"


def test_compressed_tensors_output_loads_in_transformers_with_squeezers_logits(folder, calib, tmp_path):
    quantize_pretrained(folder, PRESET, tmp_path / "ct", calib=calib)
    quantize_pretrained(folder, PRESET, tmp_path / "sq", calib=calib, format="squeezer")
    # transformers fuses the experts on load: the folder's config asks for their codes dequantized
    assert_loads_with_logits(tmp_path / "ct", load_pretrained(tmp_path / "sq"), folder, float_tolerance=1e-3)


def test_model_free_keeps_the_routers_float(folder, tmp_path):
    result = quantize_pretrained(folder, "w8", tmp_path / "out")
    assert sorted(result.float_routers) == sorted(ROUTERS) and not set(ROUTERS) & set(result.quantized)
    assert len(result.quantized) == 2 * (4 + 3 + 4 * 3)
    source, written = _stored(folder), _stored(tmp_path / "out")
    assert all(torch.equal(written[n], source[n]) for n in ROUTERS)


def test_cli_lists_the_routers_kept_in_float(folder, tmp_path):
    from typer.testing import CliRunner

    from squeezer import cli

    done = CliRunner().invoke(cli.app, ["pretrained", "--hf", str(folder), "--preset", "q4_0", "--out",
                                        str(tmp_path / "out")])
    assert done.exit_code == 0, done.output
    listed = done.output.split("routers kept in float:")[1].replace("\n", " ")
    assert sorted(name.strip() for name in listed.split(",")) == sorted(ROUTERS)

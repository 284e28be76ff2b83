"""Model-free quantization of a Hugging Face folder (``squeezer.hf``): a tiny seeded Llama saved in several
shards, through compressed-tensors (loaded back by transformers, and decompressed by the library) and GGUF
(read back by gguf's reader), each compared exactly with squeezer's own dequantized weights."""

from __future__ import annotations

import json
import weakref
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")
gguf = pytest.importorskip("gguf")

from safetensors import safe_open  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from squeezer import cli  # noqa: E402
from squeezer.config import PRESETS  # noqa: E402
from squeezer.errors import ConfigError, DataError, ModelError  # noqa: E402
from squeezer.hf import FORMATS, quantize_pretrained  # noqa: E402
from squeezer.hf.folder import HFFolder  # noqa: E402
from squeezer.hf.pretrained import data_free_presets  # noqa: E402
from squeezer.hf.testmodels import make_model_folder  # noqa: E402
from squeezer.hf.weights import quantize_weight  # noqa: E402
from squeezer.quant.core import dequantize  # noqa: E402


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
    model = transformers.LlamaForCausalLM(config).eval()
    folder = tmp_path_factory.mktemp("llama")
    model.save_pretrained(folder, max_shard_size="50KB")
    (folder / "tokenizer_config.json").write_text("{}")
    assert len(list(folder.glob("*.safetensors"))) > 2, "the fixture should span several shards"
    return folder


def _float_weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in folder.glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as handle:
            out.update({name: handle.get_tensor(name) for name in handle.keys()})
    return out


def _reference(folder: Path, preset: str, names: list[str], scale_dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Squeezer's dequantized weights of ``names``, on the same stored-scale grid."""
    weights = _float_weights(folder)
    return {n: dequantize(quantize_weight(n, weights[n], PRESETS[preset].weight, scale_dtype)) for n in names}


def _logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits


@pytest.mark.parametrize("preset", ["w8", "w8g128", "q8_0", "q4_0"])
def test_compressed_tensors_folder_loads_in_transformers_with_squeezers_logits(llama, tmp_path, preset):
    result = quantize_pretrained(llama, preset, tmp_path / "out")
    assert any("down_proj" in n for n in result.quantized)
    assert not any("embed" in n or "lm_head" in n or "norm" in n for n in result.quantized)
    reference = transformers.AutoModelForCausalLM.from_pretrained(llama).eval()
    state = reference.state_dict()
    for name, w_hat in _reference(llama, preset, result.quantized).items():
        state[name].copy_(w_hat)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    tokens = torch.arange(24)[None] * 7 % 256
    float_model = transformers.AutoModelForCausalLM.from_pretrained(llama).eval()
    ours, theirs = _logits(reference, tokens), _logits(loaded, tokens)
    assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(ours, _logits(float_model, tokens), atol=1e-5), "the weights were quantized"
    assert (tmp_path / "out" / "tokenizer_config.json").exists() and (tmp_path / "out" / "generation_config.json").exists()


@pytest.mark.parametrize("preset, fmt", [("w4g128", "pack-quantized"), ("q4_0", "pack-quantized"),
                                         ("w3g128", "pack-quantized"), ("w2g64", "pack-quantized"),
                                         ("w8g128", "int-quantized"), ("w8", "int-quantized")])
def test_compressed_tensors_decompress_to_squeezers_weights_exactly(llama, tmp_path, preset, fmt):
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig

    result = quantize_pretrained(llama, preset, tmp_path / "out")
    qconfig = QuantizationConfig.model_validate(json.loads((tmp_path / "out" / "config.json").read_text())
                                                ["quantization_config"])
    assert qconfig.format == fmt and qconfig.quantization_status == "compressed"
    scheme = qconfig.config_groups["group_0"]
    assert sorted(scheme.targets) == sorted(n.removesuffix(".weight") for n in result.quantized)
    stored, original = _float_weights(tmp_path / "out"), _float_weights(llama)
    compressor = BaseCompressor.get_value_from_registry(fmt)
    for name, w_hat in _reference(llama, preset, result.quantized).items():
        module = name.removesuffix(".weight")
        local = {k.removeprefix(module + "."): v for k, v in stored.items() if k.startswith(module + ".")}
        packed = fmt == "pack-quantized"
        assert ("weight_packed" in local) == packed and (name not in stored if packed else stored[name].dtype == torch.int8)
        assert torch.equal(compressor.decompress(local, scheme)["weight"].float(), w_hat), name
    for name in result.kept:
        assert torch.equal(stored[name], original[name]), name
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(stored)


def _llama_cpp_order(name: str, w: torch.Tensor, config: dict) -> torch.Tensor:
    """convert_hf_to_gguf's ``LlamaModel.permute`` of Q / K rows (other tensors unchanged)."""
    heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
    head = next((h for key, h in heads.items() if f"{key}.weight" in name), None)
    if head is None:
        return w
    return w.reshape(head, 2, w.shape[0] // head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _field(reader, key: str):
    field = reader.fields[key]
    value = field.parts[field.data[0]]
    return bytes(value).decode() if field.types[0] == gguf.GGUFValueType.STRING else value[0].item()


@pytest.mark.parametrize("preset, qtype", [("q8_0", "Q8_0"), ("q4_0", "Q4_0")])
def test_gguf_is_laid_out_for_llama_cpp_with_squeezers_weights_exactly(llama, tmp_path, preset, qtype):
    out = tmp_path / "model.gguf"
    result = quantize_pretrained(llama, preset, out, format="gguf")
    reader = gguf.GGUFReader(str(out))
    tensors = {t.name: t for t in reader.tensors}
    original = _float_weights(llama)
    config = json.loads((llama / "config.json").read_text())
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    gguf_name = {n: names.get_name(n, try_suffixes=(".weight",)) for n in original}
    assert set(tensors) == set(gguf_name.values()) and len(result.quantized) == 14
    assert {"token_embd.weight", "output_norm.weight", "output.weight", "blk.1.attn_q.weight",
            "blk.1.ffn_gate.weight"} <= set(tensors)
    reference = _reference(llama, preset, result.quantized, torch.float16)
    for name, w_hat in reference.items():
        t = tensors[gguf_name[name]]
        assert t.tensor_type == getattr(gguf.GGMLQuantizationType, qtype)
        values = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type)).reshape(w_hat.shape)
        assert torch.equal(values, _llama_cpp_order(name, w_hat, config)), name
    assert not torch.equal(_llama_cpp_order("q_proj.weight", w_hat := reference["model.layers.0.self_attn.q_proj.weight"],
                                            config), w_hat), "Q rows are reordered"
    for name in result.kept:
        assert torch.equal(torch.from_numpy(tensors[gguf_name[name]].data.copy()).reshape(original[name].shape),
                           original[name].float()), name
    assert _field(reader, "squeezer.preset") == preset and _field(reader, "general.architecture") == "llama"
    expected = {"llama.block_count": 2, "llama.embedding_length": 64, "llama.feed_forward_length": 128,
                "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2,
                "llama.context_length": config["max_position_embeddings"],
                "general.file_type": getattr(gguf.LlamaFileType, f"MOSTLY_{qtype}")}
    assert {k: _field(reader, k) for k in expected} == expected
    assert _field(reader, "llama.rope.freq_base") == pytest.approx(config["rope_parameters"]["rope_theta"])
    assert _field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(config["rms_norm_eps"])


def test_gguf_carries_the_folders_vocabulary(tmp_path):
    folder = make_model_folder(tmp_path / "llama", "llama")
    reader = gguf.GGUFReader(str(quantize_pretrained(folder, "q8_0", tmp_path / "m.gguf", format="gguf").out))
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    field = reader.fields["tokenizer.ggml.tokens"]
    tokens = [bytes(field.parts[i]).decode() for i in field.data]
    assert tokens == tokenizer.convert_ids_to_tokens(list(range(256)))
    assert _field(reader, "tokenizer.ggml.model") == "gpt2"
    assert _field(reader, "tokenizer.ggml.unknown_token_id") == tokenizer.unk_token_id


def test_gpt2_conv1d_weights_are_quantized_as_their_transpose(tmp_path):
    folder = make_model_folder(tmp_path / "gpt2", "gpt2")
    result = quantize_pretrained(folder, "q8_0", tmp_path / "m.gguf", format="gguf")
    assert len(result.quantized) == 8 and all(".c_" in n for n in result.quantized)
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    tensors = {t.name: t for t in reader.tensors}
    assert _field(reader, "general.architecture") == "gpt2" and _field(reader, "gpt2.block_count") == 2
    original = _float_weights(folder)
    for name, hf in [("blk.0.attn_qkv.weight", "transformer.h.0.attn.c_attn.weight"),
                     ("blk.1.ffn_down.weight", "transformer.h.1.mlp.c_proj.weight")]:
        w = original[hf].t()  # Conv1D (in, out) -> (out, in)
        w_hat = dequantize(quantize_weight(hf, w, PRESETS["q8_0"].weight, torch.float16))
        t = tensors[name]
        assert torch.equal(torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type)).reshape(w.shape), w_hat)
    with pytest.raises(ConfigError, match="'gpt2' holds its Linear layers as Conv1D.*transformers cannot load"):
        quantize_pretrained(folder, "w8", tmp_path / "ct")
    assert not (tmp_path / "ct").exists()


def test_gpt2_output_matrix_is_its_own_lm_head_when_untied_else_the_embedding(tmp_path):
    import transformers

    tied = make_model_folder(tmp_path / "tied", "gpt2")
    config = transformers.AutoConfig.from_pretrained(tied)
    config.tie_word_embeddings = False
    torch.manual_seed(1)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "untied")
    for folder, source in [(tied, "transformer.wte.weight"), (tmp_path / "untied", "lm_head.weight")]:
        original = _float_weights(folder)
        out = quantize_pretrained(folder, "q8_0", tmp_path / f"{folder.name}.gguf", format="gguf").out
        outputs = [t for t in gguf.GGUFReader(str(out)).tensors if t.name == "output.weight"]
        assert len(outputs) == 1, folder.name
        assert torch.equal(torch.from_numpy(outputs[0].data.copy()).reshape(original[source].shape),
                           original[source]), folder.name
    assert ("lm_head.weight" in original
            and not torch.equal(original["lm_head.weight"], original["transformer.wte.weight"]))


def test_q4_0_grid_is_symmetric_with_codes_in_minus_7_to_7(llama):
    w = _float_weights(llama)["model.layers.0.mlp.down_proj.weight"]
    qt = quantize_weight("w", w, PRESETS["q4_0"].weight, torch.float16)
    assert qt.codes.min() >= -7 and qt.codes.max() <= 7 and qt.qparams.scale.shape == (64, 4)
    assert torch.equal(qt.qparams.scale, qt.qparams.scale.half().float()), "scales are fp16 values"


def test_streamed_sizes_refuse_an_initializer_range(tmp_path):
    with pytest.raises(ConfigError, match="size '7b' .*initializer_range=0.1 is not supported"):
        make_model_folder(tmp_path / "big", "llama", size="7b", initializer_range=0.1)
    assert not (tmp_path / "big").exists()


def test_memory_holds_at_most_two_source_tensors_at_a_time(llama, tmp_path, monkeypatch):
    live: set[int] = set()
    peak = [0]

    def track(tensor: torch.Tensor) -> torch.Tensor:
        key = id(tensor)
        live.add(key)
        peak[0] = max(peak[0], len(live))
        weakref.finalize(tensor, live.discard, key)
        return tensor

    tensor = HFFolder.tensor
    monkeypatch.setattr(HFFolder, "tensor", lambda self, shard, name: track(tensor(self, shard, name)))
    quantize_pretrained(llama, "w4g128", tmp_path / "ct")
    quantize_pretrained(llama, "q4_0", tmp_path / "m.gguf", format="gguf")
    assert 1 <= peak[0] <= 2, peak[0]  # the tensor being quantized, and the previous one until it is replaced
    assert len(_float_weights(llama)) > 20


def test_refusals_name_the_culprit(llama, tmp_path):
    with pytest.raises(ConfigError, match=r"preset 'w4g128' has no GGUF block type; supported: q8_0, q4_0"):
        quantize_pretrained(llama, "w4g128", tmp_path / "m.gguf", format="gguf")
    with pytest.raises(ConfigError, match=r"'w8a8'.*supported: w8, w8g128, w4g128"):
        quantize_pretrained(llama, "w8a8", tmp_path / "x")
    with pytest.raises(ConfigError, match=r"format 'onnx'.*compressed-tensors, gguf"):
        quantize_pretrained(llama, "w8", tmp_path / "x", format="onnx")
    with pytest.raises(ModelError, match="cannot read config.json"):
        quantize_pretrained(tmp_path, "w8", tmp_path / "x")
    mixtral = make_model_folder(tmp_path / "mixtral", "mixtral")
    with pytest.raises(ConfigError, match="model_type 'mixtral' has no llama.cpp GGUF layout here"):
        quantize_pretrained(mixtral, "q8_0", tmp_path / "m.gguf", format="gguf")
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".m.gguf*"))


def test_cli_pretrained_writes_gguf_and_refuses_in_one_line(llama, tmp_path):
    assert cli.HF_PRESETS == data_free_presets() and cli.HF_FORMATS == FORMATS
    runner = CliRunner()
    out = tmp_path / "m.gguf"
    done = runner.invoke(cli.app, ["pretrained", "--hf", str(llama), "--preset", "q4_0", "--format", "gguf",
                                   "--out", str(out)])
    assert done.exit_code == 0, done.output
    assert "14 weights quantized" in done.output and len(gguf.GGUFReader(str(out)).tensors) > 20
    bad = runner.invoke(cli.app, ["pretrained", "--hf", str(llama), "--preset", "w8", "--format", "gguf",
                                  "--out", str(out)])
    assert bad.exit_code == 2 and "error: preset 'w8' has no GGUF block type" in bad.output


def test_weight_rounding_guards():
    spec = PRESETS["q8_0"].weight
    w = torch.randn(4, 64)
    w[1] = 0.0
    w[2, :32] = 1e-9  # below fp16's smallest scale: stays a finite, nonzero scale
    qt = quantize_weight("w", w, spec, torch.float16)
    assert torch.equal(dequantize(qt)[1], torch.zeros(64)) and bool((qt.qparams.scale > 0).all())
    w[3, 5] = float("nan")
    with pytest.raises(DataError, match="weight 'blk.w' holds NaN"):
        quantize_weight("blk.w", w, spec, torch.float16)

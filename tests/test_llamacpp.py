"""Squeezer's GGUF files run in llama.cpp (the build bundled in the gpt4all wheel, :mod:`squeezer.hf.llamacpp`):
tiny seeded Llama / Qwen2 / GPT-2 folders with a byte-level BPE tokenizer, written as Q8_0 and Q4_0, loaded by
llama.cpp, which tokenizes a text as the folder's tokenizer does and greedily generates the tokens that squeezer's
quantized model generates, with the same logits up to llama.cpp's activation rounding.

Squeezer's model is the folder's transformers model with each quantized weight replaced by squeezer's codes
times their fp16 block scales (``dequantize(quantize_weight(...))``: the values the file stores). Tolerance: llama.cpp
rounds each activation row to Q8_0 blocks (step ``max|x| / 127`` per 32 values) before every Q8_0 / Q4_0 product
and keeps K / V in fp16, so its logits differ from the exact ones; on these models (weights drawn at
``initializer_range=0.1``, where attention follows the query-key products) that difference stays below 0.13 of the
logits' standard deviation, and the tolerance is 0.25 of it. A layout error is far larger: Q / K rows left in
Hugging Face's order give about 4 standard deviations (checked below), and for Q4_0 the float model itself lies
1.5 to 1.9 away. The logits are compared along llama.cpp's own tokens (squeezer's model run on the prompt and
llama.cpp's tokens), so one check covers every step. The greedy tokens are compared exactly: weights, prompt and
llama.cpp's single-thread CPU kernels are deterministic, and at each step of these runs the two best tokens'
logits differ by more than llama.cpp moves them (a flip needs a gap smaller than that, as on a near-tie).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("gpt4all")
transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

from squeezer.causal_lm import greedy_generate  # noqa: E402
from squeezer.config import PRESETS  # noqa: E402
from squeezer.errors import ConfigError, DataError, ModelError  # noqa: E402
from squeezer.hf import gguf_file, quantize_pretrained  # noqa: E402
from squeezer.hf.llamacpp import LlamaCpp, require_avx2  # noqa: E402
from squeezer.hf.testmodels import make_model_folder  # noqa: E402
from squeezer.hf.weights import quantize_weight  # noqa: E402
from squeezer.quant.core import dequantize  # noqa: E402

TEXT = "the model weights are quantized, one block at a time!\nwith 12 layers of data"
NEW_TOKENS = 12
TOLERANCE = 0.25
"""Largest logit difference allowed, in standard deviations of squeezer's logits (module docstring)."""


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("llamacpp")
    return {arch: make_model_folder(root / arch, arch, tokenizer="bpe", initializer_range=0.1)
            for arch in ("llama", "qwen2", "gpt2")}


def _squeezer_model(folder: Path, preset: str, quantized: list[str]):
    """The folder's model computing with squeezer's quantized weights (codes times fp16 block scales)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    weights = model.state_dict()
    with torch.no_grad():
        for name in quantized:
            w = weights[name]
            linear = w.t() if model.config.model_type == "gpt2" else w  # GPT-2's Conv1D holds (in, out)
            w_hat = dequantize(quantize_weight(name, linear, PRESETS[preset].weight, torch.float16))
            w.copy_(w_hat.t() if model.config.model_type == "gpt2" else w_hat)
    return model


def _logits_along(model, prompt: list[int], generated: list[int]) -> np.ndarray:
    """Squeezer's next-token logits after the prompt and each of llama.cpp's tokens but the last ``(n, vocab)``."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + generated[:-1]])).logits[0, len(prompt) - 1:]
    return logits.numpy()


def _run(folder: Path, preset: str, out: Path):
    result = quantize_pretrained(folder, preset, out, format="gguf")
    prompt = transformers.AutoTokenizer.from_pretrained(folder)(TEXT).input_ids
    with LlamaCpp(out, threads=1) as llama:
        assert llama.tokenize(TEXT) == prompt, "llama.cpp tokenizes the text as the folder's tokenizer does"
        generation = llama.generate(prompt, NEW_TOKENS)
    return result, prompt, generation


@pytest.mark.parametrize("arch, preset", [("llama", "q8_0"), ("llama", "q4_0"), ("qwen2", "q8_0"),
                                          ("qwen2", "q4_0"), ("gpt2", "q8_0")])
def test_llama_cpp_generates_squeezers_greedy_tokens_with_its_logits(folders, tmp_path, arch, preset):
    result, prompt, generation = _run(folders[arch], preset, tmp_path / "m.gguf")
    model = _squeezer_model(folders[arch], preset, result.quantized)
    reference = _logits_along(model, prompt, generation.ids)
    tolerance = TOLERANCE * reference.std()
    assert generation.logits.shape == reference.shape == (NEW_TOKENS, model.config.vocab_size)
    assert np.abs(generation.logits - reference).max() <= tolerance
    assert generation.ids == greedy_generate(model, prompt, NEW_TOKENS)[len(prompt):].tolist()
    if preset == "q4_0":  # the float model's logits lie further than the tolerance: the codes are what runs
        float_model = transformers.AutoModelForCausalLM.from_pretrained(folders[arch]).eval()
        assert np.abs(generation.logits - _logits_along(float_model, prompt, generation.ids)).max() > tolerance
    assert generation.prefill_s > 0 and generation.decode_s > 0


def test_q_k_rows_in_hugging_faces_order_break_the_match(folders, tmp_path, monkeypatch):
    monkeypatch.setattr(gguf_file.LlamaCppLayout, "rows", lambda self, name, n: None)
    result, prompt, generation = _run(folders["llama"], "q8_0", tmp_path / "m.gguf")
    reference = _logits_along(_squeezer_model(folders["llama"], "q8_0", result.quantized), prompt, generation.ids)
    assert np.abs(generation.logits - reference).max() > TOLERANCE * reference.std()


def test_llama_cpp_refusals_name_the_file(folders, tmp_path):
    word = make_model_folder(tmp_path / "word", "llama")  # word-level tokenizer: no merges
    out = quantize_pretrained(word, "q8_0", tmp_path / "word.gguf", format="gguf").out
    with pytest.raises(ModelError, match=r"cannot load .*word\.gguf.*merges"):
        LlamaCpp(out)
    with pytest.raises(DataError, match="missing.gguf does not exist"):
        LlamaCpp(tmp_path / "missing.gguf")
    out = quantize_pretrained(folders["llama"], "q8_0", tmp_path / "m.gguf", format="gguf").out
    with LlamaCpp(out, n_ctx=16, threads=1) as llama:
        with pytest.raises(ConfigError, match="exceed the context of 16"):
            llama.generate(list(range(10)), 8)
        assert len(llama.generate(list(range(10)), 7).ids) == 7, "the last token is never decoded: 16 fit"
        with pytest.raises(DataError, match=r"must lie in \[0, 256\)"):
            llama.generate([300], 1)


def test_an_unclosed_model_is_freed_when_collected(folders, tmp_path):
    out = quantize_pretrained(folders["llama"], "q8_0", tmp_path / "m.gguf", format="gguf").out
    llama = LlamaCpp(out, n_ctx=16, threads=1)
    freed = llama._finalizer
    assert freed.alive
    del llama
    assert not freed.alive, "dropping the last reference frees llama.cpp's context and model"


def test_a_cpu_without_avx2_is_refused_before_loading(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse sse2 avx\n")
    with pytest.raises(ConfigError, match="needs a CPU with AVX2.*no avx2 flag"):
        require_avx2(cpuinfo)
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse sse2 avx avx2 fma\n")
    require_avx2(cpuinfo)

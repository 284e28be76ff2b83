"""Perplexity and greedy generation of causal language models (squeezer.causal_lm)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from squeezer.causal_lm import greedy_generate, perplexity
from squeezer.errors import ConfigError, DataError


class Bigram(nn.Module):
    """``logits[t] = table[ids[t]]``: a model whose every conditional probability is known."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(0)))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table[ids]


def test_perplexity_of_a_bigram_model_is_its_mean_conditional_log_likelihood() -> None:
    model, ids = Bigram(11), torch.randint(0, 11, (97,), generator=torch.Generator().manual_seed(1))
    logp = torch.log_softmax(model.table.detach(), dim=-1)
    nll = -sum(float(logp[a, b]) for a, b in zip(ids[:-1].tolist(), ids[1:].tolist())) / 96
    for seq_len, stride in ((97, None), (16, None), (16, 5), (16, 15), (2, 1)):
        result = perplexity(model, ids, seq_len=seq_len, stride=stride)
        assert result.tokens == 96  # every token after the first, once
        assert result.nll == pytest.approx(nll, rel=1e-5) and result.ppl == pytest.approx(math.exp(nll), rel=1e-5)


def _tiny_llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return transformers.LlamaForCausalLM(config).eval()


def test_perplexity_of_chained_windows_matches_transformers_own_loss() -> None:
    model, ids = _tiny_llama(), torch.randint(0, 64, (64,), generator=torch.Generator().manual_seed(2))
    windows = [ids[s:s + 16] for s in range(0, 63, 15)]  # each starts on the last token of the one before
    with torch.no_grad():  # transformers' loss: the mean over a window's len - 1 next-token targets
        total = sum(float(model(w.unsqueeze(0), labels=w.unsqueeze(0)).loss) * (len(w) - 1) for w in windows)
    result = perplexity(model, ids, seq_len=16)
    assert result.tokens == 63 and result.nll == pytest.approx(total / 63, rel=1e-5)
    assert perplexity(model, ids, seq_len=16, stride=4).nll < result.nll  # more context per token


def test_greedy_generation_matches_transformers_generate() -> None:
    model, prompt = _tiny_llama(), torch.tensor([3, 17, 5, 42])
    with torch.no_grad():
        expected = model.generate(prompt.unsqueeze(0), max_new_tokens=12, do_sample=False, min_new_tokens=12,
                                  pad_token_id=0)[0]
    assert torch.equal(greedy_generate(model, prompt, 12), expected)


def test_bad_input_names_the_problem() -> None:
    model = Bigram(5)
    with pytest.raises(DataError, match="1-D stream"):
        perplexity(model, torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ConfigError, match="stride"):
        perplexity(model, torch.arange(5), seq_len=4, stride=4)
    with pytest.raises(DataError, match="not logits"):
        perplexity(lambda ids: (ids,), torch.arange(5))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="new_tokens"):
        greedy_generate(model, torch.arange(3), -1)


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    pytest.importorskip("transformers")
    from squeezer.hf.testmodels import WORDS, make_model_folder

    root = tmp_path_factory.mktemp("lm")
    folder = make_model_folder(root / "llama", "llama", "tiny", seed=3)
    text = root / "text.txt"
    g = torch.Generator().manual_seed(4)
    text.write_text(" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (300,), generator=g).tolist()))
    return folder, text


def test_a_folder_and_its_quantized_output_evaluated_on_the_same_text(llama_folder, tmp_path) -> None:
    from squeezer.hf import quantize_pretrained
    from squeezer.hf.lm_eval import evaluate_folder

    folder, text = llama_folder
    quantize_pretrained(folder, "w8", tmp_path / "w8")
    base = evaluate_folder(folder, text, seq_len=64, prompt="the model", new_tokens=5)
    w8 = evaluate_folder(tmp_path / "w8", text, seq_len=64, prompt="the model", new_tokens=5)
    assert base["tokens"] == w8["tokens"] == 299
    assert w8["perplexity"] != base["perplexity"]  # the quantized weights are what ran
    assert abs(w8["perplexity"] / base["perplexity"] - 1) < 0.02
    assert len(base["generation"].split()) == 5


def test_cli_lm_eval_prints_and_writes_the_result(llama_folder, tmp_path) -> None:
    import json

    from typer.testing import CliRunner

    from squeezer.cli import app

    folder, text = llama_folder
    out = tmp_path / "ppl.json"
    result = CliRunner().invoke(app, ["lm-eval", "--hf", str(folder), "--text", str(text), "--seq-len", "32",
                                      "--json", str(out)])
    assert result.exit_code == 0, result.output
    saved = json.loads(out.read_text())
    assert f"perplexity {saved['perplexity']:.4f} over 299 tokens" in result.output
    missing = CliRunner().invoke(app, ["lm-eval", "--hf", str(tmp_path), "--text", str(text)])
    assert missing.exit_code == 2 and "not a Hugging Face model folder" in missing.output

"""A Hugging Face causal-LM folder (the original, or a quantized compressed-tensors output) evaluated on a text:
perplexity (:func:`squeezer.causal_lm.perplexity`) and a greedy continuation of a prompt."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from ..causal_lm import greedy_generate, perplexity
from ..errors import ConfigError, DataError, ModelError, excerpt


def load_causal_lm(folder: str | Path) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of a transformers causal-LM folder, in float32 and eval mode; compressed-tensors
    folders load through the ``compressed-tensors`` library (transformers reads their quantization config)."""
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise ConfigError("evaluating a Hugging Face folder needs transformers: pip install 'squeezer[hf]'") from None
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ModelError(f"--hf {folder}: not a Hugging Face model folder (no config.json)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise ModelError(f"--hf {folder}: no tokenizer could be loaded from the folder ({excerpt(str(exc))})") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"--hf {folder}: transformers cannot load it as a causal LM ({excerpt(str(exc))})") from None
    return model.eval(), tokenizer


def evaluate_folder(folder: str | Path, text: str | Path, seq_len: int = 512, stride: int | None = None,
                    max_tokens: int = 4096, prompt: str | None = None, new_tokens: int = 32) -> dict[str, Any]:
    """Perplexity of the folder's model on the first ``max_tokens`` tokens of the file ``text``, and, with
    ``prompt``, its greedy continuation of ``new_tokens`` tokens. Returns a JSON-ready dict."""
    try:
        body = Path(text).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"--text {text}: cannot read it as UTF-8 text ({exc})") from None
    model, tokenizer = load_causal_lm(folder)
    ids = torch.tensor(tokenizer(body)["input_ids"][:max_tokens])
    if ids.numel() < 2:
        raise DataError(f"--text {text}: fewer than 2 tokens after tokenising")
    start = time.perf_counter()
    result: dict[str, Any] = {"model": str(folder), "text": str(text), "seq_len": seq_len,
                              **perplexity(model, ids, seq_len, stride).to_dict()}
    result["perplexity_seconds"] = time.perf_counter() - start
    if prompt is not None:
        prompt_ids = torch.tensor(tokenizer(prompt)["input_ids"])
        out = greedy_generate(model, prompt_ids, new_tokens)
        result["prompt"], result["generation"] = prompt, tokenizer.decode(out[prompt_ids.numel():])
    return result

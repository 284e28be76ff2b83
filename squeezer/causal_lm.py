"""Causal language-model evaluation: perplexity on a token stream and greedy generation.

A model here is any module called as ``model(ids)`` with ``ids: (B, T)`` token ids that returns next-token
logits ``(B, T, V)`` (a tensor, or an object / mapping with ``logits``: transformers' causal LMs, their
quantized or packed copies).

Perplexity over windows: the stream ``t_0 .. t_{N-1}`` is cut into windows of ``seq_len`` tokens that
start every ``stride <= seq_len - 1`` tokens (so consecutive windows share at least one token); in each
window only the tokens not scored by an earlier window count, so every token after the first is scored
once, with ``c_i`` (at most ``seq_len - 1``) tokens of context:

    PPL = exp( -1/n * sum_i log p(t_i | t_{max(0, i - c_i)} .. t_{i-1}) )

Greedy generation appends ``argmax_v logits[-1, v]`` one token at a time (no cache: the whole sequence is run
each step, so it serves every model; transformers' own ``generate`` is faster where a cache exists).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import ConfigError, DataError


def logits_of(output: Any) -> Tensor:
    """The logits of a model's output: the tensor itself, ``output.logits`` or ``output["logits"]``."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping) and "logits" in output:
        return output["logits"]
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    raise DataError(f"the model returned {type(output).__name__}, not logits (a tensor or an output with .logits)")


@dataclass(frozen=True)
class Perplexity:
    """``ppl = exp(nll)``, ``nll`` the mean negative log-likelihood (nats) of ``tokens`` scored tokens."""

    ppl: float
    nll: float
    tokens: int

    def to_dict(self) -> dict[str, float | int]:
        return {"perplexity": self.ppl, "nll": self.nll, "tokens": self.tokens}


def _checked_ids(ids: Tensor | list[int], name: str) -> Tensor:
    ids = torch.as_tensor(ids)
    if ids.dim() != 1 or ids.dtype not in (torch.int32, torch.int64) or ids.numel() < 2:
        raise DataError(f"{name}: expected a 1-D stream of at least 2 integer token ids, got "
                        f"{tuple(ids.shape)} {ids.dtype}")
    return ids.long()


@torch.no_grad()
def perplexity(model: nn.Module, ids: Tensor | list[int], seq_len: int = 512, stride: int | None = None) -> Perplexity:
    """Perplexity of ``model`` on the token stream ``ids`` ``(N,)``, windows of ``seq_len`` every ``stride``
    tokens (default ``seq_len - 1``: each window starts on the last token of the previous one; a smaller
    stride gives each token more context at more compute)."""
    ids = _checked_ids(ids, "perplexity")
    stride = seq_len - 1 if stride is None else stride
    if seq_len < 2 or not 1 <= stride <= seq_len - 1:
        raise ConfigError(f"perplexity: need seq_len >= 2 and 1 <= stride <= seq_len - 1, got seq_len={seq_len}, "
                          f"stride={stride}")
    total, count, scored_to = 0.0, 0, 0  # scored_to: tokens [1, scored_to) are already scored
    for start in range(0, ids.numel() - 1, stride):
        window = ids[start:start + seq_len]
        if window.numel() < 2:
            break
        logits = logits_of(model(window.unsqueeze(0)))[0, :-1].float()
        targets = window[1:]
        fresh = max(scored_to, start + 1) - (start + 1)  # targets of this window already scored
        nll = F.cross_entropy(logits[fresh:], targets[fresh:], reduction="sum")
        total += float(nll)
        count += targets.numel() - fresh
        scored_to = start + window.numel()
        if scored_to >= ids.numel():
            break
    return Perplexity(math.exp(total / count), total / count, count)


@torch.no_grad()
def greedy_generate(model: nn.Module, prompt: Tensor | list[int], new_tokens: int) -> Tensor:
    """``prompt`` ``(T,)`` followed by ``new_tokens`` greedy tokens: ``t_{k+1} = argmax logits(t_0..t_k)[-1]``."""
    ids = torch.as_tensor(prompt).long()
    if ids.dim() != 1 or ids.numel() == 0:
        raise DataError(f"greedy_generate: expected a 1-D prompt of token ids, got shape {tuple(ids.shape)}")
    if new_tokens < 0:
        raise ConfigError(f"greedy_generate: new_tokens must be >= 0, got {new_tokens}")
    for _ in range(new_tokens):
        step = logits_of(model(ids.unsqueeze(0)))[0, -1]
        ids = torch.cat([ids, step.argmax().reshape(1)])
    return ids

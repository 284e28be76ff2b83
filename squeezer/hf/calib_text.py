"""Calibration token batches of a Hugging Face folder: token-id arrays as given, or texts tokenised by the
folder's own tokenizer and cut into ``n_samples`` windows of ``seq_len`` tokens."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import DataError, excerpt


def tokenize_texts(folder: Path, texts: Sequence[str], seq_len: int, n_samples: int) -> list[Tensor]:
    """The texts joined by blank lines, tokenised by ``AutoTokenizer.from_pretrained(folder)``, cut into up to
    ``n_samples`` consecutive windows ``(1, seq_len)`` (the short tail is dropped)."""
    from transformers import AutoTokenizer

    if seq_len < 1 or n_samples < 1:
        raise DataError(f"--seq-len ({seq_len}) and --n-samples ({n_samples}) must be positive")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError) as exc:
        raise DataError(f"{folder} has no tokenizer that transformers can load (tokenizer.json / "
                        f"tokenizer_config.json), needed to tokenise --calib-text: {excerpt(str(exc))}") from None
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"]
    windows = min(n_samples, len(ids) // seq_len)
    if windows == 0:
        raise DataError(f"--calib-text holds {len(ids)} tokens, fewer than one window of --seq-len {seq_len}")
    tokens = torch.tensor(ids[:windows * seq_len], dtype=torch.long)
    return list(tokens.reshape(windows, 1, seq_len))


def token_batches(calib: Sequence, folder: Path, vocab_size: int, seq_len: int, n_samples: int) -> list[Tensor]:
    """``calib`` as batches of token ids ``(B, T)``: texts (all ``str``) through :func:`tokenize_texts`, or
    arrays / lists / tensors of ids (a 1-D one is one row), each id in ``[0, vocab_size)``."""
    if isinstance(calib, (str, Tensor, np.ndarray)) or len(calib) == 0:
        raise DataError("calib must be a non-empty list of texts or of token-id arrays", argument="calib")
    if all(isinstance(item, str) for item in calib):
        return tokenize_texts(folder, calib, seq_len, n_samples)
    batches = []
    for i, item in enumerate(calib):
        try:
            ids = torch.as_tensor(np.asarray(item))
        except (TypeError, ValueError):
            raise DataError(f"calib item {i} is a {type(item).__name__}; expected a text or token ids") from None
        if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.dim() not in (1, 2) or ids.numel() == 0:
            raise DataError(f"calib item {i} must be a non-empty 1-D or 2-D array of integer token ids, "
                            f"got {ids.dtype} {list(ids.shape)}")
        if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
            raise DataError(f"calib item {i}: token ids must lie in [0, {vocab_size}) (the folder's vocab_size)")
        batches.append(ids.long().reshape(-1, ids.shape[-1]))
    return batches

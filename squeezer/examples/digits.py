"""Bundled handwritten digits (8x8, 10 classes) and a small CNN for vision examples.

Split: stratified, seeded, 70 % train / 30 % test; pixels scaled to ``x / 16``.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

import numpy as np
import torch
from torch import Tensor, nn


@dataclass
class DigitsTask:
    """Train / test tensors: images ``(n, 1, 8, 8)`` float32 in [0, 1], labels ``(n,)`` int64."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """``(images (1797, 8, 8) uint8, labels (1797,) uint8)`` from the bundled file."""
    with resources.files("squeezer.data").joinpath("digits.npz").open("rb") as handle:
        data = np.load(handle)
        return data["images"], data["target"]


def make_digits_task(seed: int = 0, test_fraction: float = 0.3) -> DigitsTask:
    images, labels = load_digits_arrays()
    rng = np.random.default_rng(seed)
    test = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[: int(round(test_fraction * (labels == c).sum()))]
                           for c in range(10)])
    is_test = np.zeros(len(labels), dtype=bool)
    is_test[test] = True
    x = torch.from_numpy(images.astype(np.float32) / 16.0).unsqueeze(1)
    y = torch.from_numpy(labels.astype(np.int64))
    return DigitsTask(x[~is_test], y[~is_test], x[is_test], y[is_test])


class DigitsCNN(nn.Module):
    """conv(1->16, 3x3) -> ReLU -> conv(16->32, 3x3, stride 2) -> ReLU -> Linear(32*4*4 -> 10)."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.fc = nn.Linear(2 * width * 16, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(h.flatten(1))


def train_digits_model(task: DigitsTask, seed: int = 0, epochs: int = 15, lr: float = 2e-3) -> DigitsCNN:
    """Adam on cross-entropy, mini-batches of 64, seeded; returns the model in eval mode."""
    torch.manual_seed(seed)
    model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(task.y_train), generator=gen).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(task.x_train[idx]), task.y_train[idx]).backward()
            opt.step()
    return model.eval()


def digits_accuracy(model: nn.Module, task: DigitsTask) -> float:
    """Top-1 accuracy on the test split."""
    with torch.no_grad():
        return float((model(task.x_test).argmax(1) == task.y_test).float().mean())

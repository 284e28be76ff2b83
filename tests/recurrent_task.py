"""A small synthetic sequence task and recurrent models trained on it (seeded), shared by the recurrent tests.

Inputs ``x (B, T, 4)`` of standard normal noise; two targets per step that need memory: a leaky sum
``a_t = 0.7 a_{t-1} + x_t0 - 0.5 x_t2`` and the delayed input ``x_{t-3, 1}``.
"""

from __future__ import annotations

from functools import cache

import torch
from torch import Tensor, nn


class Seq(nn.Module):
    """``head(rnn(x)[0])``, or the recurrent output alone (``head=False``)."""

    def __init__(self, rnn: nn.RNNBase, head: bool = True) -> None:
        super().__init__()
        self.rnn = rnn
        self.head = nn.Linear(rnn.proj_size or rnn.hidden_size * (2 if rnn.bidirectional else 1), 4) if head else None

    def forward(self, x: Tensor) -> Tensor:
        y = self.rnn(x)[0]
        return y if self.head is None else self.head(y)


class SequenceModel(nn.Module):
    """``head(rnn(x)[0])``: a 2-layer batch-first recurrent layer and a per-step linear head."""

    def __init__(self, rnn_class: type[nn.RNNBase], hidden: int = 32) -> None:
        super().__init__()
        self.rnn = rnn_class(4, hidden, num_layers=2, batch_first=True)
        self.head = nn.Linear(hidden, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.rnn(x)[0])


def batch(n: int, generator: torch.Generator, steps: int = 16) -> tuple[Tensor, Tensor]:
    """``(x (n, steps, 4), y (n, steps, 2))`` of the task."""
    x = torch.randn(n, steps, 4, generator=generator)
    y = torch.zeros(n, steps, 2)
    acc = torch.zeros(n)
    for t in range(steps):
        acc = 0.7 * acc + x[:, t, 0] - 0.5 * x[:, t, 2]
        y[:, t, 0] = acc
        if t >= 3:
            y[:, t, 1] = x[:, t - 3, 1]
    return x, y


def mse(model: nn.Module, data: tuple[Tensor, Tensor]) -> float:
    with torch.no_grad():
        return float(((model(data[0]) - data[1]) ** 2).mean())


@cache
def trained(rnn_class: type[nn.RNNBase], steps: int = 200) -> SequenceModel:
    """A model trained with Adam for ``steps`` batches of 32 (seeded); callers must not change it."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = SequenceModel(rnn_class)
    optimizer = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(steps):
        x, y = batch(32, generator)
        loss = ((model(x) - y) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def held_out(seed: int = 1, calib_batches: int = 4) -> tuple[list[Tensor], tuple[Tensor, Tensor]]:
    """Calibration inputs (``calib_batches`` batches of 32) and a held-out set of 256 sequences."""
    generator = torch.Generator().manual_seed(seed)
    calib = [batch(32, generator)[0] for _ in range(calib_batches)]
    return calib, batch(256, generator)

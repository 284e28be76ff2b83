"""German credit scoring example: bundled data, an MLP classifier, training and metrics.

The task is binary classification of 1,000 loan applicants (Statlog German Credit Data,
UCI, CC BY 4.0; see ``squeezer/data/README.md``); the positive class is ``creditability == "bad"``.
"""

from __future__ import annotations

import csv
import gzip
import io
from dataclasses import dataclass
from importlib.resources import files

import numpy as np
import torch
from torch import Tensor, nn

from ..task_metrics import roc_auc

DATA_FILE = "german_credit.csv.gz"
LABEL_COLUMN = "creditability"
POSITIVE_LABEL = "bad"
BATCH_SIZE = 64


def _is_numeric(values: list[str]) -> bool:
    try:
        for v in values:
            float(v)
    except ValueError:
        return False
    return True


def load_german_credit() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Read the bundled German credit table and encode it as a numeric design matrix.

    Numeric columns are kept as float; each text column ``c`` with categories ``v_1 < ... < v_k``
    (sorted) becomes ``k`` indicator columns named ``"c=v_j"`` with ``x = 1[value == v_j]``.
    Columns keep the file's order.

    Returns ``(X, y, feature_names)``: ``X`` float32 ``(n, d)``, ``y`` int64 ``(n,)`` with
    ``y = 1`` for ``creditability == "bad"`` and 0 for ``"good"``.
    """
    raw = files("squeezer.data").joinpath(DATA_FILE).read_bytes()
    with io.TextIOWrapper(gzip.GzipFile(fileobj=io.BytesIO(raw)), encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader)
        rows = [row for row in reader if row]
    columns = {name: [row[i] for row in rows] for i, name in enumerate(header)}

    labels = columns.pop(LABEL_COLUMN)
    unknown = set(labels) - {"good", POSITIVE_LABEL}
    if unknown:
        raise ValueError(f"unexpected {LABEL_COLUMN} values: {sorted(unknown)}")
    y = np.array([label == POSITIVE_LABEL for label in labels], dtype=np.int64)

    blocks: list[np.ndarray] = []
    names: list[str] = []
    for name, values in columns.items():
        if _is_numeric(values):
            blocks.append(np.asarray(values, dtype=np.float64)[:, None])
            names.append(name)
        else:
            categories = sorted(set(values))
            blocks.append(np.asarray(values)[:, None] == np.asarray(categories)[None, :])
            names.extend(f"{name}={c}" for c in categories)
    x = np.concatenate(blocks, axis=1).astype(np.float32)
    return x, y, names


@dataclass
class CreditTask:
    """Standardised train / test split; ``y`` is float32 in {0, 1} (1 = bad) for BCE losses."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    feature_names: list[str]


def _stratified_split(y: np.ndarray, test_fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Per class ``c`` with ``n_c`` rows, ``round(test_fraction * n_c)`` random rows go to test."""
    test_parts = []
    for c in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == c))
        test_parts.append(members[: int(round(test_fraction * members.size))])
    test = np.sort(np.concatenate(test_parts))
    train = np.setdiff1d(np.arange(y.size), test)
    return train, test


def make_credit_task(seed: int = 0, test_fraction: float = 0.3) -> CreditTask:
    """Stratified split (seeded ``np.random.default_rng``) and standardisation of every column,
    ``x' = (x - mean_train) / std_train`` with train statistics only (``std = 0`` is treated as 1).
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    x, y, names = load_german_credit()
    train, test = _stratified_split(y, test_fraction, np.random.default_rng(seed))
    mean = x[train].mean(axis=0)
    std = x[train].std(axis=0)
    std[std == 0] = 1.0
    x = (x - mean) / std

    def as_x(idx: np.ndarray) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(x[idx], dtype=np.float32))

    def as_y(idx: np.ndarray) -> Tensor:
        return torch.from_numpy(y[idx].astype(np.float32))

    return CreditTask(as_x(train), as_y(train), as_x(test), as_y(test), names)


class CreditMLP(nn.Module):
    """``[Linear -> ReLU -> Dropout] * len(hidden) -> Linear(., 1)``; returns logits of shape ``(batch,)``."""

    def __init__(self, n_features: int, hidden: tuple[int, ...] = (512, 256), dropout: float = 0.1) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = n_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(dropout)]
            width = h
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).squeeze(-1)


def train_credit_model(
    task: CreditTask,
    seed: int = 0,
    epochs: int = 10,
    lr: float = 1e-3,
    weight_decay: float = 5e-2,
) -> CreditMLP:
    """Train a :class:`CreditMLP` with Adam on ``BCEWithLogitsLoss`` in shuffled mini-batches of 64.

    ``weight_decay`` is Adam's L2 penalty (gradient ``+ weight_decay * w``); with the defaults
    (10 epochs) test ROC-AUC is about 0.78 and train ROC-AUC about 0.90 on 1,000 rows.

    Initialisation, dropout and shuffling all derive from ``seed``, so two calls with the same
    arguments return identical weights. The model is returned in eval mode.
    """
    torch.manual_seed(seed)
    model = CreditMLP(task.x_train.shape[1])
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    loss_fn = nn.BCEWithLogitsLoss()
    shuffle = torch.Generator().manual_seed(seed)
    n = task.x_train.shape[0]
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(n, generator=shuffle).split(BATCH_SIZE):
            optimizer.zero_grad()
            loss = loss_fn(model(task.x_train[batch]), task.y_train[batch])
            loss.backward()
            optimizer.step()
    return model.eval()


def accuracy(logits: Tensor, labels: Tensor) -> float:
    """Fraction with ``1[logit > 0] == label`` (logit 0 is probability 0.5)."""
    return float(((logits > 0).float() == labels.float()).float().mean())


def evaluate_credit(model: nn.Module, task: CreditTask) -> dict[str, float]:
    """Test-split ``{"accuracy", "roc_auc"}`` of ``model``'s logits, computed under ``torch.no_grad()``."""
    with torch.no_grad():
        logits = model(task.x_test)
    return {"accuracy": accuracy(logits, task.y_test), "roc_auc": roc_auc(logits, task.y_test)}

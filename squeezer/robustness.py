"""Robustness of a float model vs its compressed versions: noise, feature shift, adversarial attacks.

Compression moves decision boundaries, and quantized models are known to be easier to attack:
:func:`robustness` measures one metric for every model under the same perturbations, so the user
sees whether compression made the model more fragile.

Notation: ``x`` the inputs (samples on axis 0), ``s`` the per-feature standard deviation over
all samples of the data (``std(x, axis=0)``, one value per input element), ``L`` the loss.
Every perturbation is scaled by ``s``, so it means the same for standardized and raw features.

* Gaussian noise: ``x' = x + sigma * s * z``, ``z ~ N(0, 1)`` drawn once (seeded) and shared by
  every sigma and model, so the curves differ only by the model.
* Feature shift (2-D inputs ``(n, d)`` only): ``x'_f = x_f + shift * s_f`` for one feature ``f``
  at a time, all others unchanged.
* FGSM: ``x' = x + eps * s * sign(grad_x L(model(x), y))``.
* PGD: ``x_0 = x``, ``x_{t+1} = clip(x_t + (eps / 4) * s * sign(grad_x L(model(x_t), y)),
  x - eps * s, x + eps * s)`` for ``pgd_steps`` steps (L-inf ball of radius ``eps * s``; inputs
  are not clamped to ``[0, 1]``: they are standardized features, not pixels).
* Transfer: the PGD examples crafted on the ``source`` model, evaluated on every model.

Gradients flow through squeezer's quantized layers in their default ``simulate`` mode (clipped
straight-through estimators). A model without an input gradient (packed integer kernels, or an
output that does not depend differentiably on the input) is left out of FGSM / PGD and listed in
``skipped``; it is still evaluated on noise, feature shifts and transferred examples.

The result is a plain JSON-serialisable dict (metrics are floats, lists follow ``sigmas`` /
``features`` / ``eps``)::

    {
      "metric_name": str,                   # the metric function's __name__
      "n_samples": int,
      "clean": {label: metric},
      "noise": {"sigmas": [...], "models": {label: [metric per sigma]}},
      "feature_shift": None | {
          "shift_std": float,               # the shift, in standard deviations
          "features": [name per feature],
          "models": {label: [metric per shifted feature]},
          "largest_drop": [                 # up to 5 features, largest max-over-models drop first
              {"feature": name, "drop": {label: clean - shifted}}, ...],
      },
      "adversarial": {
          "eps": [...], "pgd_steps": int, "source": label,
          "fgsm": {label: [metric per eps]},
          "pgd": {label: [metric per eps]},
          "transfer": {label: [metric per eps]},   # empty when the source is skipped
      },
      "skipped": {label: reason},          # models left out of fgsm / pgd
    }

``drop`` assumes a higher metric is better (accuracy, ROC-AUC); pass a negated error metric
otherwise. At ``sigma = 0`` and ``eps = 0`` the metric is the clean one, exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from .errors import ConfigError, DataError, ModelError
from .training import infer_loss

Metric = Callable[[Tensor, Tensor], float]
Loss = Callable[[Tensor, Tensor], Tensor]
TOP_FEATURES = 5


def robustness(
    models: Mapping[str, nn.Module],
    data: Iterable[tuple[Tensor, Tensor]],
    metric: Metric,
    *,
    loss: Loss | None = None,
    noise_sigmas: Iterable[float] = (0.0, 0.05, 0.1, 0.2, 0.5),
    feature_shift: float | None = 1.0,
    feature_names: list[str] | None = None,
    eps: Iterable[float] = (0.0, 0.01, 0.03, 0.1),
    pgd_steps: int = 5,
    source: str | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Metric of every model under noise, feature shifts and FGSM / PGD / transfer attacks.

    ``metric(outputs, targets)`` is computed on the concatenated outputs and targets of all
    batches; ``loss`` (for the attacks) defaults to :func:`squeezer.training.infer_loss`
    (cross-entropy for integer class targets, BCE on one logit for 0/1 targets, MSE for one
    float output per sample). The returned dict is described in the module docstring.
    """
    sigmas, radii = _non_negative("noise_sigmas", noise_sigmas), _non_negative("eps", eps)
    source = _check_models(models, source)
    if pgd_steps < 1:
        raise ConfigError(f"pgd_steps must be >= 1, got {pgd_steps}")
    x, y, batch_size = _load(data)
    with _evaluating(models):
        run = _Run(models, x, y, batch_size, metric)
        clean = {label: run.score(label, x) for label in models}
        run.loss = loss or infer_loss(run.outputs(next(iter(models)), x[:batch_size]), y[:batch_size])
        skipped = {label: reason for label in models if (reason := run.gradient_problem(label)) is not None}
        return {
            "metric_name": getattr(metric, "__name__", type(metric).__name__),
            "n_samples": len(x),
            "clean": clean,
            "noise": _noise(run, sigmas, seed),
            "feature_shift": _feature_shift(run, clean, feature_shift, feature_names),
            "adversarial": _adversarial(run, radii, pgd_steps, source, skipped),
            "skipped": skipped,
        }


def _non_negative(name: str, values: Iterable[float]) -> list[float]:
    out = [float(v) for v in values]
    if any(not v >= 0 for v in out):
        raise ConfigError(f"{name} must be non-negative numbers, got {out}")
    return out


def _check_models(models: Mapping[str, nn.Module], source: str | None) -> str:
    """Validate ``models`` and return the source label (default: the first one)."""
    if not models:
        raise ConfigError("models is empty: give at least one {label: model}")
    for label, model in models.items():
        if not isinstance(model, nn.Module):
            raise ConfigError(f"models[{label!r}] is a {type(model).__name__}, not a torch nn.Module")
    source = next(iter(models)) if source is None else source
    if source not in models:
        raise ConfigError(f"source {source!r} is not one of the models {list(models)}")
    return source


def _load(data: Iterable[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor, int]:
    """Consume ``data`` once: all inputs and targets concatenated, and the first batch's size."""
    xs, ys = [], []
    for i, batch in enumerate(data):
        if not isinstance(batch, (tuple, list)) or len(batch) != 2 or not all(isinstance(t, Tensor) for t in batch):
            raise DataError(f"robustness batch {i} must be a pair of tensors (inputs, targets), got {type(batch).__name__}")
        x, y = batch
        if not x.is_floating_point():
            raise DataError(f"robustness batch {i} has {str(x.dtype).removeprefix('torch.')} inputs (token ids?): "
                            "noise, feature shifts and attacks perturb inputs and need floating-point features")
        if x.dim() == 0 or len(x) == 0 or len(x) != len(y):
            raise DataError(f"robustness batch {i}: inputs {tuple(x.shape)} and targets {tuple(y.shape)} must hold "
                            "the same non-zero number of samples on axis 0")
        if not torch.isfinite(x).all():
            raise DataError(f"robustness batch {i} has NaN or Inf inputs")
        xs.append(x.detach())
        ys.append(y.detach())
    if not xs:
        raise DataError("robustness data is empty: give at least one (inputs, targets) batch")
    try:
        return torch.cat(xs), torch.cat(ys), len(xs[0])
    except RuntimeError:
        shapes = sorted({(tuple(x.shape[1:]), tuple(y.shape[1:])) for x, y in zip(xs, ys)})
        raise DataError(f"robustness batches must share the per-sample shapes of inputs and targets, got {shapes}") from None


@contextmanager
def _evaluating(models: Mapping[str, nn.Module]) -> Iterator[None]:
    """Every module in eval mode and every parameter frozen (no ``.grad`` is ever written); restored after."""
    modules = [(m, m.training) for model in models.values() for m in model.modules()]
    params = [(p, p.requires_grad) for model in models.values() for p in model.parameters()]
    for model in models.values():
        model.eval()
    for p, _ in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for m, mode in modules:
            m.training = mode
        for p, flag in params:
            p.requires_grad_(flag)


class _Run:
    """The models, the data in memory, and batched evaluation / gradients on them."""

    def __init__(self, models: Mapping[str, nn.Module], x: Tensor, y: Tensor, batch_size: int, metric: Metric) -> None:
        self.models, self.x, self.y, self.batch_size, self.metric = models, x, y, batch_size, metric
        self.std = x.std(dim=0, correction=0)
        self.loss: Loss | None = None

    def outputs(self, label: str, x: Tensor) -> Tensor:
        out = self.models[label](x)
        if not isinstance(out, Tensor):
            raise ModelError(f"model {label!r} returned a {type(out).__name__}; robustness needs a tensor output")
        return out

    def score(self, label: str, x: Tensor) -> float:
        """``metric(model(x), y)`` over all samples, evaluated in the data's batch size."""
        with torch.no_grad():
            out = torch.cat([self.outputs(label, x[i:i + self.batch_size]) for i in range(0, len(x), self.batch_size)])
        return float(self.metric(out, self.y))

    def gradient_problem(self, label: str) -> str | None:
        """Why ``label`` has no input gradient for the attacks, or None when it has one."""
        packed = [name for name, m in self.models[label].named_modules() if getattr(m, "is_packed", False)]
        if packed:
            return (f"packed layer {packed[0]!r} runs integer kernels without a gradient: no white-box attack "
                    "(see the transfer attack)")
        x = self.x[:self.batch_size].clone().requires_grad_(True)
        with torch.enable_grad():
            if not self.loss(self.outputs(label, x), self.y[:self.batch_size]).requires_grad:
                return "the loss has no gradient with respect to the input: no white-box attack"
        return None

    def attack(self, label: str, radius: float, step: float, steps: int) -> Tensor:
        """L-inf PGD on ``label`` in the ball ``|x' - x| <= radius * s``, step ``step * s``, from ``x``."""
        adv = [self._pgd(label, self.x[i:i + self.batch_size], self.y[i:i + self.batch_size],
                         radius * self.std, step * self.std, steps)
               for i in range(0, len(self.x), self.batch_size)]
        return torch.cat(adv)

    def _pgd(self, label: str, x: Tensor, y: Tensor, radius: Tensor, step: Tensor, steps: int) -> Tensor:
        adv = x
        for _ in range(steps):
            adv = adv.clone().requires_grad_(True)
            with torch.enable_grad():
                (grad,) = torch.autograd.grad(self.loss(self.outputs(label, adv), y), adv)
            adv = torch.minimum(torch.maximum(adv.detach() + step * grad.sign(), x - radius), x + radius)
        return adv


def _noise(run: _Run, sigmas: list[float], seed: int) -> dict[str, Any]:
    """Metric per sigma of ``x + sigma * s * z`` (one seeded ``z`` for all sigmas and models)."""
    z = torch.randn(run.x.shape, generator=torch.Generator().manual_seed(seed), dtype=run.x.dtype)
    noisy = [run.x + sigma * run.std * z for sigma in sigmas]
    return {"sigmas": sigmas, "models": {label: [run.score(label, x) for x in noisy] for label in run.models}}


def _feature_shift(run: _Run, clean: dict[str, float], shift: float | None,
                   names: list[str] | None) -> dict[str, Any] | None:
    """Metric per feature ``f`` of ``x`` with column ``f`` shifted by ``shift * s_f`` (2-D inputs only)."""
    if shift is None or run.x.dim() != 2:
        return None
    d = run.x.shape[1]
    names = [f"x{j}" for j in range(d)] if names is None else [str(n) for n in names]
    if len(names) != d:
        raise ConfigError(f"feature_names has {len(names)} names but the inputs have {d} features")
    scores: dict[str, list[float]] = {label: [] for label in run.models}
    for f in range(d):
        shifted = run.x.clone()
        shifted[:, f] += shift * run.std[f]
        for label in run.models:
            scores[label].append(run.score(label, shifted))
    drops = [{"feature": names[f], "drop": {label: clean[label] - scores[label][f] for label in run.models}}
             for f in range(d)]
    drops.sort(key=lambda row: max(row["drop"].values()), reverse=True)
    return {"shift_std": float(shift), "features": names, "models": scores, "largest_drop": drops[:TOP_FEATURES]}


def _adversarial(run: _Run, radii: list[float], steps: int, source: str, skipped: dict[str, str]) -> dict[str, Any]:
    """FGSM and PGD per eps on each model with a gradient, and PGD examples of ``source`` on all."""
    attacked = [label for label in run.models if label not in skipped]
    fgsm: dict[str, list[float]] = {label: [] for label in attacked}
    pgd: dict[str, list[float]] = {label: [] for label in attacked}
    transfer: dict[str, list[float]] = {label: [] for label in run.models} if source in attacked else {}
    for eps in radii:
        for label in attacked:
            x_fgsm = run.x if eps == 0 else run.attack(label, eps, eps, 1)
            x_pgd = run.x if eps == 0 else run.attack(label, eps, eps / 4, steps)
            fgsm[label].append(run.score(label, x_fgsm))
            pgd[label].append(run.score(label, x_pgd))
            if label == source:
                for target, scores in transfer.items():
                    scores.append(run.score(target, x_pgd))
    return {"eps": radii, "pgd_steps": steps, "source": source, "fgsm": fgsm, "pgd": pgd, "transfer": transfer}

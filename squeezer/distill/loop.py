"""`distill`: train a student on the task and on a frozen teacher's outputs.

Per batch ``(x, y)``, with the teacher in eval mode and without gradients:

    ``L = alpha * L_task(s(x), y) + (1 - alpha) * L_KD(s(x), t(x); T) + beta * L_feat``

``L_KD`` is :func:`squeezer.distill.distillation_loss`, ``L_feat`` a :class:`FeatureMatcher`'s loss
(only when ``features`` is given). The student may be any model with the teacher's output shape:
a smaller architecture, a pruned copy or a QAT model from :func:`squeezer.qat.prepare_qat`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..calibration import call_model
from ..errors import ConfigError, DataError
from ..transform import attach_report, working_copy
from ..training import Callback, LossFn, fit, infer_loss, model_device, split_batch, to_device
from .features import FeatureMatcher
from .losses import distillation_loss


@dataclass
class DistillReport:
    """Per-epoch logs of a :func:`distill` run: ``loss``, ``task``, ``kd`` (and ``feature``)."""

    history: list[dict[str, float]]

    def to_dict(self) -> dict[str, Any]:
        return {"history": self.history}


def logits_of(output: Any) -> Tensor:
    """The logits of a model output: the tensor itself, ``output["logits"]`` or the first item."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping) and "logits" in output:
        return output["logits"]
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise DataError(f"cannot find the logits in a model output of type {type(output).__name__}")


class _WithTeacher:
    """Re-iterable batches ``(x, (y, teacher(x)))``; the teacher runs in eval mode without grad.

    With ``cache`` the teacher runs on the first pass only: its logits and the features the
    ``matcher`` captured from it are kept per batch position and put back on later passes, so
    ``data`` must be a sequence that yields the same batches every epoch.
    """

    def __init__(self, data: Iterable[Any], teacher: nn.Module, matcher: FeatureMatcher | None, cache: bool) -> None:
        if cache and not isinstance(data, Sequence):
            raise ConfigError(f"cache_teacher needs data as a sequence of batches (a list), got {type(data).__name__}: "
                              "a loader may yield other batches each epoch")
        self.data = data
        self.teacher = teacher
        self.matcher = matcher
        self.device = model_device(teacher)
        self.cache: list[tuple[Any, Tensor, dict[str, Tensor]]] | None = [] if cache else None

    def _run_teacher(self, inputs: Any) -> tuple[Tensor, dict[str, Tensor]]:
        with torch.no_grad():
            logits = logits_of(call_model(self.teacher, to_device(inputs, self.device)))
        features = {} if self.matcher is None else dict(self.matcher.teacher_features)
        return logits, features

    def __iter__(self) -> Iterator[tuple[Any, tuple[Any, Tensor]]]:
        for i, batch in enumerate(self.data):
            inputs, targets = split_batch(batch, i)
            if self.cache is None:
                logits, _ = self._run_teacher(inputs)
            elif i < len(self.cache):
                cached_inputs, logits, features = self.cache[i]
                if cached_inputs is not inputs:
                    raise DataError(f"cache_teacher: batch {i} is not the batch of the first epoch; give the same "
                                    "list of batches every epoch")
                if self.matcher is not None:
                    self.matcher.teacher_features.update(features)
            else:
                logits, features = self._run_teacher(inputs)
                self.cache.append((inputs, logits, features))
            yield inputs, (targets, logits)


def _check_weight(name: str, value: float, upper: float | None) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
    if not ok or (upper is not None and value > upper):
        bound = f"in [0, {upper}]" if upper is not None else "a finite number >= 0"
        raise ConfigError(f"{name} must be {bound}, got {value!r}")


def distill(
    student: nn.Module,
    teacher: nn.Module,
    data: Iterable[Any],
    epochs: int = 1,
    alpha: float = 0.5,
    temperature: float = 4.0,
    features: Mapping[str, str] | FeatureMatcher | None = None,
    *,
    beta: float = 1.0,
    optimizer: torch.optim.Optimizer | None = None,
    lr: float = 1e-3,
    loss_fn: LossFn | None = None,
    callbacks: Iterable[Callback] = (),
    step_callbacks: Iterable[Callback] = (),
    cache_teacher: bool = False,
    inplace: bool = False,
) -> nn.Module:
    """Train ``student`` against ``teacher`` (module docstring) with :func:`squeezer.training.fit`.

    ``data``: re-iterable ``(inputs, targets)`` batches; ``loss_fn(outputs, targets)`` is the task
    loss (inferred when None); ``features``: ``{student_module: teacher_module}`` pairs (a
    :class:`FeatureMatcher` is built, sized on the first batch, and removed at the end) or a
    ready matcher. The default optimizer is ``Adam(lr)`` over the student's trainable parameters
    and the projections. ``cache_teacher`` runs the teacher once per batch (first epoch) and
    reuses its logits and matched features afterwards: for a large teacher, ``epochs`` times fewer
    teacher forwards, at the memory of those outputs; ``data`` must then be a list of batches.
    Returns the trained student (a copy unless ``inplace``; :mod:`squeezer.transform`) carrying a
    :class:`DistillReport` of per-epoch logs of ``loss``, ``task``, ``kd`` (and ``feature``). An
    ``optimizer`` or a ready :class:`FeatureMatcher` holds the student's own modules: it needs
    ``inplace=True``.
    """
    if not inplace and (optimizer is not None or isinstance(features, FeatureMatcher)):
        raise ConfigError("distill: an optimizer or a FeatureMatcher built on the student trains that very student: "
                          "pass inplace=True")
    student = working_copy(student, inplace)
    _check_weight("alpha", alpha, 1.0)
    _check_weight("beta", beta, None)
    if iter(data) is data:
        raise DataError("data must be re-iterable (a list or DataLoader), not a one-shot iterator or generator")
    first = next(iter(data), None)
    if first is None:
        raise DataError("training data is empty: give at least one batch")
    matcher = features
    if isinstance(features, Mapping):
        matcher = FeatureMatcher(student, teacher, features, example=split_batch(first, 0)[0])
    if optimizer is None:
        params = [p for p in student.parameters() if p.requires_grad]
        if matcher is not None:
            params += list(matcher.parameters())
        optimizer = torch.optim.Adam(params, lr=lr)
    task_fn = loss_fn

    def objective(outputs: Any, targets: tuple[Any, Tensor]) -> dict[str, Tensor]:
        nonlocal task_fn
        y, teacher_logits = targets
        if task_fn is None:
            task_fn = infer_loss(outputs, y)
        student_logits = logits_of(outputs)
        kd = distillation_loss(student_logits, teacher_logits, temperature)  # checks the shapes first
        terms = {"task": task_fn(outputs, y), "kd": kd}
        terms["loss"] = alpha * terms["task"] + (1 - alpha) * terms["kd"]
        if matcher is not None:
            terms["feature"] = matcher.loss()
            terms["loss"] = terms["loss"] + beta * terms["feature"]
        return terms

    teacher_mode = teacher.training
    teacher.eval()
    try:
        history = fit(student, _WithTeacher(data, teacher, matcher, cache_teacher), epochs, optimizer, objective,
                      callbacks, step_callbacks=step_callbacks)
    finally:
        teacher.train(teacher_mode)
        if isinstance(features, Mapping):
            matcher.remove()
    return attach_report(student, DistillReport(history))

"""Input-feature pruning for tabular models: drop the input columns the first layer uses least.

The first ``nn.Linear`` (``W`` of shape ``(N, K)``) reads the ``K`` input columns; column ``j``
scores ``||W[:, j]||_1`` or ``||W[:, j]||_2`` (or a given importance vector, higher = more
important). The lowest-scoring columns are dropped: ``W <- W[:, kept]``, ``K <- len(kept)``.
The pruned model on ``x[..., kept]`` equals the original model on ``x`` with the dropped
columns set to 0, so with standardised (zero-mean) features dropping a column acts like
replacing it by its mean. Drop the same columns from the data, or wrap the model in
:class:`SelectColumns` to keep feeding full rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, fx, nn

from ..errors import ConfigError, DataError, ModelError
from ..transform import attach_report, working_copy
from .graph import call_counts, trace
from .mask import weight_mask
from .report import count_params
from .structured import Norm, check_norm, keep_top

PASS_THROUGH = (nn.Dropout, nn.Identity)


@dataclass
class FeaturePruneReport:
    """Which input columns were kept / dropped (ascending indices into the original columns)."""

    layer: str
    kept: list[int]
    dropped: list[int]
    kept_names: list[str] | None
    dropped_names: list[str] | None
    importance: list[float]
    params_before: int
    params_after: int
    model_params_before: int
    model_params_after: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class SelectColumns(nn.Module):
    """``model(x[..., kept], *rest)``: runs a feature-pruned model on full input rows."""

    def __init__(self, model: nn.Module, kept: Sequence[int]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("kept", torch.as_tensor(list(kept), dtype=torch.long))

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Any:
        return self.model(x.index_select(-1, self.kept), *args, **kwargs)


def input_layer(model: nn.Module) -> str:
    """Name of the ``nn.Linear`` (called once) that reads the model's first input, directly or
    through dropout / identity, when nothing else reads it. Raises :class:`ModelError` otherwise."""
    return _input_reader(trace(model))


def _input_reader(gm: fx.GraphModule) -> str:
    placeholder = next((n for n in gm.graph.nodes if n.op == "placeholder"), None)
    if placeholder is None:
        raise ModelError("the model's forward takes no input")
    counts = call_counts(gm)
    readers, stack = set(), [placeholder]
    while stack:
        for user in stack.pop().users:
            module = gm.get_submodule(user.target) if user.op == "call_module" else None
            if isinstance(module, PASS_THROUGH):
                stack.append(user)
            elif type(module) is nn.Linear and counts[user.target] == 1:
                readers.add(user.target)
            else:
                raise ModelError(f"the model input {placeholder.name!r} is read by {_name(user)}: its columns can be "
                                 "dropped only when a Linear called once (after dropout / identity) reads it alone")
    if len(readers) != 1:
        raise ModelError(f"the model input {placeholder.name!r} is read by {len(readers)} Linear layers "
                         f"{sorted(readers)}; expected exactly one")
    return readers.pop()


def _name(node: fx.Node) -> str:
    if node.op == "call_module":
        return f"module {node.target!r}"
    return "the model output" if node.op == "output" else f"{node.op.replace('call_', '')} node {node.name!r}"


def feature_importance(layer: nn.Linear, norm: Norm = "l2") -> Tensor:
    """``||W[:, j]||_p`` for every input column ``j`` of a Linear weight ``W`` (``(N, K)``)."""
    return layer.weight.detach().norm(p=1 if check_norm(norm) == "l1" else 2, dim=0)


def prune_features(
    model: nn.Module,
    fraction: float | None = None,
    *,
    keep: int | None = None,
    importance: Sequence[float] | np.ndarray | Tensor | None = None,
    norm: Norm = "l2",
    feature_names: Sequence[str] | None = None,
    layer: str | None = None,
    inplace: bool = False,
) -> nn.Module:
    """Drop the least important input columns of ``model``'s first Linear.

    Give exactly one of ``fraction`` (drop ``round(fraction * K)`` columns, at most ``K - 1``) and
    ``keep`` (keep ``keep`` columns). Columns are ranked by ``importance`` when given (length
    ``K``), else by :func:`feature_importance` with ``norm``; ties keep the lower index. ``layer``
    names the input layer; by default it is found by tracing (:func:`input_layer`). A model that
    cannot be traced needs ``layer``, which is then trusted to read the raw input.
    """
    model = working_copy(model, inplace)
    if (fraction is None) == (keep is None):
        raise ConfigError("give exactly one of fraction (columns to drop) and keep (columns to keep)")
    check_norm(norm)
    name = layer if layer is not None else input_layer(model)
    first = _linear(model, name)
    if layer is not None:
        _confirm_input_layer(model, layer)
    k = first.in_features
    drop = _drop_count(fraction, keep, k)
    scores = _importance(importance, k) if importance is not None else feature_importance(first, norm)
    names = _names(feature_names, k)

    params_before, model_before = count_params(first), count_params(model)
    kept = keep_top(scores, drop)
    with torch.no_grad():
        first.weight = nn.Parameter(first.weight.detach()[:, kept].clone(), requires_grad=first.weight.requires_grad)
    first.in_features = kept.numel()
    kept_list = kept.tolist()
    dropped = sorted(set(range(k)) - set(kept_list))
    return attach_report(model, FeaturePruneReport(
        name, kept_list, dropped,
        None if names is None else [names[j] for j in kept_list],
        None if names is None else [names[j] for j in dropped],
        scores.tolist(), params_before, count_params(first), model_before, count_params(model),
    ))


def _linear(model: nn.Module, name: str) -> nn.Linear:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise ConfigError(f"layer {name!r} is not a submodule of {type(model).__name__}") from None
    if type(module) is not nn.Linear:
        raise ConfigError(f"layer {name!r} is a {type(module).__name__}, not an nn.Linear")
    if weight_mask(module) is not None:
        raise ModelError(f"layer {name!r} carries a pruning mask: call remove_masks(model) first")
    return module


def _confirm_input_layer(model: nn.Module, layer: str) -> None:
    """A traceable model must read its input with ``layer`` only; untraceable ones are trusted."""
    try:
        gm = trace(model)
    except ModelError:
        return
    found = _input_reader(gm)
    if found != layer:
        raise ConfigError(f"layer {layer!r} does not read the model input; {found!r} does")


def _drop_count(fraction: float | None, keep: int | None, k: int) -> int:
    if fraction is not None:
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction < 1.0:
            raise ConfigError(f"fraction must be a number in [0, 1), got {fraction!r}")
        return min(round(fraction * k), k - 1)
    if isinstance(keep, bool) or not isinstance(keep, int) or not 1 <= keep <= k:
        raise ConfigError(f"keep must be an integer in [1, {k}] (the layer's input columns), got {keep!r}")
    return k - keep


def _importance(importance: Sequence[float] | np.ndarray | Tensor, k: int) -> Tensor:
    if isinstance(importance, Tensor):
        importance = importance.detach().cpu().numpy()
    try:
        scores = torch.as_tensor(np.asarray(importance, dtype=np.float64))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"importance must be a vector of numbers: {exc}") from None
    if scores.shape != (k,):
        raise ConfigError(f"importance must have one value per input column ({k}), got shape {tuple(scores.shape)}")
    if not torch.isfinite(scores).all():
        raise DataError("importance contains NaN or Inf")
    return scores


def _names(feature_names: Sequence[str] | None, k: int) -> list[str] | None:
    if feature_names is None:
        return None
    names = [str(n) for n in feature_names]
    if len(names) != k:
        raise ConfigError(f"feature_names has {len(names)} names for {k} input columns")
    return names

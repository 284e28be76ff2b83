"""Structured pruning: remove whole output channels (neurons, filters) and shrink the model.

For each selected producer with ``C`` output channels (:mod:`squeezer.prune.graph` finds the
modules that read them), channel ``c`` scores ``||W[c]||_1`` or ``||W[c]||_2`` (its weight row /
filter) and the ``round(amount * C)`` lowest-scoring channels (at most ``C - 1``) are removed:
the producer's weight rows and bias entries, the matching BatchNorm / LayerNorm entries
(weight, bias, running statistics) and each consumer's input columns (``block`` columns per
channel after a flatten). Scores use the weights as they were before any change.

With only elementwise / per-channel ops between a producer and its consumers, the pruned model
computes exactly what the original model computes with the consumers' input columns of the
removed channels set to 0 (the channel-zeroed model). A LayerNorm on the way normalises over
the kept channels only; those layers are marked approximate in the report.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from ..errors import ConfigError, ModelError
from ..transform import attach_report, working_copy
from .graph import Blocked, ChannelGroup, call_counts, channel_group, trace
from .magnitude import check_sparsity
from .mask import weight_mask
from .report import LayerPruneReport, PruneReport, SkippedLayer, count_params
from .select import LAYER_CLASSES, select_layers

Norm = Literal["l1", "l2"]


def check_norm(norm: str) -> Norm:
    if norm not in ("l1", "l2"):
        raise ConfigError(f"norm must be 'l1' or 'l2', got {norm!r}")
    return norm


def channel_scores(weight: Tensor, norm: Norm) -> Tensor:
    """``||W[c]||_p`` for every output channel ``c`` (``p = 1`` or ``2``) of a Linear / conv weight."""
    return weight.detach().flatten(1).norm(p=1 if check_norm(norm) == "l1" else 2, dim=1)


def keep_top(scores: Tensor, drop: int) -> Tensor:
    """Ascending indices of the ``len(scores) - drop`` highest scores (ties: lower index kept)."""
    order = torch.argsort(scores, descending=True, stable=True)
    return order[: scores.numel() - drop].sort().values


def prune_channels(
    model: nn.Module,
    amount: float,
    *,
    norm: Norm = "l1",
    layer_types: str | Sequence[str] = tuple(LAYER_CLASSES),
    include: str | Sequence[str] = (),
    ignore: str | Sequence[str] = (),
    inplace: bool = False,
) -> nn.Module:
    """Remove ``amount`` of the output channels of every selected layer whose outputs can be
    followed to resizable consumers, shrinking the layers (module objects are kept;
    their weights become new, smaller ``nn.Parameter`` s, so build optimisers afterwards).
    ``layer_types`` / ``include`` / ``ignore`` choose whose outputs are pruned; the modules
    reading them shrink whether selected or not.

    Layers whose outputs reach something that cannot be resized (the model output, a residual
    add, a reshape, ...) are left alone and listed in ``report.skipped`` with the reason; the
    final layer therefore never loses outputs. ``report.channels`` maps each pruned layer to its
    kept output channels (original numbering).
    """
    model = working_copy(model, inplace)
    amount = check_sparsity(amount, "amount")
    check_norm(norm)
    masked = [name for name, m in model.named_modules() if weight_mask(m) is not None]
    if masked:
        raise ModelError(f"layers {masked} carry pruning masks: call remove_masks(model) before prune_channels")
    layers, skipped = select_layers(model, layer_types, include, ignore)
    gm = trace(model)
    counts = call_counts(gm)
    groups: list[ChannelGroup] = []
    for name, layer in layers.items():
        found = channel_group(gm, name, counts)
        if isinstance(found, Blocked):
            skipped.append(SkippedLayer(name, type(layer).__name__, count_params(layer), found.reason))
        else:
            groups.append(found)
    touched = {g.producer for g in groups} | {m.name for g in groups for m in g.members}

    before = {name: count_params(model.get_submodule(name)) for name in touched}
    weights_before = {name: _weight_size(model.get_submodule(name)) for name in touched}
    model_before = count_params(model)
    kept = {g.producer: keep_top(channel_scores(model.get_submodule(g.producer).weight, norm),
                                 min(round(amount * g.channels), g.channels - 1)) for g in groups}
    notes = _shrink_groups(model, groups, kept)

    rows = []
    for name, module in model.named_modules():
        if name in touched:
            w_before = weights_before[name]
            sparsity = 1.0 - _weight_size(module) / w_before if w_before else 0.0
            rows.append(LayerPruneReport(name, type(module).__name__, before[name], count_params(module), sparsity,
                                         "; ".join(notes.get(name, []))))
    return attach_report(model, PruneReport(f"structured-{norm}", rows, skipped, model_before, count_params(model),
                       {g.producer: kept[g.producer].tolist() for g in groups}))


def _shrink_groups(model: nn.Module, groups: list[ChannelGroup], kept: dict[str, Tensor]) -> dict[str, list[str]]:
    """Cut every group to its kept channels; returns per module what changed (for the report)."""
    notes: dict[str, list[str]] = {}
    with torch.no_grad():
        for g in groups:
            idx = kept[g.producer]
            _shrink_outputs(model.get_submodule(g.producer), idx)
            notes.setdefault(g.producer, []).append(f"out {g.channels} -> {idx.numel()}")
            for member in g.members:
                module = model.get_submodule(member.name)
                if member.role == "input":
                    _shrink_inputs(module, idx, member.block)
                    change = f"in {g.channels * member.block} -> {idx.numel() * member.block}"
                else:
                    _shrink_norm(module, idx)
                    approx = " (approximate: statistics over kept channels)" if member.role == "layernorm" else ""
                    change = f"channels {g.channels} -> {idx.numel()}{approx}"
                notes.setdefault(member.name, []).append(change)
    return notes


def _weight_size(module: nn.Module) -> int:
    weight = getattr(module, "weight", None)
    return weight.numel() if weight is not None else count_params(module)


def _take(module: nn.Module, attr: str, dim: int, idx: Tensor) -> None:
    """``module.<attr> = module.<attr>.index_select(dim, idx)``, a new Parameter for a parameter."""
    value = getattr(module, attr, None)
    if value is None:
        return
    new = value.detach().index_select(dim, idx.to(value.device)).clone()
    setattr(module, attr, nn.Parameter(new, requires_grad=value.requires_grad) if isinstance(value, nn.Parameter) else new)


def _shrink_outputs(module: nn.Module, idx: Tensor) -> None:
    _take(module, "weight", 0, idx)
    _take(module, "bias", 0, idx)
    if isinstance(module, nn.Linear):
        module.out_features = idx.numel()
    else:
        module.out_channels = idx.numel()


def _shrink_inputs(module: nn.Module, idx: Tensor, block: int) -> None:
    """Keep input columns ``c * block + j`` (``j < block``) for each kept channel ``c``."""
    cols = (idx[:, None] * block + torch.arange(block, device=idx.device)).flatten()
    _take(module, "weight", 1, cols)
    if isinstance(module, nn.Linear):
        module.in_features = cols.numel()
    else:
        module.in_channels = cols.numel()


def _shrink_norm(module: nn.Module, idx: Tensor) -> None:
    for attr in ("weight", "bias", "running_mean", "running_var"):
        _take(module, attr, 0, idx)
    if isinstance(module, nn.LayerNorm):
        module.normalized_shape = (idx.numel(),)
    else:
        module.num_features = idx.numel()

"""Unstructured magnitude pruning (per layer or global) and N:M semi-structured pruning.

Both set 0/1 masks on the selected layers' weights (:mod:`squeezer.prune.mask`), so the model
keeps its shapes, pruned entries stay 0 through fine-tuning, and :func:`remove_masks` makes
them permanent. Scores are ``|w|`` of the effective (already masked) weight, and a new mask is
multiplied into the old one: an entry once pruned is never revived.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..transform import attach_report, working_copy
from .mask import set_mask, weight_mask
from .report import LayerPruneReport, PruneReport, SkippedLayer, count_params
from .select import LAYER_CLASSES, select_layers

Scope = Literal["layer", "global"]


def check_sparsity(value: float, argument: str = "sparsity") -> float:
    """``value`` as a float in ``[0, 1)``, else :class:`ConfigError` naming ``argument``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ConfigError(f"{argument} must be a number in [0, 1), got {value!r}")
    return float(value)


def magnitude_prune(
    model: nn.Module,
    sparsity: float,
    *,
    scope: Scope = "layer",
    layer_types: str | Sequence[str] = tuple(LAYER_CLASSES),
    include: str | Sequence[str] = (),
    ignore: str | Sequence[str] = (),
    inplace: bool = False,
) -> nn.Module:
    """Mask the smallest-magnitude weights of the selected layers.

    ``scope="layer"``: in each layer with ``n_l`` weights, the ``round(sparsity * n_l)`` entries
    with the smallest ``|w|`` get mask 0. ``scope="global"``: one threshold over all selected
    layers together, i.e. the ``round(sparsity * sum_l n_l)`` smallest ``|w|`` of the union
    (layers with larger weights keep more). Ties at the threshold are broken arbitrarily, so the
    counts are exact. Biases are not pruned.
    """
    model = working_copy(model, inplace)
    sparsity = check_sparsity(sparsity)
    if scope not in ("layer", "global"):
        raise ConfigError(f"scope must be 'layer' or 'global', got {scope!r}")
    layers, skipped = select_layers(model, layer_types, include, ignore)
    before, model_before = {name: count_params(m) for name, m in layers.items()}, count_params(model)
    with torch.no_grad():
        scores = {name: m.weight.detach().abs().flatten() for name, m in layers.items()}
        if scope == "layer":
            keep = {name: _keep_largest(s, round(sparsity * s.numel())) for name, s in scores.items()}
        else:
            flat = _keep_largest(torch.cat(list(scores.values())), round(sparsity * sum(s.numel() for s in scores.values())))
            keep = dict(zip(scores, flat.split([s.numel() for s in scores.values()])))
        for name, m in layers.items():
            _combine_mask(m, keep[name].view_as(m.weight))
    return attach_report(model, mask_report(f"magnitude-{scope}", model, layers, before, model_before, skipped))


def nm_prune(
    model: nn.Module,
    n: int = 2,
    m: int = 4,
    *,
    layer_types: str | Sequence[str] = tuple(LAYER_CLASSES),
    include: str | Sequence[str] = (),
    ignore: str | Sequence[str] = (),
    inplace: bool = False,
) -> nn.Module:
    """N:M sparsity: in every group of ``m`` consecutive weights along the (flattened)
    input dimension, keep the ``n`` largest ``|w|`` and mask the rest.

    The weight is viewed as ``(out, K)`` with ``K = in_features`` (Linear) or
    ``in_channels / groups * prod(kernel_size)`` (conv, the order of ``weight.flatten(1)``), the
    same grouping as squeezer's per-group quantization. A layer whose ``K`` is not a multiple of
    ``m`` is skipped with the reason. ``n == m`` keeps everything.
    """
    model = working_copy(model, inplace)
    for argument, value in (("n", n), ("m", m)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{argument} must be an integer >= 1, got {value!r}")
    if n > m:
        raise ConfigError(f"n must be <= m (keep n of every m weights), got n={n}, m={m}")
    layers, skipped = select_layers(model, layer_types, include, ignore)
    for name, layer in list(layers.items()):
        k = layer.weight[0].numel()
        if k % m:
            skipped.append(SkippedLayer(name, type(layer).__name__, count_params(layer),
                                        f"input size {k} is not a multiple of m={m}"))
            del layers[name]
    before, model_before = {name: count_params(layer) for name, layer in layers.items()}, count_params(model)
    with torch.no_grad():
        for layer in layers.values():
            groups = layer.weight.detach().abs().reshape(layer.weight.shape[0], -1, m)
            keep = torch.zeros_like(groups, dtype=torch.bool)
            keep.scatter_(-1, groups.topk(n, dim=-1).indices, True)
            _combine_mask(layer, keep.view_as(layer.weight))
    return attach_report(model, mask_report(f"{n}:{m}", model, layers, before, model_before, skipped))


def _keep_largest(scores: Tensor, drop: int) -> Tensor:
    """Boolean keep-mask of ``scores``' shape: False at the ``drop`` smallest entries."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    if drop:
        keep[scores.topk(drop, largest=False).indices] = False
    return keep


def _combine_mask(layer: nn.Module, keep: Tensor) -> None:
    old = weight_mask(layer)
    set_mask(layer, keep if old is None else keep & old.bool())


def mask_report(method: str, model: nn.Module, layers: dict[str, nn.Module], before: dict[str, int],
                model_before: int, skipped: list[SkippedLayer]) -> PruneReport:
    """Report of masked layers: parameters in use before / after and weight sparsity."""
    rows = []
    for name, layer in layers.items():
        mask = weight_mask(layer)
        sparsity = 0.0 if mask is None else 1.0 - int(mask.count_nonzero()) / mask.numel()
        rows.append(LayerPruneReport(name, type(layer).__name__, before[name], count_params(layer), sparsity))
    return PruneReport(method, rows, skipped, model_before, count_params(model))


def weight_sparsity(modules: Iterable[nn.Module]) -> float:
    """Masked entries / weight entries over the given modules' masked weights (0 when none is
    masked); ``weight_sparsity(model.modules())`` for a whole model."""
    masks = [mk for mk in map(weight_mask, modules) if mk is not None]
    total = sum(mk.numel() for mk in masks)
    return 0.0 if total == 0 else 1.0 - sum(int(mk.count_nonzero()) for mk in masks) / total

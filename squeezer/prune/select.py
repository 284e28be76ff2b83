"""Which layers a pruning or factorisation call touches.

A module is selected when its type is one of ``layer_types`` (``"linear"``: ``nn.Linear``,
``"conv1d"`` / ``"conv2d"``: ``nn.Conv1d`` / ``nn.Conv2d``), its qualified name matches one of
the ``include`` regular expressions (``re.search``; all names when ``include`` is empty), none
of ``ignore``, and its weight has at least ``min_params`` elements. Every pattern must match at
least one candidate layer's name: a pattern that matches nothing is almost always a typo.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import nn

from ..errors import ConfigError, DataError
from .report import SkippedLayer, count_params

LAYER_CLASSES: dict[str, type[nn.Module]] = {"linear": nn.Linear, "conv1d": nn.Conv1d, "conv2d": nn.Conv2d}


def layer_kind(module: nn.Module) -> str | None:
    """``"linear"``, ``"conv1d"``, ``"conv2d"`` or ``None`` for other modules."""
    return next((kind for kind, cls in LAYER_CLASSES.items() if isinstance(module, cls)), None)


def _patterns(value: str | Sequence[str], argument: str) -> tuple[str, ...]:
    patterns = (value,) if isinstance(value, str) else tuple(value)
    for pattern in patterns:
        try:
            re.compile(pattern)
        except (re.error, TypeError) as exc:
            raise ConfigError(f"{argument}: invalid layer-name pattern {pattern!r}: {exc}") from None
    return patterns


def select_layers(
    model: nn.Module,
    layer_types: str | Sequence[str] = tuple(LAYER_CLASSES),
    include: str | Sequence[str] = (),
    ignore: str | Sequence[str] = (),
    min_params: int = 0,
) -> tuple[dict[str, nn.Module], list[SkippedLayer]]:
    """Selected layers (name -> module, in module order) and the candidates left out, with why.

    Raises :class:`ConfigError` naming the argument for an unknown layer type, an invalid
    pattern or one that matches no layer of the selected types, or when nothing is selected; and :class:`DataError` naming
    the layer when a selected weight holds NaN or Inf.
    """
    types = (layer_types,) if isinstance(layer_types, str) else tuple(layer_types)
    unknown = [t for t in types if t not in LAYER_CLASSES]
    if unknown or not types:
        raise ConfigError(f"layer_types: unknown or empty {unknown or list(types)}; valid: {', '.join(LAYER_CLASSES)}")
    if isinstance(min_params, bool) or not isinstance(min_params, int) or min_params < 0:
        raise ConfigError(f"min_params must be an integer >= 0, got {min_params!r}")
    includes, ignores = _patterns(include, "include"), _patterns(ignore, "ignore")
    candidates = [(name, m) for name, m in model.named_modules() if name and layer_kind(m) in types]
    for argument, patterns in (("include", includes), ("ignore", ignores)):
        for pattern in patterns:
            if not any(re.search(pattern, name) for name, _ in candidates):
                raise ConfigError(f"{argument} pattern {pattern!r} matches no layer of type {', '.join(types)}")

    chosen: dict[str, nn.Module] = {}
    skipped: list[SkippedLayer] = []
    for name, module in model.named_modules():
        kind = layer_kind(module)
        if not name or kind is None:
            continue
        reason = _skip_reason(name, kind, module, types, includes, ignores, min_params)
        if reason is not None:
            skipped.append(SkippedLayer(name, type(module).__name__, count_params(module), reason))
            continue
        if not torch.isfinite(module.weight).all():
            raise DataError(f"layer {name!r}: weight contains NaN or Inf")
        chosen[name] = module
    if not chosen:
        raise ConfigError(f"no layer selected (layer_types={list(types)}, include={list(includes)}, "
                          f"ignore={list(ignores)}, min_params={min_params}): "
                          + "; ".join(f"{s.name}: {s.reason}" for s in skipped))
    return chosen, skipped


def _skip_reason(name: str, kind: str, module: nn.Module, types: tuple[str, ...], includes: tuple[str, ...],
                 ignores: tuple[str, ...], min_params: int) -> str | None:
    if kind not in types:
        return f"layer type {kind} not selected"
    if includes and not any(re.search(p, name) for p in includes):
        return "not matched by include patterns"
    hit = next((p for p in ignores if re.search(p, name)), None)
    if hit is not None:
        return f"ignored by pattern {hit!r}"
    if module.weight.numel() < min_params:
        return f"weight has {module.weight.numel()} < min_params={min_params} elements"
    return None


"""Model surgery: replace supported layers by their quantized counterparts.

A layer is taken when its type is in ``config.layer_types``, its name matches one of
``config.include`` (when given) and none of ``config.ignore``. Every other module that owns
parameters is listed as skipped, with the reason.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from ..config import QuantConfig
from ..errors import DataError
from .base import QuantMixin
from .layers import layer_type_name, quantized_class_for


@dataclass
class SkippedLayer:
    """A module with parameters that was left in float, and why."""

    name: str
    kind: str
    params: int
    reason: str


def _skip_reason(name: str, kind: str | None, config: QuantConfig) -> str | None:
    if kind is None:
        return "type not quantizable"
    if kind not in config.layer_types:
        return f"layer type {kind} not selected"
    if config.include and not any(re.search(p, name) for p in config.include):
        return "not matched by include patterns"
    hit = next((p for p in config.ignore if re.search(p, name)), None)
    return None if hit is None else f"ignored by pattern {hit!r}"


def set_child(model: nn.Module, name: str, child: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, child)


def _tied_storages(model: nn.Module) -> set[int]:
    """Storages (data pointers) that hold more than one parameter of ``model``: tied weights."""
    seen: set[int] = set()
    tied: set[int] = set()
    for _, p in model.named_parameters(remove_duplicate=False):
        ptr = p.untyped_storage().data_ptr()
        (tied if ptr in seen else seen).add(ptr)
    return tied


def swap_layers(model: nn.Module, config: QuantConfig) -> tuple[list[str], list[SkippedLayer]]:
    """Swap in place. Returns the swapped layer names and the skipped modules. A quantized layer takes
    over its float layer's parameter storage (no copy), except where the storage is tied to another
    parameter: that one gets its own copy, so that an algorithm's in-place rounding stays in its layer.

    Raises :class:`DataError` naming the layer when a selected weight holds NaN or Inf.
    """
    chosen: list[tuple[str, nn.Module]] = []
    skipped: list[SkippedLayer] = []
    for name, module in model.named_modules():
        if isinstance(module, QuantMixin) or not name:
            continue
        own = sum(p.numel() for p in module.parameters(recurse=False))
        kind = layer_type_name(module)
        reason = _skip_reason(name, kind, config)
        if reason is None:
            if not torch.isfinite(module.weight).all():
                raise DataError(f"layer {name!r}: weight contains NaN or Inf")
            chosen.append((name, module))
        elif own:
            skipped.append(SkippedLayer(name, type(module).__name__, own, reason))
    names = [name for name, _ in chosen]
    tied = _tied_storages(model)
    for name, module in chosen:
        copy = any(p.untyped_storage().data_ptr() in tied for p in module.parameters(recurse=False))
        layer_config = config.for_layer(name, layer_type_name(module))
        set_child(model, name, quantized_class_for(module).from_float(module, layer_config, copy=copy))
    return names, skipped


def quant_layers(model: nn.Module) -> dict[str, QuantMixin]:
    """Name -> quantized layer, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantMixin)}


def set_mode(model: nn.Module, mode: str) -> None:
    """Put every quantized layer of ``model`` in ``mode`` (float / observe / simulate / compare)."""
    for name, layer in quant_layers(model).items():
        if layer.is_packed and mode != "packed":
            raise RuntimeError(f"layer {name!r} is packed (its float weight is freed): it only runs in mode 'packed'")
        layer.mode = mode


def ensure_deployable(model: nn.Module, action: str) -> dict[str, QuantMixin]:
    """The quantized layers of ``model``, or a clear error when it has none or is still in QAT."""
    from ..errors import ModelError

    layers = quant_layers(model)
    if not layers:
        raise ModelError(f"{action}: the model has no quantized layers: call squeezer.quantize first")
    training = [n for n, l in layers.items() if "weight_fake_quant" in l._modules or "act_fake_quant" in l._modules]
    if hasattr(model, "squeezer_qat") or training:
        raise ModelError(f"{action}: the model is prepared for QAT (layers {training[:3]}): "
                         "call squeezer.qat.convert(model) first")
    return layers

"""Model surgery: replace supported layers by their quantized counterparts.

Which layers are taken, and each one's :class:`LayerScheme`, is the config's to say (a
:class:`LayerSelection`, e.g. :class:`squeezer.config.QuantConfig`: layer types, include / ignore
patterns, per-layer overrides). Every other module that owns parameters is listed as skipped, with the reason
(the model's own parameters, outside any submodule, under the name ``""``). A subclass of a torch layer that
redefines its function is quantized as ``Quant<Subclass>`` running its own forward (:mod:`.layers`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from ..errors import ConfigError, DataError, ModelError
from ..quant.scheme import LayerScheme
from ..quant.spec import QuantSpec
from .attention import is_fused, unfuse
from .base import QuantMixin
from .layers import OwnForward, layer_type_name, quantized_class_for, scheme_refusal
from .recurrent import QuantRecurrent


@dataclass
class SkippedLayer:
    """A module with parameters that was left in float, and why."""

    name: str
    kind: str
    params: int
    reason: str


class LayerSelection(Protocol):
    """What :func:`swap_layers` asks of a config; ``kind``: ``linear`` / ``conv1d`` / ``conv2d`` /
    ``embedding``, or None for a module of no quantizable type."""

    def skip_reason(self, name: str, kind: str | None) -> str | None:
        """Why the module is left in float, or None when it is quantized."""

    def for_layer(self, name: str, kind: str | None = None) -> LayerScheme:
        """The scheme of a quantized layer."""

    def for_matrix(self, layer: str, matrix: str, kind: str | None = None) -> QuantSpec:
        """The weight spec of one matrix of a recurrent layer."""


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


def _fused_children(model: nn.Module) -> dict[str, str]:
    """``{child name: parent class}`` of the children of the fused modules :func:`unfuse` leaves (see
    :func:`is_fused`): their forward reads the float weights, so a child swapped for a quantized layer would be
    reported as quantized while its float weight runs; such children stay float, listed with the reason."""
    return {f"{name}.{child}" if name else child: type(module).__name__
            for name, module in model.named_modules() if is_fused(module)
            for child, _ in module.named_children()}


def swap_layers(model: nn.Module, config: LayerSelection) -> tuple[list[str], list[SkippedLayer]]:
    """Swap in place, each chosen layer with its scheme ``config.for_layer(name, kind)``. Returns the
    swapped layer names and the skipped modules. A quantized layer takes
    over its float layer's parameter storage (no copy), except where the storage is tied to another
    parameter: that one gets its own copy, so that an algorithm's in-place rounding stays in its layer.

    Attention modules are first rewritten over their child linear layers (:func:`unfuse`, same function).
    Raises :class:`DataError` naming the layer when a selected weight holds NaN or Inf.
    """
    unfuse(model)
    chosen: list[tuple[str, nn.Module]] = []
    skipped: list[SkippedLayer] = []
    fused = _fused_children(model)
    root_params = sum(p.numel() for p in model.parameters(recurse=False))
    if root_params and not isinstance(model, QuantMixin):
        skipped.append(SkippedLayer("", type(model).__name__, root_params, "parameters of the model itself"))
    for name, module in model.named_modules():
        if isinstance(module, QuantMixin) or not name:
            continue
        own = sum(p.numel() for p in module.parameters(recurse=False))
        kind = layer_type_name(module)
        reason = config.skip_reason(name, kind)
        if reason is None and name in fused:
            reason = f"inside {fused[name]}, whose fused forward reads the float weight"
        if reason is None:
            reason = scheme_refusal(module, config.for_layer(name, kind))
        if reason is None:
            weights = (p for n, p in module.named_parameters(recurse=False) if n.startswith("weight"))
            if not all(torch.isfinite(w).all() for w in weights):
                raise DataError(f"layer {name!r}: weight contains NaN or Inf")
            chosen.append((name, module))
        elif own:
            skipped.append(SkippedLayer(name, type(module).__name__, own, reason))
    names = [name for name, _ in chosen]
    tied = _tied_storages(model)
    for name, module in chosen:
        copy = any(p.untyped_storage().data_ptr() in tied for p in module.parameters(recurse=False))
        kind = layer_type_name(module)
        new = quantized_class_for(module).from_float(module, config.for_layer(name, kind), copy=copy)
        if isinstance(new, QuantRecurrent):  # each matrix may have its own spec (QuantConfig.for_matrix)
            new.matrix_specs = {m: config.for_matrix(name, m, kind) for m in new.matrix_names}
        set_child(model, name, new)
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
    """The quantized layers of ``model``, or a clear error when it has none, is still in QAT, or has a layer
    running its own forward whose function packed kernels and exports cannot reproduce (``deploy_refusal``)."""
    layers = quant_layers(model)
    refused = next(((n, l, r) for n, l in layers.items() if isinstance(l, OwnForward) and (r := l.deploy_refusal())), None)
    if refused is not None:
        name, layer, reason = refused
        raise ConfigError(f"{action}: layer {name!r} is a {layer.float_class.__name__}, a subclass that redefines its "
                          f"torch layer's forward: {reason}, or with ignore=[{name!r}] to keep it in float")
    if not layers:
        raise ModelError(f"{action}: the model has no quantized layers: call squeezer.quantize first")
    training = [n for n, l in layers.items() if "weight_fake_quant" in l._modules or "act_fake_quant" in l._modules]
    if hasattr(model, "squeezer_qat") or training:
        raise ModelError(f"{action}: the model is prepared for QAT (layers {training[:3]}): "
                         "call squeezer.qat.convert(model) first")
    return layers

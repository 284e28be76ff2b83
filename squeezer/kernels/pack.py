"""`squeezer.pack`: replace each quantized layer's float weight by bit-packed integers and a
runtime on real kernels; returns what ran where, and :func:`packed_kernels` reads it back."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from functools import partial
from typing import Any, Literal

from torch import nn

from ..errors import ConfigError
from ..modules import QuantEmbedding, QuantLinear, quant_layers
from ..modules.base import QuantMixin
from ..modules.layers import OwnForward, QuantConvTranspose, QuantEmbeddingBag, QuantConvNd
from ..modules.recurrent import QuantRecurrent
from ..modules.swap import ensure_deployable
from ..transform import attach_report, working_copy
from .base import ONE_BYTE, KernelPath, LinearProblem, PackedWeight
from .paths import PATHS
from .recurrent import FusedRecurrent, PackedRecurrent, fused_recurrence, matrix_pins
from .runtime import PackedConv, PackedEmbedding, PackedEmbeddingBag, PackedLinear
from .select import BUCKETS, pinned_choice, rule_choice, timed_choice

Kernels = Literal["rule", "time"] | Mapping[str, str | Sequence[str]]
"""How :func:`pack` chooses kernels: ``"rule"``, ``"time"`` or ``{layer: path(s)}``."""
CHOOSERS = ("rule", "time")


@dataclass
class PackedLayer:
    """One packed layer: the kernel chosen per rows-bucket, real bytes, and a warning when no
    integer kernel fits the layer's format or shape (a float fallback chosen for speed is no warning)."""

    name: str
    format: str
    kernels: dict[str, str]
    runtime_bytes: int
    warning: str | None


@dataclass
class PackReport:
    """What :func:`pack` packed: one row per layer."""

    layers: list[PackedLayer]

    def to_dict(self) -> dict[str, list[dict]]:
        return {"layers": [asdict(r) for r in self.layers]}


def _check_kernels(kernels: Kernels, layers: Mapping[str, nn.Module]) -> Mapping[str, str | Sequence[str]]:
    """The pins of ``kernels`` (empty for ``"rule"`` / ``"time"``), every layer name known."""
    if isinstance(kernels, str):
        if kernels not in CHOOSERS:
            raise ConfigError(f"kernels must be {' or '.join(map(repr, CHOOSERS))} or a dict {{layer: path}}, got {kernels!r}")
        return {}
    if not isinstance(kernels, Mapping):
        raise ConfigError(f"kernels must be {' or '.join(map(repr, CHOOSERS))} or a dict {{layer: path}}, "
                          f"got {type(kernels).__name__}")
    unknown = sorted(set(kernels) - set(layers))
    if unknown:
        raise ConfigError(f"kernels: unknown layer(s) {unknown}; quantized layers: {sorted(layers)}")
    return kernels


def _linear_choice(problem: LinearProblem, *, layer: str, paths: tuple[KernelPath, ...], kernels: Kernels,
                   pins: Mapping[str, str | Sequence[str]]) -> list[str]:
    """One path name per rows bucket for linear ``layer``: its pin, else timed or by the rule."""
    if layer in pins:
        return pinned_choice(layer, problem, paths, pins[layer])
    if kernels == "time":
        return timed_choice(problem, paths)
    return [rule_choice(problem, paths, b) for b in range(len(BUCKETS))]


@dataclass(frozen=True)
class PackContext:
    """What a packer needs besides its layer: the kernel paths, how linear paths are chosen, the user's pins."""

    paths: tuple[KernelPath, ...]
    kernels: Kernels
    pins: Mapping[str, str | Sequence[str]]

    def linear(self, name: str, problem: LinearProblem) -> tuple[PackedLinear, str | None]:
        """The linear runtime of ``problem`` under the name ``name`` (pins are looked up by it), and a warning
        when no integer path runs its format at some rows bucket."""
        chooser = partial(_linear_choice, layer=name, paths=self.paths, kernels=self.kernels, pins=self.pins)
        runtime = PackedLinear.build(problem, chooser, self.paths, layer=name)
        warning = None
        if not any(p.integer and p.eligible(problem, m) for p in self.paths for _, m in BUCKETS):
            warning = next(p.note for p in self.paths if not p.integer)
        return runtime, warning


Runtime = Any
"""A packed runtime: called as the layer; ``describe() -> {bucket: path}``, ``nbytes() -> int`` and ``weight``
(a :class:`PackedWeight`, what saving and ``weight_qtensor()`` read)."""
Packer = Callable[[str, QuantMixin, PackContext], tuple[Runtime, str | None]]
"""``packer(name, layer, context) -> (runtime, warning)``: the runtime that replaces a quantized layer's float
weight, and a warning when it runs without an integer kernel."""


def linear_problem(layer: QuantMixin) -> LinearProblem:
    """The linear problem of a quantized linear layer: its packed weight, bias, scheme and input transforms."""
    bias = None if layer.bias is None else layer.bias.detach()
    # codes as they are: PackedLinear.build holds them once, in its kernels' layout (or bit-packed)
    return LinearProblem(PackedWeight.from_qtensor(layer.weight_qtensor(), ONE_BYTE), bias, layer.scheme, layer.act_qparams,
                         layer.input_scale, layer.rotation_matrix())


def _pack_linear(name: str, layer: QuantMixin, context: PackContext) -> tuple[Runtime, str | None]:
    return context.linear(name, linear_problem(layer))


def _pack_embedding(name: str, layer: QuantMixin, context: PackContext) -> tuple[Runtime, str | None]:
    if layer.max_norm is not None:
        raise ConfigError(f"layer {name!r}: packed embeddings do not support max_norm")
    return PackedEmbedding.build(layer, layer.weight_qtensor()), None


def _pack_embedding_bag(name: str, layer: QuantMixin, context: PackContext) -> tuple[Runtime, str | None]:
    return (PackedEmbeddingBag(layer, PackedWeight.from_qtensor(layer.weight_qtensor())),
            "no integer embedding-bag kernel: the table is unpacked per call and reduced in fp32")


def _pack_conv(name: str, layer: QuantMixin, context: PackContext) -> tuple[Runtime, str | None]:
    return (PackedConv(layer, PackedWeight.from_qtensor(layer.weight_qtensor())),
            "no integer convolution kernel: weights are unpacked and convolved in fp32")


def _pack_recurrent(name: str, layer: QuantMixin, context: PackContext) -> tuple[Runtime, str | None]:
    if fused_recurrence(name, layer, context.pins.get(name)):
        return FusedRecurrent.build(layer)
    pins = {**context.pins, **matrix_pins(name, layer.matrix_names, context.pins.get(name))}
    return PackedRecurrent.build(name, layer, replace(context, pins=pins).linear)


def _pack_own_forward(name: str, layer: QuantMixin, context: PackContext) -> tuple[Runtime, str | None]:
    return (PackedConv(layer, PackedWeight.from_qtensor(layer.weight_qtensor())),
            f"a {layer.float_class.__name__} runs its own forward: weights are unpacked and it runs in fp32")


_PACKERS: dict[type, Packer] = {
    OwnForward: _pack_own_forward,
    QuantLinear: _pack_linear,
    QuantEmbedding: _pack_embedding,
    QuantEmbeddingBag: _pack_embedding_bag,
    QuantConvNd: _pack_conv,
    QuantConvTranspose: _pack_conv,
    QuantRecurrent: _pack_recurrent,
}


def register_packer(quantized_class: type[QuantMixin], packer: Packer) -> None:
    """Pack every layer whose class is ``quantized_class`` or derives from it with ``packer`` (the nearest class
    in a layer's method resolution order wins)."""
    _PACKERS[quantized_class] = packer


def unregister_packer(quantized_class: type[QuantMixin]) -> None:
    """Forget the packer of ``quantized_class`` (its layers fall back to a base class's packer, if any)."""
    _PACKERS.pop(quantized_class, None)


def packer_for(layer: QuantMixin) -> Packer | None:
    """The packer of ``layer``'s nearest registered class, or None when it has no packed runtime."""
    return next((_PACKERS[c] for c in type(layer).__mro__ if c in _PACKERS), None)


def _packers(layers: Mapping[str, QuantMixin]) -> dict[str, Packer]:
    """Each layer's packer; a :class:`ConfigError` naming the first layer that has none (nothing is changed yet)."""
    found = {name: packer_for(layer) for name, layer in layers.items()}
    missing = next((n for n, p in found.items() if p is None), None)
    if missing is not None:
        raise ConfigError(f"pack: layer {missing!r} is a {type(layers[missing]).__name__}, which has no packed runtime; "
                          f"save or export the simulated model, or quantize with ignore=[{missing!r}] to keep it in float")
    return found  # type: ignore[return-value]


def pack(model: nn.Module, kernels: Kernels = "rule", paths: tuple[KernelPath, ...] = PATHS, *,
         inplace: bool = False) -> nn.Module:
    """Pack every quantized layer of ``model`` (a copy unless ``inplace``: :mod:`squeezer.transform`;
    the float weights are freed); the returned model carries a :class:`PackReport`.

    Each layer is packed by the packer registered for its class (:func:`register_packer`). ``kernels``
    chooses each linear layer's path per rows bucket (:mod:`squeezer.kernels.select`):

    * ``"rule"`` (default): deterministic, from the layer's format and shape, no timing; the rule
      encodes the choices timing makes on a quiet machine, so packing is fast and repeatable and
      the packed model as fast as a timed one;
    * ``"time"``: each eligible path timed (interleaved repeats), the rule's path kept unless another
      is clearly faster; cached on disk per shape, scheme, threads and torch version;
    * ``{layer: path}``: pins, as :func:`packed_kernels` returns them (a path name for every rows
      bucket, or a list of one name per bucket); layers not named follow the rule. An unknown layer
      or path, or a path that cannot run the layer's format, is a :class:`ConfigError` naming it.

    Convolutions and embeddings have one runtime each (``dequant_conv``, ``gather_rows``). The
    choice is recorded on ``layer.runtime`` (read it with :func:`packed_kernels`) and in the
    checkpoint manifest that :func:`squeezer.save` writes.
    """
    model = working_copy(model, inplace)
    layers = ensure_deployable(model, "pack")
    packers = _packers(layers)
    pins = _check_kernels(kernels, layers)
    context = PackContext(paths, kernels, pins)
    out: list[PackedLayer] = []
    for name, layer in layers.items():
        if layer.is_packed:
            continue
        if not layer.activations_calibrated:
            raise ConfigError(f"layer {name!r}: static activations are not calibrated; quantize with calib=... first")
        runtime, warning = packers[name](name, layer, context)
        if name in pins and not isinstance(runtime, PackedLinear) and pins[name] != _kernel_names(runtime):
            raise ConfigError(f"kernels[{name!r}]: a {type(layer).__name__} runs only {_kernel_names(runtime)!r}, "
                              f"got {pins[name]!r}")
        layer.install_runtime(runtime)
        out.append(PackedLayer(name, layer.scheme.weight.describe(), runtime.describe(), runtime.nbytes(), warning))
    return attach_report(model, PackReport(out))


def _kernel_names(runtime: Runtime) -> str | list[str]:
    """One path name when one serves every rows bucket, else one per bucket."""
    names = list(runtime.describe().values())
    return names[0] if len(set(names)) == 1 else names


def packed_kernels(model: nn.Module) -> dict[str, str | list[str]]:
    """``{layer: path}`` of every packed layer (a list of one path per rows bucket where they
    differ): the form ``pack(model, kernels=...)`` takes, so it reproduces the same choice."""
    return {name: _kernel_names(layer.runtime) for name, layer in quant_layers(model).items() if layer.is_packed}


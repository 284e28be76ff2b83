"""`squeezer.pack`: replace each quantized layer's float weight by bit-packed integers and a
runtime on real kernels; returns what ran where, and :func:`packed_kernels` reads it back."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from typing import Literal

from torch import nn

from ..errors import ConfigError
from ..modules import QuantEmbedding, QuantLinear, QuantRecurrent, quant_layers
from ..modules.layers import QuantEmbeddingBag
from ..modules.swap import ensure_deployable
from ..transform import attach_report, working_copy
from .base import KernelPath, LinearProblem, PackedWeight
from .paths import PATHS
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


def _refuse_recurrent(layers: Mapping[str, nn.Module]) -> None:
    """Recurrent layers have no packed runtime (nothing is changed before this check)."""
    for name, layer in layers.items():
        if isinstance(layer, QuantRecurrent):
            raise ConfigError(f"pack: layer {name!r} is a {type(layer).__name__}: recurrent layers have no packed "
                              "kernel; save or export the simulated model, or quantize with "
                              f"ignore=[{name!r}] to keep it in float")


def pack(model: nn.Module, kernels: Kernels = "rule", paths: tuple[KernelPath, ...] = PATHS, *,
         inplace: bool = False) -> nn.Module:
    """Pack every quantized layer of ``model`` (a copy unless ``inplace``: :mod:`squeezer.transform`;
    the float weights are freed); the returned model carries a :class:`PackReport`.

    ``kernels`` chooses each linear layer's path per rows bucket (:mod:`squeezer.kernels.select`):

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
    _refuse_recurrent(layers)
    pins = _check_kernels(kernels, layers)
    out: list[PackedLayer] = []
    for name, layer in layers.items():
        if layer.is_packed:
            continue
        if layer.scheme.activation_mode == "static" and layer.act_qparams is None:
            raise ConfigError(f"layer {name!r}: static activations are not calibrated; quantize with calib=... first")
        qt = layer.weight_qtensor()
        warning = None
        if isinstance(layer, QuantLinear):
            bias = None if layer.bias is None else layer.bias.detach()
            problem = LinearProblem(PackedWeight.from_qtensor(qt), bias, layer.scheme, layer.act_qparams,
                                    layer.input_scale, layer.rotation_matrix())
            chooser = partial(_linear_choice, layer=name, paths=paths, kernels=kernels, pins=pins)
            runtime = PackedLinear.build(problem, chooser, paths, layer=name)
            if not any(p.integer and p.eligible(problem, m) for p in paths for _, m in BUCKETS):
                warning = next(p.note for p in paths if not p.integer)
        elif isinstance(layer, QuantEmbedding):
            if layer.max_norm is not None:
                raise ConfigError(f"layer {name!r}: packed embeddings do not support max_norm")
            runtime = PackedEmbedding.build(layer, qt)
        elif isinstance(layer, QuantEmbeddingBag):
            runtime = PackedEmbeddingBag(layer, PackedWeight.from_qtensor(qt))
            warning = "no integer embedding-bag kernel: the table is unpacked per call and reduced in fp32"
        else:
            runtime = PackedConv(layer, PackedWeight.from_qtensor(qt))
            warning = "no integer convolution kernel: weights are unpacked and convolved in fp32"
        if name in pins and not isinstance(layer, QuantLinear) and pins[name] != _kernel_names(runtime):
            raise ConfigError(f"kernels[{name!r}]: a {type(layer).__name__} runs only {_kernel_names(runtime)!r}, "
                              f"got {pins[name]!r}")
        layer.install_runtime(runtime)
        out.append(PackedLayer(name, qt.spec.describe(), runtime.describe(), runtime.nbytes(), warning))
    return attach_report(model, PackReport(out))


def _kernel_names(runtime: PackedLinear | PackedConv | PackedEmbedding) -> str | list[str]:
    """One path name when one serves every rows bucket, else one per bucket."""
    names = list(runtime.describe().values())
    return names[0] if len(set(names)) == 1 else names


def packed_kernels(model: nn.Module) -> dict[str, str | list[str]]:
    """``{layer: path}`` of every packed layer (a list of one path per rows bucket where they
    differ): the form ``pack(model, kernels=...)`` takes, so it reproduces the same choice."""
    return {name: _kernel_names(layer.runtime) for name, layer in quant_layers(model).items() if layer.is_packed}


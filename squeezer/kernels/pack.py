"""`squeezer.pack`: replace each quantized layer's float weight by bit-packed integers and a
runtime on real kernels; returns what ran where."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from ..errors import ConfigError
from ..modules import QuantEmbedding, QuantLinear
from ..modules.swap import ensure_deployable
from .base import KernelPath, LinearProblem, PackedWeight
from .paths import PATHS
from .runtime import PackedConv, PackedEmbedding, PackedLinear
from .select import BUCKETS


@dataclass
class PackedLayer:
    """One packed layer: the kernel timed fastest per rows-bucket, real bytes, and a warning when
    no integer kernel fits the layer's format or shape (a float fallback timed faster is no warning)."""

    name: str
    format: str
    kernels: dict[str, str]
    runtime_bytes: int
    warning: str | None


def pack(model: nn.Module, paths: tuple[KernelPath, ...] = PATHS) -> list[PackedLayer]:
    """Pack every quantized layer of ``model`` in place (its float weights are freed)."""
    layers = ensure_deployable(model, "pack")
    out: list[PackedLayer] = []
    for name, layer in layers.items():
        if layer.is_packed:
            continue
        if layer.config.activation_mode == "static" and layer.act_qparams is None:
            raise ConfigError(f"layer {name!r}: static activations are not calibrated; quantize with calib=... first")
        qt = layer.weight_qtensor()
        warning = None
        if isinstance(layer, QuantLinear):
            bias = None if layer.bias is None else layer.bias.detach()
            runtime = PackedLinear.build(LinearProblem(PackedWeight.from_qtensor(qt), bias, layer.config, layer.act_qparams,
                                                    layer.input_scale, layer.rotation_matrix()), paths)
            problem = runtime.problem
            if not any(p.integer and p.eligible(problem, m) for p in paths for _, m in BUCKETS):
                warning = next(p.note for p in paths if not p.integer)
        elif isinstance(layer, QuantEmbedding):
            if layer.max_norm is not None:
                raise ConfigError(f"layer {name!r}: packed embeddings do not support max_norm")
            runtime = PackedEmbedding.build(layer, qt)
        else:
            runtime = PackedConv(layer, PackedWeight.from_qtensor(qt))
            warning = "no integer convolution kernel: weights are unpacked and convolved in fp32"
        layer.install_runtime(runtime)
        out.append(PackedLayer(name, qt.spec.describe(), runtime.describe(), runtime.nbytes(), warning))
    model.squeezer_packing = out
    return out


def packing_table(rows: list[PackedLayer]) -> list[dict]:
    """JSON-ready rows."""
    return [asdict(r) for r in rows]

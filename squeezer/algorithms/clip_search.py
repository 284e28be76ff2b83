"""Output-aware clipping search: per block, shrink the range ``[lo, hi]`` to ``a [lo, hi]``
choosing ``a`` on a grid to minimise the layer's output error on calibration data.

For a block (row ``r``, group ``g``) the output error caused by its rounding is
``e_rg(a) = dW_rg H_gg dW_rg^T`` with ``dW = W - fq_a(W)`` and ``H = X^T X`` restricted to the group's
columns: the squared error that the group contributes to ``X W^T``, measured on all calibration
rows at the cost of a ``g x g`` matrix. Cross-group terms are ignored, so blocks are chosen
independently (the AWQ ``auto_clip`` approximation; Lin et al., "AWQ", MLSys 2024). Uniform
mapping only. Used alone (``algorithm="clip"``) and inside GPTQ / AWQ.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..modules.base import QuantMixin
from ..quant.blocks import to_blocks
from ..quant.core import QParams, compute_qparams, fake_quantize
from ..quant.spec import PerChannel, PerGroup, PerTensor, QuantSpec
from .base import Algorithm, register
from .stats import LayerStats


def _group_columns(spec: QuantSpec, k: int) -> list[slice]:
    g = spec.granularity
    size = g.size if isinstance(g, PerGroup) else k
    return [slice(start, min(start + size, k)) for start in range(0, k, size)]


def block_output_error(weight: Tensor, w_hat: Tensor, hessian: Tensor, spec: QuantSpec) -> Tensor:
    """``e[r, g] = dW_rg H_gg dW_rg^T`` for ``weight (N, K)``; shape ``(N, G)``."""
    dw = (weight - w_hat).double()
    cols = _group_columns(spec, weight.shape[1])
    return torch.stack([((dw[:, c] @ hessian[c, c]) * dw[:, c]).sum(1) for c in cols], dim=1)


def best_clip_qparams(weight: Tensor, spec: QuantSpec, hessian: Tensor, grid: int = 20, min_ratio: float = 0.5) -> QParams:
    """Per-block qparams from the best shrink ``a`` in ``linspace(min_ratio, 1, grid)`` (see module doc).

    ``weight: (N, K)`` (conv weights flattened), ``hessian: (K, K)``; uniform, per-channel (axis 0)
    or per-group specs. Returns parameters of ``param_shape``.
    """
    w = weight.detach().float().reshape(weight.shape[0], -1)
    if not (spec.mapping == "uniform" and (isinstance(spec.granularity, PerGroup)
                                           or (isinstance(spec.granularity, PerChannel) and spec.granularity.axis == 0))):
        return compute_qparams(w, spec)
    blocks = to_blocks(w, spec.granularity)
    lo, hi = blocks.data.amin(1), blocks.data.amax(1)
    best_err = None
    best = None
    for ratio in torch.linspace(1.0, min_ratio, grid).tolist():
        qp = compute_qparams(w, spec, lo * ratio, hi * ratio)
        err = block_output_error(w, fake_quantize(w, spec, qp), hessian, spec).reshape(-1)
        if best is None:
            best_err, best = err, qp
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        shape = best.scale.shape
        best.scale = torch.where(better.reshape(shape), qp.scale, best.scale)
        if best.zero_point is not None:
            best.zero_point = torch.where(better.reshape(shape), qp.zero_point, best.zero_point)
    return best


@register
@dataclass
class ClipSearch(Algorithm):
    """Round-to-nearest on clipping ranges chosen by :func:`best_clip_qparams`."""

    name = "clip"
    grid: int = 20
    min_ratio: float = 0.5

    def applies_to(self, layer: QuantMixin) -> bool:
        g = layer.weight_spec.granularity
        grouped_conv = getattr(layer, "groups", 1) > 1  # statistics cover the first group's inputs only
        return layer.weight_spec.mapping == "uniform" and not isinstance(g, PerTensor) and not grouped_conv

    def quantize_layer(self, layer: QuantMixin, stats: LayerStats | None) -> None:
        w = layer.weight.detach().reshape(layer.weight.shape[0], -1)
        qp = best_clip_qparams(w, layer.weight_spec, stats.hessian(), self.grid, self.min_ratio)
        layer.set_quantized(layer.weight.detach(), qp)  # conv params: same (N, ...) shape as flattened


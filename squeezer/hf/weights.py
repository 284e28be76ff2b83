"""One weight through the preset's grid, with scales already rounded to the dtype they are stored in."""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import DataError
from ..quant.core import QParams, QTensor, compute_qparams, quantize
from ..quant.spec import PerGroup, QuantSpec


def groups_fit(shape: tuple[int, ...], spec: QuantSpec) -> bool:
    """Whether rows of a weight of ``shape (N, K)`` split into whole groups of ``spec`` (``K % size == 0``): the
    block layouts of GGUF and compressed-tensors have no short last group, so other weights stay in float."""
    return not isinstance(spec.granularity, PerGroup) or shape[-1] % spec.granularity.size == 0


def quantize_weight(name: str, weight: Tensor, spec: QuantSpec, scale_dtype: torch.dtype) -> QTensor:
    """Round-to-nearest codes of ``weight (N, K)`` under ``spec``, on the scale ``S`` rounded to ``scale_dtype``.

    ``S = compute_qparams(W).scale`` is cast to ``scale_dtype`` (a zero becomes the dtype's smallest
    subnormal) and the codes ``q = clip(round(W / S) + Z)`` are computed on that ``S``: the stored scales
    and codes then give back ``(q - Z) * S`` exactly, with no second rounding."""
    w = weight.float()
    if not torch.isfinite(w).all():
        raise DataError(f"weight {name!r} holds NaN or infinite values")
    qp = compute_qparams(w, spec)
    info = torch.finfo(scale_dtype)
    scale = qp.scale.to(scale_dtype).clamp_min(info.tiny * info.eps)
    if not torch.isfinite(scale).all():
        raise DataError(f"weight {name!r}: a scale overflows {scale_dtype} (|W| up to {float(w.abs().max()):.3g})")
    return quantize(w, spec, QParams(scale.float(), qp.zero_point))

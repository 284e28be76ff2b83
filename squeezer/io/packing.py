"""Bit-packing of integer codes: ``b``-bit codes stored densely, ``ceil(n * b / 8)`` bytes.

Codes are shifted to ``u = code - offset >= 0`` and written little-endian bit by bit, so
two 4-bit codes share a byte (low nibble first), four 2-bit codes, eight 1-bit codes, and
3-, 5-, 6-, 7-bit codes straddle bytes without waste.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..quant.core import code_dtype
from ..quant.spec import QuantSpec


def code_offset(spec: QuantSpec) -> int:
    """Smallest code (``qmin`` for uniform, 0 for codebooks)."""
    return 0 if spec.is_codebook else spec.qmin


def pack_codes(codes: Tensor, spec: QuantSpec) -> Tensor:
    """``codes`` (any shape) -> ``uint8`` tensor of ``ceil(numel * bits / 8)`` bytes."""
    u = (codes.reshape(-1).to(torch.int64) - code_offset(spec)).numpy().astype(np.uint32)
    if spec.bits == 8:
        return torch.from_numpy(u.astype(np.uint8))
    bits = ((u[:, None] >> np.arange(spec.bits, dtype=np.uint32)) & 1).astype(np.uint8)
    return torch.from_numpy(np.packbits(bits.reshape(-1), bitorder="little"))


def unpack_codes(packed: Tensor, spec: QuantSpec, shape: tuple[int, ...]) -> Tensor:
    """Inverse of :func:`pack_codes`."""
    n = int(np.prod(shape)) if shape else 1
    raw = packed.numpy()
    if spec.bits == 8:
        u = raw[:n].astype(np.int64)
    else:
        bits = np.unpackbits(raw, count=n * spec.bits, bitorder="little").reshape(n, spec.bits).astype(np.int64)
        u = (bits << np.arange(spec.bits, dtype=np.int64)).sum(axis=1)
    return torch.from_numpy(u + code_offset(spec)).to(code_dtype(spec)).reshape(shape)

"""Bit-packing of integer codes: ``b``-bit codes stored densely in ``ceil(n * b / 8)`` bytes.

Codes are shifted to ``u = code - offset >= 0`` (``offset = qmin`` for uniform, 0 for
codebooks) and written little-endian bit by bit: two 4-bit codes share a byte (low nibble
first), four 2-bit codes, eight 1-bit codes; 3-, 5-, 6-, 7-bit codes straddle bytes.
Pure torch, so packed weights can be unpacked at run time.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .core import code_dtype
from .spec import QuantSpec


def code_offset(spec: QuantSpec) -> int:
    """Smallest code (``qmin`` for uniform, 0 for codebooks)."""
    return 0 if spec.is_codebook else spec.qmin


def pack_codes(codes: Tensor, spec: QuantSpec) -> Tensor:
    """``codes`` (any shape) -> ``uint8`` tensor of ``ceil(numel * bits / 8)`` bytes."""
    u = codes.reshape(-1).to(torch.int32) - code_offset(spec)
    if spec.bits == 8:
        return u.to(torch.uint8)
    shifts = torch.arange(spec.bits, dtype=torch.int32, device=codes.device)
    bits = ((u[:, None] >> shifts) & 1).reshape(-1)
    bits = torch.nn.functional.pad(bits, (0, -bits.numel() % 8)).reshape(-1, 8)
    weights = (1 << torch.arange(8, dtype=torch.int32, device=codes.device))
    return (bits * weights).sum(dim=1).to(torch.uint8)


def _unpack_words(packed: Tensor, bits: int, n: int) -> Tensor:
    """Fast path for ``bits < 8``: every 8 codes fill exactly ``bits`` bytes, read as one
    little-endian integer ``w``; code ``j`` of the group is ``(w >> (bits * j)) & (2^bits - 1)``."""
    groups = -(-n // 8)
    data = torch.nn.functional.pad(packed, (0, groups * bits - packed.numel())).reshape(groups, bits).to(torch.int64)
    word = (data << (8 * torch.arange(bits, dtype=torch.int64, device=packed.device))).sum(dim=1)
    shifts = bits * torch.arange(8, dtype=torch.int64, device=packed.device)
    return ((word[:, None] >> shifts) & ((1 << bits) - 1)).reshape(-1)[:n].to(torch.int32)


def unpack_codes(packed: Tensor, spec: QuantSpec, shape: tuple[int, ...]) -> Tensor:
    """Inverse of :func:`pack_codes`: codes of ``shape`` in :func:`code_dtype`."""
    n = 1
    for d in shape:
        n *= d
    if spec.bits == 8:
        u = packed[:n].to(torch.int32)
    elif spec.bits < 8:
        u = _unpack_words(packed, spec.bits, n)
    else:
        shifts = torch.arange(8, dtype=torch.int32, device=packed.device)
        bits = ((packed.to(torch.int32)[:, None] >> shifts) & 1).reshape(-1)[: n * spec.bits].reshape(n, spec.bits)
        u = (bits << torch.arange(spec.bits, dtype=torch.int32, device=packed.device)).sum(dim=1)
    return (u + code_offset(spec)).to(code_dtype(spec)).reshape(shape)

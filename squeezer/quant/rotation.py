"""Block Hadamard rotation of a layer's input dimension (incoherence processing: QuIP#, Tseng et al. 2024;
QuaRot, Ashkboos et al. 2024).

``H_b`` is the normalised Sylvester Hadamard matrix of order ``b`` (a power of two): symmetric and
orthonormal, ``H_b H_b = I``. On a last dimension ``K = n b`` the rotation is block-diagonal,

    rotate(x, b) = reshape(reshape(x, (..., n, b)) @ H_b, (..., K)),

which is its own inverse. For a linear layer ``y = x W^T`` the pair ``x' = rotate(x)``,
``W' = rotate(W)`` (rows of ``W`` rotated along the input dimension) leaves the function unchanged:
``x' W'^T = x H H^T W^T = x W^T``. A weight column with an outlier is spread over the ``b`` columns of its
block, so each group of a per-group quantizer sees a flatter distribution.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor


@lru_cache(maxsize=16)
def _hadamard(b: int) -> Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < b:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / b**0.5


def is_block_size(b: object) -> bool:
    """Whether ``b`` is a Hadamard block size: an int power of two (1 = no rotation)."""
    return isinstance(b, int) and not isinstance(b, bool) and b >= 1 and not b & (b - 1)


def hadamard(b: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """``H_b`` (``b`` a power of two), ``(b, b)``; a copy, so that the cached matrix cannot be changed in place."""
    if not is_block_size(b):
        raise ValueError(f"a Hadamard block has a power-of-two size, got {b!r}")
    return _hadamard(b).to(dtype, copy=True)


def rotation_block(k: int, block: int) -> int:
    """The largest power of two ``<= block`` that divides ``k`` (1: no rotation possible)."""
    b = 1
    while b * 2 <= block and k % (b * 2) == 0:
        b *= 2
    return b


def rotate(x: Tensor, h: Tensor) -> Tensor:
    """``rotate(x, b)`` with ``h = H_b``: the last dimension of ``x`` (a multiple of ``b``) in blocks of ``b``."""
    b = h.shape[0]
    return (x.reshape(-1, b) @ h.to(device=x.device, dtype=x.dtype)).reshape(x.shape)


def rotate_butterfly(x: Tensor, b: int) -> Tensor:
    """``rotate(x, b)`` by the fast Walsh-Hadamard transform, ``[x1, x2] H_2n = [(x1 + x2) H_n, (x1 - x2) H_n]``
    applied ``log2 b`` times, then ``b^-1/2``: only additions, reshapes and one scaling, for converters that
    would turn a product with the constant ``H_b`` into a quantized kernel of their own."""
    y, n = x.reshape(-1, b), b
    while n > 1:
        pairs = y.reshape(-1, 2, n // 2)
        y = torch.cat([pairs[:, 0] + pairs[:, 1], pairs[:, 0] - pairs[:, 1]], dim=-1).reshape(-1, n // 2)
        n //= 2
    return (y.reshape(x.shape) * b**-0.5).to(x.dtype)

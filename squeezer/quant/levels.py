"""Level tables of the non-uniform (codebook) mappings.

A codebook mapping stores a code per element and reconstructs ``x^ = scale_b * levels[code]``
where ``levels`` is either one sorted table shared by all blocks, shape ``(L,)``, or one table
per block, shape ``(B, L)`` (k-means).

* ``log2`` (b bits):  ``{0} U {+-2^-k : k = 0..n-1}``, ``n = 2^(b-1) - 1``, scale = block max |x|
* ``exp``  (b bits):  ``{0} U {+-base^-k}``, same layout, ``base`` fitted by MSE when not given
* ``binary``:         ``{-1, +1}``, scale ``alpha = mean |x|``
* ``ternary``:        ``{-1, 0, +1}``, scale ``alpha = mean{|x| : |x| > delta}``, ``delta = 0.7 mean|x|``
* ``kmeans`` (b bits): ``2^b`` centroids per block from Lloyd's algorithm started at the
  asymmetric uniform grid, so its MSE never exceeds uniform's at equal bits (Lloyd never
  increases the error). Han et al., "Deep Compression", 2016.
"""

from __future__ import annotations

import torch
from torch import Tensor

EXP_BASE_GRID = torch.linspace(1.05, 3.0, 40)


def power_levels(bits: int, base: float, dtype: torch.dtype = torch.float32) -> Tensor:
    """Sorted ``{0, +-base^-k}``: ``2^bits - 1`` levels in ``[-1, 1]``."""
    n = 2 ** (bits - 1) - 1
    mags = torch.tensor(base, dtype=torch.float64) ** -torch.arange(n - 1, -1, -1, dtype=torch.float64)
    return torch.cat([-mags.flip(0), torch.zeros(1, dtype=torch.float64), mags]).to(dtype)


def binary_levels(dtype: torch.dtype = torch.float32) -> Tensor:
    return torch.tensor([-1.0, 1.0], dtype=dtype)


def ternary_levels(dtype: torch.dtype = torch.float32) -> Tensor:
    return torch.tensor([-1.0, 0.0, 1.0], dtype=dtype)


def nearest_code(values: Tensor, levels: Tensor) -> Tensor:
    """Index of the nearest level. ``values (B, n)``, ``levels (L,)`` or ``(B, L)`` sorted -> ``(B, n)`` int64."""
    mids = (levels[..., 1:] + levels[..., :-1]) / 2
    if mids.dim() == 1:
        return torch.bucketize(values.contiguous(), mids)
    return torch.searchsorted(mids.contiguous(), values.contiguous())


def lookup(codes: Tensor, levels: Tensor) -> Tensor:
    """``levels[code]`` per block. ``codes (B, n)``, ``levels (L,)`` or ``(B, L)`` -> ``(B, n)``."""
    if levels.dim() == 1:
        return levels[codes]
    return torch.gather(levels, 1, codes)


def kmeans_levels(data: Tensor, mask: Tensor | None, init: Tensor, iters: int = 30) -> Tensor:
    """Lloyd's 1-D k-means per block. ``data (B, n)``, ``init (B, L)`` sorted -> centroids ``(B, L)``.

    Each step assigns every value to its nearest centroid and moves each centroid to the mean
    of its members (an empty cluster keeps its place), so the MSE is non-increasing.
    """
    centroids = init.clone()
    weight = torch.ones_like(data) if mask is None else mask.to(data.dtype)
    previous = None
    for _ in range(iters):
        codes = nearest_code(data, centroids)
        if previous is not None and torch.equal(codes, previous):
            break
        previous = codes
        sums = torch.zeros_like(centroids).scatter_add_(1, codes, data * weight)
        counts = torch.zeros_like(centroids).scatter_add_(1, codes, weight)
        centroids = torch.where(counts > 0, sums / counts.clamp_min(1), centroids)
        centroids, _ = centroids.sort(dim=1)
    return centroids

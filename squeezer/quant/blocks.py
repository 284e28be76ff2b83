"""Reshape a tensor into quantization blocks and back.

Every quantizer works on a 2-D view ``blocks: (B, n)`` where each row shares one set of
parameters. ``n`` is padded with zeros when a group is shorter; ``mask`` marks real entries.

* tensor:      ``(1, numel)``
* channel(a):  ``(shape[a], numel / shape[a])``  (axis ``a`` moved to the front)
* token:       ``(numel / shape[-1], shape[-1])``
* group(g):    rows ``R = shape[0]`` (1 for 1-D), ``K = numel / R`` split into ``G = ceil(K / g)``
               groups, giving ``(R * G, g)``; parameters are reported with shape ``(R, G)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ConfigError
from .spec import Granularity, PerChannel, PerGroup, PerTensor, PerToken


@dataclass(frozen=True)
class Blocks:
    """A blocked view of a tensor: ``data (B, n)``, optional ``mask (B, n)``, original ``shape``."""

    data: Tensor
    mask: Tensor | None
    shape: torch.Size
    granularity: Granularity
    param_shape: tuple[int, ...]

    def count(self) -> Tensor:
        """Number of real (unpadded) entries per block, shape ``(B,)``."""
        if self.mask is None:
            return torch.full((self.data.shape[0],), self.data.shape[1], dtype=self.data.dtype, device=self.data.device)
        return self.mask.sum(dim=1).to(self.data.dtype)


def _group_dims(shape: torch.Size, size: int) -> tuple[int, int, int]:
    rows = shape[0] if len(shape) > 1 else 1
    k = int(torch.Size(shape).numel()) // max(rows, 1)
    groups = -(-k // size) if k else 0
    return rows, k, groups


def to_blocks(x: Tensor, granularity: Granularity) -> Blocks:
    """Blocked view of ``x`` for ``granularity`` (see module docstring)."""
    g = granularity
    if isinstance(g, PerTensor):
        return Blocks(x.reshape(1, -1), None, x.shape, g, (1,))
    if isinstance(g, PerToken):
        return Blocks(x.reshape(-1, x.shape[-1]), None, x.shape, g, tuple(x.shape[:-1]))
    if isinstance(g, PerChannel):
        if not -x.dim() <= g.axis < max(x.dim(), 1):
            raise ConfigError(f"channel axis {g.axis} is out of range for a tensor of shape {tuple(x.shape)}")
        moved = x.movedim(g.axis, 0) if x.dim() else x.reshape(1)
        return Blocks(moved.reshape(moved.shape[0], -1), None, x.shape, g, (moved.shape[0],))
    if isinstance(g, PerGroup):
        rows, k, groups = _group_dims(x.shape, g.size)
        flat = x.reshape(rows, k)
        pad = groups * g.size - k
        mask = None
        if pad:
            flat = torch.nn.functional.pad(flat, (0, pad))
            mask = torch.ones(rows, groups * g.size, dtype=torch.bool, device=x.device)
            mask[:, k:] = False
            mask = mask.reshape(rows * groups, g.size)
        return Blocks(flat.reshape(rows * groups, g.size), mask, x.shape, g, (rows, groups))
    raise ConfigError(f"unknown granularity {g!r}")


def from_blocks(data: Tensor, shape: torch.Size, granularity: Granularity) -> Tensor:
    """Inverse of :func:`to_blocks` for a tensor of the blocked shape ``(B, n)``."""
    g = granularity
    if isinstance(g, (PerTensor, PerToken)):
        return data.reshape(shape)
    if isinstance(g, PerChannel):
        if not len(shape):
            return data.reshape(shape)
        moved = list(shape)
        moved.insert(0, moved.pop(g.axis))
        return data.reshape(moved).movedim(0, g.axis)
    rows, k, groups = _group_dims(shape, g.size)
    return data.reshape(rows, groups * g.size)[:, :k].reshape(shape)


def expand_params(param: Tensor, blocks_count: int) -> Tensor:
    """Flatten per-block parameters of ``param_shape`` to ``(B, 1)`` for broadcasting over blocks."""
    return param.reshape(blocks_count, -1)

"""Reductions of calibration statistics across the processes of a ``torch.distributed`` group.

Data-parallel calibration: each of ``N`` processes runs its own share of the calibration batches, and
every statistic is reduced before it is used, so each process then quantizes the same model
deterministically. A :class:`Reducer` is the one place those collectives are called: ``sum``
(Hessian sums, counts, histogram counts), ``min`` / ``max`` (ranges) and ``gather`` (rows of unequal
counts, padded to the largest for the collective then trimmed). :data:`LOCAL` (one process) leaves
every tensor as it is. The tensors travel as float64 (exact for counts below ``2^53``) on the device the
backend needs (``cuda`` for NCCL).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .errors import ConfigError


@dataclass(frozen=True)
class Reducer:
    """Collectives over ``group`` (``None``: the default group of an initialised ``torch.distributed``);
    ``active=False`` is one process: every reduction returns its input."""

    active: bool = False
    group: Any = None

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group) if self.active else 0

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.group) if self.active else 1

    def _device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(self.group) == "nccl" \
            else torch.device("cpu")

    def _reduce(self, t: Tensor, op: Any) -> Tensor:
        if not self.active:
            return t
        work = t.detach().to(self._device(), torch.float64).clone()
        dist.all_reduce(work, op=op, group=self.group)
        return work.to(t.device, t.dtype)

    def sum(self, t: Tensor) -> Tensor:
        """``sum_r t_r`` over the processes."""
        return self._reduce(t, dist.ReduceOp.SUM)

    def min(self, t: Tensor) -> Tensor:
        """Elementwise ``min_r t_r``."""
        return self._reduce(t, dist.ReduceOp.MIN)

    def max(self, t: Tensor) -> Tensor:
        """Elementwise ``max_r t_r``."""
        return self._reduce(t, dist.ReduceOp.MAX)

    def barrier(self) -> None:
        """Wait until every process has reached this call."""
        if self.active:
            dist.barrier(group=self.group)

    def gather(self, t: Tensor) -> list[Tensor]:
        """Every process's ``t`` (``(n_r, ...)``, equal trailing shapes), in rank order."""
        if not self.active:
            return [t]
        counts = [int(n) for n in self._gather_equal(torch.tensor([t.shape[0]], dtype=torch.float64))]
        padded = torch.zeros((max(counts),) + tuple(t.shape[1:]), dtype=torch.float64)
        padded[: t.shape[0]] = t.detach().double()
        return [part[:n].to(t.dtype) for part, n in zip(self._gather_equal(padded), counts)]

    def _gather_equal(self, t: Tensor) -> list[Tensor]:
        """Every process's ``t`` of one common shape, in rank order (float64 on the way)."""
        if not self.active:
            return [t]
        work = t.detach().to(self._device(), torch.float64).contiguous()
        parts = [torch.empty_like(work) for _ in range(self.world_size)]
        dist.all_gather(parts, work, group=self.group)
        return [p.to(t.device, t.dtype) for p in parts]


LOCAL = Reducer()
"""One process: no reduction."""


def make_reducer(distributed: bool | Any) -> Reducer:
    """``False``: :data:`LOCAL`; ``True``: the default group of the initialised ``torch.distributed``;
    a process group: that group; a :class:`Reducer`: itself. ``True`` without an initialised
    ``torch.distributed`` is a ``ConfigError``."""
    if isinstance(distributed, Reducer):
        return distributed
    if distributed is False or distributed is None:
        return LOCAL
    if not (dist.is_available() and dist.is_initialized()):
        raise ConfigError("distributed=...: torch.distributed is not initialised (call "
                          "torch.distributed.init_process_group first, e.g. under torchrun)", argument="distributed")
    return Reducer(active=True, group=None if distributed is True else distributed)

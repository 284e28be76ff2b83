"""Statistics of a layer's inputs over calibration data, in the weight's column space.

A linear layer's input rows are ``x (n, K)``; a convolution's are its im2col patches
``(n, C_in/groups * kh * kw)`` (first group), matching ``W.reshape(out, -1)``. Kept: ``X^T X``
(for the GPTQ Hessian ``H = 2 X^T X / n``), column sums, mean |x|, max |x|, and up to
``max_rows`` rows sampled uniformly at random from all rows seen (for output-error searches).
Processes that each saw a share of the rows combine theirs with :func:`reduce_stats`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..distributed import Reducer
from ..quant.rotation import rotate


SAMPLE_ROWS = 2048
"""Rows of a layer's inputs kept by default (uniform sample) for output-error searches and reports."""


class LayerStats:
    """Running input statistics of one layer (see module docstring)."""

    def __init__(self, columns: int, max_rows: int = SAMPLE_ROWS, seed: int = 0) -> None:
        self.xtx = torch.zeros(columns, columns, dtype=torch.float64)
        self.sum = torch.zeros(columns, dtype=torch.float64)
        self.abs_sum = torch.zeros(columns, dtype=torch.float64)
        self.abs_max = torch.zeros(columns)
        self.count = 0
        self.max_rows = max_rows
        self.sample = torch.zeros(0, columns)
        self._keys = torch.zeros(0)
        self._generator = torch.Generator().manual_seed(seed)
        # float64 work in chunks of ~8 MiB, so that a long input never needs a float64 copy at once
        self._chunk = max(1, 2**20 // columns)

    def update(self, rows: Tensor) -> None:
        """Add input rows ``(n, K)``."""
        for chunk in rows.detach().split(self._chunk):
            self._update(chunk.float())

    def _update(self, rows: Tensor) -> None:
        r64 = rows.double()
        self.xtx.addmm_(r64.T, r64)
        self.sum += r64.sum(0)
        self.abs_sum += r64.abs().sum(0)
        self.abs_max = torch.maximum(self.abs_max, rows.abs().amax(0))
        self.count += rows.shape[0]
        # bottom-k sampling: every row gets a uniform key, the max_rows smallest keys are kept, so the
        # sample is uniform over all rows seen, whatever the chunking; rows stay in arrival order
        self._keep_smallest(torch.cat([self._keys, torch.rand(rows.shape[0], generator=self._generator)]),
                            torch.cat([self.sample, rows]))

    def _keep_smallest(self, keys: Tensor, pool: Tensor) -> None:
        """Keep the ``max_rows`` rows of ``pool`` with the smallest ``keys``, in ``pool`` order."""
        if pool.shape[0] > self.max_rows:
            keep = keys.topk(self.max_rows, largest=False).indices.sort().values
            pool, keys = pool[keep], keys[keep]
        self.sample, self._keys = pool, keys

    def reduce(self, reducer: Reducer) -> None:
        """Combine, in place, the statistics every process of ``reducer`` gathered on its own rows: sums and
        count summed, ``max |x|`` maximised, samples merged by their keys (the bottom-k sample of all rows,
        uniform when each process drew its keys from its own seed)."""
        self.xtx, self.sum, self.abs_sum = reducer.sum(self.xtx), reducer.sum(self.sum), reducer.sum(self.abs_sum)
        self.abs_max = reducer.max(self.abs_max)
        self.count = int(reducer.sum(torch.tensor(float(self.count))))
        self._keep_smallest(torch.cat(reducer.gather(self._keys)), torch.cat(reducer.gather(self.sample)))

    def _copy(self) -> "LayerStats":
        """A shallow copy: the same tensors until the caller replaces them."""
        out = LayerStats.__new__(LayerStats)
        out.__dict__.update(self.__dict__)
        return out

    def scaled(self, d: Tensor) -> "LayerStats":
        """The statistics of the inputs ``x diag(d)`` (``d (K,)``, e.g. a new smoothing factor), from these:
        ``X^T X -> D X^T X D``, sums and samples times ``d``, ``|x|`` statistics times ``|d|``."""
        d32 = d.detach().float().reshape(-1)
        d64 = d32.double()
        out = self._copy()
        out.xtx = self.xtx * d64[:, None] * d64[None, :]
        out.sum = self.sum * d64
        out.abs_sum = self.abs_sum * d64.abs()
        out.abs_max = self.abs_max * d32.abs()
        out.sample = self.sample * d32
        return out

    def rotated(self, h: Tensor) -> "LayerStats":
        """The statistics of the inputs ``rotate(x)`` (block Hadamard ``h = H_b``, :mod:`squeezer.quant.rotation`):
        ``X^T X -> R^T X^T X R``, sums and samples rotated exactly; ``|x|`` statistics (max, mean) are those of
        the rotated sample rows (estimates)."""
        h32, h64 = h.float(), h.double()
        out = self._copy()
        out.xtx = rotate(rotate(self.xtx, h64).T.contiguous(), h64)
        out.sum = rotate(self.sum, h64)
        out.sample = rotate(self.sample, h32)
        out.abs_max = out.sample.abs().amax(0) if len(out.sample) else torch.zeros_like(self.abs_max)
        out.abs_sum = (out.sample.abs().double().mean(0) * self.count if len(out.sample)
                       else torch.zeros_like(self.abs_sum))
        return out

    def hessian(self) -> Tensor:
        """``H = 2 X^T X / n`` (float64), the curvature of ``||X W^T - X W'^T||^2`` in ``W``."""
        return self.xtx * (2.0 / max(self.count, 1))

    def mean(self) -> Tensor:
        return (self.sum / max(self.count, 1)).float()

    def mean_abs(self) -> Tensor:
        return (self.abs_sum / max(self.count, 1)).float()


def reduce_stats(stats: LayerStats | None, reducer: Reducer, max_rows: int = SAMPLE_ROWS) -> LayerStats | None:
    """``stats`` combined over the processes of ``reducer`` (see :meth:`LayerStats.reduce`); a process whose
    share never reached the layer (``None``) takes part with empty statistics; ``None`` when no process saw it."""
    if not reducer.active:
        return stats
    columns = int(reducer.max(torch.tensor(0.0 if stats is None else float(stats.xtx.shape[0]))))
    if not columns:
        return None
    if stats is None:
        stats = LayerStats(columns, max_rows=max_rows, seed=reducer.rank)
    stats.reduce(reducer)
    return stats


def input_rows(layer: nn.Module, x: Tensor) -> Tensor:
    """A layer's input as rows in the weight's column space: ``(n, K)``."""
    if isinstance(layer, nn.Conv2d):
        cols = F.unfold(x, layer.kernel_size, dilation=layer.dilation, padding=layer.padding, stride=layer.stride)
        per_group = cols.shape[1] // layer.groups
        return cols[:, :per_group].transpose(1, 2).reshape(-1, per_group)
    if isinstance(layer, nn.Conv1d):
        cols = F.unfold(x.unsqueeze(-1), (layer.kernel_size[0], 1), dilation=(layer.dilation[0], 1),
                        padding=(layer.padding[0], 0), stride=(layer.stride[0], 1))
        per_group = cols.shape[1] // layer.groups
        return cols[:, :per_group].transpose(1, 2).reshape(-1, per_group)
    return x.reshape(-1, x.shape[-1])

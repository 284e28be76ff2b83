"""GPTQ: rounding chosen column by column with second-order error compensation.

Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers", ICLR 2023 (Algorithm 1 and the reference code).

Problem. A layer's weight ``W`` is viewed as ``(N, K)`` (a convolution's weight flattened to
``(out, in * kh * kw)``; its calibration inputs are then the im2col patches, see
:mod:`squeezer.algorithms.stats`). With calibration input rows ``X (n, K)`` we want grid points
``W^`` minimising the layer-output error::

    ||X W^T - X W^^T||_F^2 = (n / 2) sum_r (w_r - w^_r) H (w_r - w^_r)^T,   H = 2 X^T X / n.

Rows do not interact, so every row shares the same ``H`` (``stats.hessian()``). Nothing below depends
on the scale of ``H`` (the damping is relative to its diagonal; ``U`` scales by ``c^-1/2`` and each
error ``err_j`` by ``c^1/2``), so ``X^T X`` itself may be passed (``stats.xtx``: no ``K x K`` copy).

Optimal Brain Quantization. Quantize one column ``j`` to ``q_j`` while the not-yet-quantized
columns ``F`` may still move: the best compensation and the error it leaves are::

    W[:, F] -= (w_j - q_j) / [H_F^-1]_jj * [H_F^-1]_{j, F},    dE = (w_j - q_j)^2 / [H_F^-1]_jj.

GPTQ quantizes the columns in one fixed order for all rows. The rows of ``H_F^-1`` needed
along the way (``F`` = the columns after ``j``) are then the rows of the upper Cholesky
factor ``U`` of ``H^-1 = U^T U`` (up to a per-row factor ``U_jj``), so with
``err_j = (w_j - q_j) / U_jj`` the step is simply::

    W[:, j+1:] -= err_j U[j, j+1:].

Lazy batches. The updates are linear, so they are applied exactly, but lazily: the columns are
processed in blocks of ``block_size``; inside a block the update touches only the block, and at
its end the rest of the matrix gets all of them at once, ``W[:, i2:] -= Err_B U[B, i2:]`` (one
matrix product instead of ``block_size`` rank-1 updates).

Numerics (as in the reference implementation).

* Dead columns (``H_ii = 0``: an input feature that is always 0) get ``H_ii = 1`` and
  ``W[:, i] = 0``; they contribute nothing to the output, whatever their weight.
* Damping: ``lambda = damp * mean(diag H)`` is added to the diagonal before ``H^-1`` and its
  Cholesky factor are computed (float64). If a factorisation still fails, ``lambda`` is raised
  tenfold, at most a few times.
* ``act_order``: the columns are processed in order of decreasing ``H_ii`` (largest inputs
  first, while the most columns are left to absorb their error), then put back in place.

Parameters. The integer grid is the core's uniform one, ``q = clip(round(w / S) + Z, qmin, qmax)``,
``w^ = (q - Z) S``, with parameters of the spec's granularity:

* per-tensor / per-channel: computed once up front from ``W`` (min-max), or with ``clip=True``
  by :func:`~squeezer.algorithms.clip_search.best_clip_qparams` (per channel; a per-tensor
  range is not searched and stays min-max);
* per-group: the parameters of group ``g`` (per row) are computed when the column loop first
  reaches one of the group's columns, from the *current* (already error-compensated) weights of
  the whole group, i.e. including the lazy updates still pending (the reference's
  ``static_groups=False``). With ``act_order`` the group of a column is still that of its
  *original* index, so the parameters describe the usual contiguous groups ``(N, G)`` and no
  group-index table is needed; the first column of a group to be reached fixes its
  parameters. With ``clip=True`` each group's range is the best shrink of its min-max range for
  the group's own output error ``dW_g H_gg dW_g^T`` (``best_clip_qparams`` on the group's columns
  and Hessian block, evaluated on the current weights).

Result. ``layer.set_quantized(W^, qparams)`` with the dequantized ``W^`` (float32), so that
``quantize(W^, spec, qparams)`` gives back exactly the codes chosen here. Codebook mappings
(kmeans, log2, ...) are not supported: such layers keep round-to-nearest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..errors import ConfigError, DataError
from ..modules.base import QuantMixin
from ..quant.core import QParams, compute_qparams
from ..quant.spec import PerChannel, PerGroup, PerTensor, QuantSpec
from .base import Algorithm, register
from .clip_search import best_clip_qparams
from .stats import LayerStats


class GPTQResult(NamedTuple):
    """``weight``: dequantized ``W^ (N, K)`` float32; ``qparams`` of the spec's ``param_shape``;
    ``codes``: the integer codes chosen (float tensor of integers, ``(N, K)``)."""

    weight: Tensor
    qparams: QParams
    codes: Tensor


def inverse_hessian_factor(hessian: Tensor, damp: float, tries: int = 6) -> Tensor:
    """Upper Cholesky factor ``U`` of ``(H + lambda I)^-1 = U^T U`` (float32, computed in float64),
    ``lambda = damp * mean diag H``.

    Computed without forming the inverse: with ``J`` the order-reversing permutation and the
    lower factor ``J H J = L L^T``, ``H = R R^T`` for the upper ``R = J L J``, hence
    ``H^-1 = (R^-1)^T R^-1`` and ``U = R^-1 = J L^-1 J``: one Cholesky and one triangular solve
    (the reference's ``cholesky(cholesky_inverse(cholesky(H)), upper=True)``, same matrix). Memory:
    two ``K x K`` float64 buffers besides ``hessian`` (the factorisation and the solve run in place).
    """
    h = hessian.double()
    mean_diag = float(torch.diagonal(h).mean())
    lam = damp * mean_diag
    info = torch.zeros((), dtype=torch.int32, device=h.device)
    for _ in range(tries):
        work = h.flip(0, 1)
        work.diagonal().add_(lam)  # J (H + lambda I) J: J keeps the diagonal in place
        torch.linalg.cholesky_ex(work, out=(work, info))  # work <- L
        if int(info) == 0:
            inverse = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
            torch.linalg.solve_triangular(work, inverse, upper=False, out=inverse)  # inverse <- L^-1
            del work
            upper = inverse.float().flip(0, 1)
            if bool(torch.isfinite(upper).all()):
                return upper
        lam = max(10 * lam, 1e-6 * mean_diag)
    raise DataError(f"gptq: the input Hessian is not positive definite even with damping {lam:.3g}")


def _round_column(w: Tensor, scale: Tensor, zero: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """Codes and dequantized values of one column, with the core's exact arithmetic."""
    q = torch.clamp(torch.round(w / scale) + zero, spec.qmin, spec.qmax)
    return q, (q - zero) * scale


def gptq_quantize(
    weight: Tensor,
    hessian: Tensor,
    spec: QuantSpec,
    *,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    clip: bool = False,
) -> GPTQResult:
    """GPTQ of ``weight (N, ...)`` (flattened to ``(N, K)``) for ``hessian (K, K)`` (``H`` or any positive
    multiple of it, e.g. ``X^T X``) under a uniform ``spec`` (per-tensor, per-channel on axis 0, or
    per-group). See the module docstring."""
    if spec.mapping != "uniform":
        raise ConfigError(f"gptq supports the uniform mapping only, got {spec.mapping!r}")
    g = spec.granularity
    if not (isinstance(g, (PerTensor, PerGroup)) or (isinstance(g, PerChannel) and g.axis in (0, -weight.dim()))):
        raise ConfigError(f"gptq supports per-tensor, per-channel (axis 0) or per-group weights, got {g.describe()}")
    W = weight.detach().reshape(weight.shape[0], -1).float().clone()
    N, K = W.shape
    if hessian.shape != (K, K):
        raise DataError(f"gptq: Hessian of shape {tuple(hessian.shape)} does not match {K} weight columns")
    H = hessian.detach().to(W.device, torch.float64)
    if not torch.isfinite(H).all() or not torch.isfinite(W).all():
        raise DataError("gptq: the weight or its input statistics are not finite")

    dead = torch.diagonal(H) == 0
    if bool(dead.any()):  # columns never active: weight 0, H_ii = 1 (on a copy: the caller's H stays)
        dead_idx = dead.nonzero().squeeze(1)
        H = H.clone()
        H[dead_idx, dead_idx] = 1.0
        W[:, dead] = 0.0

    # Column order: identity, or decreasing H_ii. `perm[j]` is the original index of column j.
    if act_order:
        perm = torch.argsort(torch.diagonal(H), descending=True, stable=True)
        U = inverse_hessian_factor(H[perm[:, None], perm], damp)
    else:
        perm = torch.arange(K, device=W.device)
        U = inverse_hessian_factor(H, damp)
    inv_perm = torch.argsort(perm)
    Wp = W[:, perm]                                  # working copy, permuted columns

    # Parameters: fixed up front, or per group (filled when the loop first reaches the group).
    grouped = isinstance(g, PerGroup)
    if grouped:
        size = g.size
        n_groups = -(-K // size)
        scale = torch.ones(N, n_groups, device=W.device)
        zero = torch.zeros(N, n_groups, device=W.device)
        row_spec = replace(spec, granularity=PerChannel(0))
        group_of = (perm // size).tolist()           # group of each permuted column
        ready = [False] * n_groups
    else:
        qparams = best_clip_qparams(W, spec, H) if clip and isinstance(g, PerChannel) else compute_qparams(W, spec)
        col_scale = qparams.scale.to(W.device).reshape(-1).expand(N)
        col_zero = (torch.zeros_like(col_scale) if qparams.zero_point is None
                    else qparams.zero_point.to(W.device).float().reshape(-1).expand(N))

    Q = torch.zeros_like(Wp)                        # codes, permuted
    What = torch.zeros_like(Wp)                     # dequantized result, permuted
    for i1 in range(0, K, block_size):
        i2 = min(i1 + block_size, K)
        W1 = Wp[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            if grouped:
                gi = group_of[j]
                if not ready[gi]:
                    cols = torch.arange(gi * size, min(gi * size + size, K), device=W.device)
                    current = _current_columns(Wp, W1, Err1, U, i1, i, i2, inv_perm[cols])
                    if clip:
                        qp = best_clip_qparams(current, row_spec, H[cols][:, cols])
                    else:
                        qp = compute_qparams(current, row_spec)
                    scale[:, gi] = qp.scale
                    if qp.zero_point is not None:
                        zero[:, gi] = qp.zero_point.float()
                    ready[gi] = True
                s, z = scale[:, gi], zero[:, gi]
            else:
                s, z = col_scale, col_zero
            w = W1[:, i]
            q, w_hat = _round_column(w, s, z, spec)
            Q[:, j], What[:, j] = q, w_hat
            err = (w - w_hat) / U1[i, i]
            W1[:, i + 1:] -= err[:, None] * U1[i, i + 1:][None, :]
            Err1[:, i] = err
        Wp[:, i2:] -= Err1 @ U[i1:i2, i2:]

    if grouped:
        zero_point = None if spec.symmetric else zero.round().to(torch.int32)
        qparams = QParams(scale, zero_point)
    return GPTQResult(What[:, inv_perm], qparams, Q[:, inv_perm])


def _current_columns(Wp: Tensor, W1: Tensor, Err1: Tensor, U: Tensor, i1: int, i: int, i2: int, pos: Tensor) -> Tensor:
    """Current values of the not-yet-quantized permuted columns ``pos`` (all ``>= i1 + i``) while
    column ``i1 + i`` of the block ``[i1, i2)`` is next: block columns live in ``W1``; later ones
    still owe the block's updates so far, ``Err1[:, :i] U[i1:i1+i, pos]``."""
    out = Wp[:, pos]
    inside = pos < i2
    out[:, inside] = W1[:, pos[inside] - i1]
    if i and not bool(inside.all()):
        outside = ~inside
        out[:, outside] -= Err1[:, :i] @ U[i1:i1 + i][:, pos[outside]]
    return out


@register
@dataclass
class GPTQ(Algorithm):
    """GPTQ (see the module docstring). Options: ``damp`` (fraction of the mean Hessian diagonal
    added to it), ``block_size`` (lazy-batch width), ``act_order`` (columns by decreasing ``H_ii``),
    ``clip`` (output-aware range search for the grid parameters)."""

    name = "gptq"
    damp: float = 0.01
    block_size: int = 128
    act_order: bool = False
    clip: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.damp, bool) or not isinstance(self.damp, (int, float)) or not (
                math.isfinite(self.damp) and self.damp >= 0):
            raise ConfigError(f"gptq: damp must be a finite number >= 0, got {self.damp!r}")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size <= 0:
            raise ConfigError(f"gptq: block_size must be a positive integer, got {self.block_size!r}")
        for flag in ("act_order", "clip"):
            if not isinstance(getattr(self, flag), bool):
                raise ConfigError(f"gptq: {flag} must be true or false, got {getattr(self, flag)!r}")

    def applies_to(self, layer: QuantMixin) -> bool:
        spec = layer.weight_spec
        g = spec.granularity
        if spec.mapping != "uniform" or isinstance(layer, nn.Embedding):
            return False
        if getattr(layer, "groups", 1) != 1:
            return False  # grouped conv: the statistics describe the first group's inputs only
        if isinstance(g, PerChannel):
            return g.axis in (0, -layer.weight.dim())
        return isinstance(g, (PerTensor, PerGroup))

    def quantize_layer(self, layer: QuantMixin, stats: LayerStats | None) -> None:
        if stats is None or stats.count == 0:
            layer.calibrate_weight()  # never reached by the calibration data: keep round-to-nearest
            return
        result = gptq_quantize(layer.weight, stats.xtx, layer.weight_spec, damp=self.damp,
                               block_size=self.block_size, act_order=self.act_order, clip=self.clip)
        layer.set_quantized(result.weight, result.qparams)

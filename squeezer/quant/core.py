"""The quantizer core: choose parameters, quantize, dequantize, fake-quantize (STE).

Uniform:  ``q = clip(round(x / S) + Z, qmin, qmax)``,  ``x^ = (q - Z) * S``.
Codebook: ``q = argmin_l |x / s - levels_l|``,          ``x^ = s * levels[q]``
(ternary assigns by the threshold ``delta`` instead of the nearest level).

Parameters have the granularity's ``param_shape`` (see :mod:`squeezer.quant.blocks`).
Every algorithm in squeezer (RTN, observers, later GPTQ / AWQ / QAT) goes through here.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from . import levels as L
from .blocks import Blocks, from_blocks, to_blocks
from .spec import Granularity, PerChannel, PerGroup, PerTensor, QuantSpec

_TINY = 1e-12


@dataclass
class QParams:
    """Quantization parameters of one tensor.

    ``scale``: ``param_shape``; ``zero_point``: ``param_shape`` (uniform asymmetric) or None;
    ``levels``: ``(L,)`` shared or ``(B, L)`` per block (codebook mappings) or None.
    """

    scale: Tensor
    zero_point: Tensor | None = None
    levels: Tensor | None = None

    def to(self, device: torch.device | str) -> "QParams":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return QParams(move(self.scale), move(self.zero_point), move(self.levels))


@dataclass
class QTensor:
    """Integer codes plus what is needed to reconstruct the real tensor.

    ``codes`` has the original ``shape`` and the smallest integer dtype that holds the codes.
    """

    codes: Tensor
    qparams: QParams
    spec: QuantSpec

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return dequantize(self, dtype)

    def nbytes(self) -> int:
        """Storage when packed: ``bits`` per code plus fp32 scales, zero points and codebooks."""
        return packed_nbytes(self.spec, self.codes.numel(), self.qparams)


def code_dtype(spec: QuantSpec) -> torch.dtype:
    """Smallest torch integer dtype holding every code of ``spec``."""
    if spec.is_codebook:
        return torch.uint8 if spec.bits <= 8 else torch.int32
    lo, hi = spec.qmin, spec.qmax
    for dtype in (torch.int8, torch.uint8, torch.int16, torch.int32):
        info = torch.iinfo(dtype)
        if info.min <= lo and hi <= info.max:
            return dtype
    return torch.int32


def packed_nbytes(spec: QuantSpec, numel: int, qparams: QParams) -> int:
    """Bytes of the packed form: ``ceil(numel * bits / 8)`` + 4 bytes per scale / centroid
    + ``ceil(bits / 8)`` bytes per zero point."""
    total = -(-numel * spec.bits // 8) + 4 * qparams.scale.numel()
    if qparams.zero_point is not None:
        total += -(-spec.bits // 8) * qparams.zero_point.numel()
    if qparams.levels is not None and spec.mapping == "kmeans":
        total += 4 * qparams.levels.numel()
    return total


# ----------------------------------------------------------------------------- parameters
def uniform_qparams(lo: Tensor, hi: Tensor, spec: QuantSpec) -> QParams:
    """Scale and zero point from a range ``[lo, hi]`` (any shape, broadcast together).

    Symmetric: ``S = max(|lo|, |hi|) / qmax`` (unsigned: ``S = hi / qmax``), ``Z = 0``.
    Asymmetric: the range is widened to include 0 so that 0.0 is exact,
    ``S = (hi - lo) / (qmax - qmin)``, ``Z = clip(qmin - round(lo / S), qmin, qmax)``.
    """
    lo, hi = torch.broadcast_tensors(lo.float(), hi.float())
    if spec.symmetric:
        top = torch.maximum(lo.abs(), hi.abs()) if spec.signed else hi.clamp_min(0)
        return QParams((top / spec.qmax).clamp_min(_TINY))
    lo, hi = lo.clamp_max(0), hi.clamp_min(0)
    scale = ((hi - lo) / (spec.qmax - spec.qmin)).clamp_min(_TINY)
    zero = (spec.qmin - torch.round(lo / scale)).clamp(spec.qmin, spec.qmax)
    return QParams(scale, zero.to(torch.int32))


def _masked_absmean(b: Blocks, values: Tensor) -> Tensor:
    return values.abs().sum(dim=1) / b.count().clamp_min(1)


def _block_minmax(b: Blocks) -> tuple[Tensor, Tensor]:
    # Padding is 0 and every range includes 0 (asymmetric) or is |x|-based (symmetric): harmless.
    return b.data.amin(dim=1), b.data.amax(dim=1)


def _ternary_threshold(b: Blocks) -> Tensor:
    """TWN threshold ``delta = 0.7 * mean |x|`` per block, ``(B, 1)``."""
    return 0.7 * _masked_absmean(b, b.data)[:, None]


def _codebook_qparams(b: Blocks, spec: QuantSpec) -> QParams:
    data = b.data.float()
    absmax = data.abs().amax(dim=1).clamp_min(_TINY)
    if spec.mapping == "binary":
        return QParams(_masked_absmean(b, data).clamp_min(_TINY), levels=L.binary_levels())
    if spec.mapping == "ternary":
        big = data.abs() > _ternary_threshold(b)
        alpha = (data.abs() * big).sum(1) / big.sum(1).clamp_min(1)
        return QParams(torch.where(big.any(1), alpha, absmax), levels=L.ternary_levels())
    if spec.mapping == "log2":
        return QParams(absmax, levels=L.power_levels(spec.bits, 2.0))
    if spec.mapping == "exp":
        bases = [spec.base] if spec.base is not None else L.EXP_BASE_GRID.tolist()
        best, best_err = None, float("inf")
        for base in bases:
            cand = QParams(absmax, levels=L.power_levels(spec.bits, base))
            err = _block_error(b, spec, cand)
            if err < best_err:
                best, best_err = cand, err
        return best
    # kmeans: start from the asymmetric uniform grid of the block, then Lloyd.
    grid_spec = replace(spec, mapping="uniform", symmetric=False, signed=False)
    lo, hi = _block_minmax(b)
    u = uniform_qparams(lo, hi, grid_spec)
    q = torch.arange(grid_spec.qmin, grid_spec.qmax + 1, dtype=torch.float32)
    init = (q[None, :] - u.zero_point[:, None].float()) * u.scale[:, None]
    centroids = L.kmeans_levels(data, b.mask, init)
    return QParams(torch.ones_like(absmax), levels=centroids)


def _block_error(b: Blocks, spec: QuantSpec, qp: QParams) -> float:
    err = (_dequantize_blocks(_codebook_codes(b, spec, qp), spec, qp) - b.data) ** 2
    if b.mask is not None:
        err = err * b.mask
    return float(err.sum())


def compute_qparams(
    x: Tensor, spec: QuantSpec, lo: Tensor | None = None, hi: Tensor | None = None
) -> QParams:
    """Parameters for ``x`` under ``spec``; a uniform spec may be given an explicit range
    (from an observer or a clipping search) as ``lo`` / ``hi`` of ``param_shape``."""
    b = to_blocks(x.detach(), spec.granularity)
    if spec.mapping != "uniform":
        qp = _codebook_qparams(b, spec)
        return QParams(qp.scale.reshape(b.param_shape), None, qp.levels)
    if lo is None or hi is None:
        lo, hi = _block_minmax(b)
    qp = uniform_qparams(lo.reshape(-1), hi.reshape(-1), spec)
    zp = None if qp.zero_point is None else qp.zero_point.reshape(b.param_shape)
    return QParams(qp.scale.reshape(b.param_shape), zp)


# ----------------------------------------------------------------------------- quantize
SLICE = 1 << 18
"""Elements per slice of :func:`_uniform_codes`: its float temporary (1 MiB in fp32) stays in cache, and few slices
mean few thread pool rounds."""
_EXACT_IN_FLOAT32 = (torch.float32, torch.bfloat16, torch.float16)


def _uniform_codes(data: Tensor, spec: QuantSpec, qp: QParams, dtype: torch.dtype | None = None,
                   dequantize: bool = False) -> Tensor:
    """Codes ``q = clip(round(x / S) + Z, qmin, qmax)`` of blocks ``data (B, n)`` (``x = data.float()``, ``S``, ``Z``
    of ``B`` values), or with ``dequantize`` ``x^ = (q - Z) S``, as ``(B, n)`` in ``dtype`` (default: the float dtype
    ``x / S + Z`` computes in, ``D``; another dtype gets the values cast as ``.to(dtype)`` casts them).

    One pass: slice by slice (about :data:`SLICE` elements) each step runs in place on one ``D`` buffer (or on the
    output itself when it is ``D``), so no full-size float temporary is made; every step is the same elementwise op
    in the same dtype as ``torch.clamp(torch.round(x / S) + Z, qmin, qmax)``, so the codes are bit-identical to it.
    """
    scale = qp.scale.reshape(-1, 1).to(data.device)
    zero = None if qp.zero_point is None else qp.zero_point.reshape(-1, 1).to(data.device)
    work = torch.promote_types(torch.float32, scale.dtype)
    if zero is not None:
        work = torch.promote_types(work, zero.dtype)
    out = torch.empty(data.shape, dtype=dtype or work, device=data.device)
    blocks, n = data.shape
    cols = max(1, min(n, SLICE))
    rows = max(1, SLICE // cols)
    buffer = None if out.dtype == work else torch.empty(min(rows, blocks), cols, dtype=work, device=data.device)
    for r in range(0, blocks, rows):
        s = scale[r:r + rows]
        z = None if zero is None else zero[r:r + rows]
        for c in range(0, n, cols):
            part = data[r:r + rows, c:c + cols]
            # bf16 / fp16 -> fp32 is exact inside the division; other dtypes are rounded to fp32 first, as x.float()
            part = part if part.dtype in _EXACT_IN_FLOAT32 else part.float()
            target = out[r:r + rows, c:c + cols]
            t = target if buffer is None else buffer[: part.shape[0], : part.shape[1]]
            torch.div(part, s, out=t).round_()
            if z is not None:
                t.add_(z)
            t.clamp_(spec.qmin, spec.qmax)
            if dequantize:
                if z is not None:
                    t.sub_(z)
                t.mul_(s)
            if buffer is not None:
                target.copy_(t)  # the same cast as .to(dtype)
    return out


def _codebook_codes(b: Blocks, spec: QuantSpec, qp: QParams) -> Tensor:
    """Codes of fp32 blocks under a codebook mapping: the nearest level (ternary: by the threshold)."""
    if spec.mapping == "ternary":
        delta = _ternary_threshold(b)
        return torch.where(b.data.abs() > delta, torch.sign(b.data) + 1, torch.ones_like(b.data)).long()
    return L.nearest_code(b.data / qp.scale.reshape(-1, 1).to(b.data.device), qp.levels.to(b.data.device))


def _dequantize_blocks(codes: Tensor, spec: QuantSpec, qp: QParams) -> Tensor:
    scale = qp.scale.reshape(-1, 1).to(codes.device)
    if spec.mapping == "uniform":
        zero = 0 if qp.zero_point is None else qp.zero_point.reshape(-1, 1).to(codes.device)
        return (codes.float() - zero) * scale
    return L.lookup(codes.long(), qp.levels.to(codes.device)) * scale


def quantize(x: Tensor, spec: QuantSpec, qparams: QParams | None = None) -> QTensor:
    """Quantize ``x`` to integer codes; parameters are computed from ``x`` when not given."""
    qp = qparams if qparams is not None else compute_qparams(x, spec)
    if spec.mapping == "uniform":  # straight into the code dtype, from x's own dtype
        b = to_blocks(x.detach(), spec.granularity)
        codes = _uniform_codes(b.data, spec, qp, code_dtype(spec))
    else:
        b = to_blocks(x.detach().float(), spec.granularity)
        codes = _codebook_codes(b, spec, qp).to(code_dtype(spec))
    return QTensor(from_blocks(codes, x.shape, spec.granularity).contiguous(), qp, spec)


def dequantize(qt: QTensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Reconstruct the real tensor ``x^`` from a :class:`QTensor`."""
    b = to_blocks(qt.codes, qt.spec.granularity)
    values = _dequantize_blocks(b.data, qt.spec, qt.qparams)
    return from_blocks(values, qt.shape, qt.spec.granularity).to(dtype)


def rows_qparams(qp: QParams, granularity: Granularity, rows: Tensor) -> QParams | None:
    """Parameters of ``W[rows]`` for a 2-D ``W (N, K)`` and 1-D indices ``rows``, when each row's
    parameters are its own: per-tensor (shared), per-channel on axis 0 (``scale[rows]``) or
    per-group (``scale[rows, :]``, codebooks ``(N * G, L) -> (n * G, L)``); None for any other
    granularity. ``fake_quantize(W[rows], spec, rows_qparams(...)) == fake_quantize(W, spec, qp)[rows]``."""
    g = granularity
    if isinstance(g, PerTensor):
        return qp
    if not (isinstance(g, PerGroup) or (isinstance(g, PerChannel) and g.axis in (0, -2))):
        return None
    pick = lambda t: None if t is None else t[rows]  # noqa: E731
    levels = qp.levels
    if levels is not None and levels.dim() == 2:
        levels = levels.reshape(qp.scale.shape[0], -1, levels.shape[-1])[rows].reshape(-1, levels.shape[-1])
    return QParams(pick(qp.scale), pick(qp.zero_point), levels)


def representable_range(spec: QuantSpec, qp: QParams) -> tuple[Tensor, Tensor]:
    """Smallest and largest reconstructable value per block, each of ``param_shape``."""
    if spec.mapping == "uniform":
        zero = 0 if qp.zero_point is None else qp.zero_point.float()
        return (spec.qmin - zero) * qp.scale, (spec.qmax - zero) * qp.scale
    levels = qp.levels
    lo = levels[..., 0] if levels.dim() == 1 else levels[:, 0].reshape(qp.scale.shape)
    hi = levels[..., -1] if levels.dim() == 1 else levels[:, -1].reshape(qp.scale.shape)
    return lo * qp.scale, hi * qp.scale


class _FakeQuantize(torch.autograd.Function):
    """``x^`` forward; straight-through gradient ``dL/dx = dL/dx^ * [lo <= x <= hi]`` backward."""

    @staticmethod
    def forward(ctx, x: Tensor, x_hat: Tensor, inside: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(inside)
        return x_hat

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None


def fake_quantize(x: Tensor, spec: QuantSpec, qparams: QParams | None = None) -> Tensor:
    """``dequantize(quantize(x))`` in ``x``'s dtype, differentiable with the clipped STE."""
    qp = qparams if qparams is not None else compute_qparams(x, spec)
    if spec.mapping == "uniform":
        b = to_blocks(x.detach(), spec.granularity)
        x_hat_blocks = _uniform_codes(b.data, spec, qp, x.dtype, dequantize=True)
    else:
        b = to_blocks(x.detach().float(), spec.granularity)
        x_hat_blocks = _dequantize_blocks(_codebook_codes(b, spec, qp), spec, qp)
    x_hat = from_blocks(x_hat_blocks, x.shape, spec.granularity).to(x.dtype).contiguous()
    if not x.requires_grad:
        return x_hat
    lo, hi = representable_range(spec, qp)
    lo_b, hi_b = lo.reshape(-1, 1).to(x.device), hi.reshape(-1, 1).to(x.device)
    data = b.data.float()
    inside = from_blocks((data >= lo_b) & (data <= hi_b), x.shape, spec.granularity)
    return _FakeQuantize.apply(x, x_hat, inside.to(x.dtype))

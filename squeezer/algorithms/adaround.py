"""AdaRound: learned rounding (Nagel et al., "Up or Down? Adaptive Rounding for Post-Training
Quantization", ICML 2020).

Round-to-nearest rounds every weight on its own; what matters is the layer's output. With the grid
fixed first (min-max, or :func:`~squeezer.algorithms.clip_search.best_clip_qparams` with
``clip=True``), AdaRound chooses per weight whether to round down or up. Each weight gets a
continuous variable ``V`` and the rectified sigmoid ``h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1)``
(``zeta = 1.1``, ``gamma = -0.1``) in

    W_soft = S * (clamp(floor(W / S) + h(V) + Z, qmin, qmax) - Z)

and Adam minimises the layer-output error plus a regulariser that drives ``h`` to ``{0, 1}``:

    L(V) = tr(dW H dW^T) / c  +  lambda * sum(1 - |2 h(V) - 1|^beta),   dW = W - W_soft

with ``H = 2 X^T X / n`` over all calibration rows (``n / 2 * tr(dW H dW^T) = ||X W^T - X W_soft^T||^2``;
when every calibration row is kept in ``stats.sample`` and there are fewer rows than columns the
rows are used instead, which is cheaper). **Scaling**: ``c = mean_ij S_ij^2 H_jj`` is the error of a
one-step change of an average weight, so the reconstruction term is measured in "grid steps" and is
independent of the magnitude of the weights and inputs; ``lambda`` (default 0.01 as in the paper,
relative to that unit) then has the same meaning for every layer. ``beta`` is annealed linearly from
20 to 2 after a warm-up of 20 % of the iterations without regulariser (the paper's schedule).
``V`` starts where ``h(V)`` equals the fractional part of ``W / S``, i.e. at ``W_soft = W``.

At the end ``h`` is rounded to ``{0, 1}``. The output error of the result and of round-to-nearest
(on the same grid) are compared **per output row** (rows are independent in ``tr(dW H dW^T)``) and
the better row is kept, so the layer never ends worse than its round-to-nearest start on this
objective. The final weight handed to ``set_quantized`` is the dequantized result, so
``quantize(weight, spec, qparams)`` gives exactly the chosen codes.

Uniform mappings only (any granularity), Linear and Conv layers. For grouped convolutions the
statistics hold the first group's patches only (see :mod:`~squeezer.algorithms.stats`): the Hessian
of that group stands in for every group (the approximation GPTQ-style methods in squeezer share).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..modules.base import QuantMixin
from ..quant.blocks import expand_params, from_blocks, to_blocks
from ..quant.core import QParams, compute_qparams
from ..quant.spec import PerTensor, QuantSpec
from .base import Algorithm, register
from .clip_search import best_clip_qparams
from .stats import LayerStats

ZETA, GAMMA = 1.1, -0.1


def element_params(weight: Tensor, spec: QuantSpec, qp: QParams) -> tuple[Tensor, Tensor]:
    """Per-element scale and zero point of ``weight`` (its own shape) for a uniform spec."""
    b = to_blocks(weight, spec.granularity)
    count = b.data.shape[0]
    scale = expand_params(qp.scale.float(), count).expand_as(b.data)
    zero = (torch.zeros_like(scale) if qp.zero_point is None
            else expand_params(qp.zero_point.float(), count).expand_as(b.data))
    return (from_blocks(scale.contiguous(), weight.shape, spec.granularity),
            from_blocks(zero.contiguous(), weight.shape, spec.granularity))


def row_errors(dw: Tensor, hessian: Tensor) -> Tensor:
    """``e[r] = dW_r H dW_r^T`` (float64) for ``dw (N, K)``."""
    d = dw.to(hessian.dtype)
    return ((d @ hessian) * d).sum(1)


def provisional_act_qparams(layer: QuantMixin, stats: LayerStats | None) -> None:
    """Static activations: a min-max range of the sampled input so the layer can run in ``simulate``
    while later stages are calibrated (the pipeline's observer replaces it). Per-tensor specs only."""
    spec = layer.act_spec
    if (layer.act_observer is None or layer.act_qparams is not None or spec is None or stats is None
            or not stats.sample.numel() or not isinstance(spec.granularity, PerTensor)):
        return
    layer.act_qparams = compute_qparams(stats.sample, spec)


def rectified_sigmoid(v: Tensor) -> Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def init_v(frac: Tensor) -> Tensor:
    """``V`` with ``h(V) = frac`` for ``frac`` in ``[0, 1)``."""
    p = ((frac - GAMMA) / (ZETA - GAMMA)).clamp(1e-4, 1 - 1e-4)
    return torch.log(p / (1 - p))


def beta_at(step: int, iters: int, warmup: float, start: float, end: float) -> float | None:
    """``None`` during the warm-up, then linear decay from ``start`` to ``end``."""
    begin = warmup * iters
    if step < begin:
        return None
    rel = (step - begin) / max(iters - begin, 1)
    return end + (start - end) * max(0.0, 1.0 - rel)


def adaround_codes(
    w: Tensor, scale: Tensor, zero: Tensor, spec: QuantSpec, hessian: Tensor, rows: Tensor | None = None,
    iters: int = 500, lr: float = 1e-2, reg: float = 0.01, beta: tuple[float, float] = (20.0, 2.0),
    warmup: float = 0.2,
) -> Tensor:
    """Learned integer codes for ``w (N, K)`` on the fixed grid ``scale, zero (N, K)`` (see module doc).

    ``rows``: optional input rows ``(n, K)`` standing in for ``hessian`` in the optimisation (the
    objective is then ``2 / n ||rows dW^T||^2``, equal to ``tr(dW H dW^T)`` when rows are all the rows).
    Returns codes ``clamp(floor(w / S) + {0, 1} + Z, qmin, qmax)`` (float tensor of integers).
    """
    w = w.float()
    floor = torch.floor(w / scale)
    frac = w / scale - floor
    h32 = hessian.float()
    unit = float((scale.pow(2) * torch.diagonal(h32)[None, :]).mean())
    unit = unit if unit > 0 else 1.0
    if rows is not None:
        rows = rows.float() * (2.0 / max(rows.shape[0], 1)) ** 0.5
    v = init_v(frac).requires_grad_(True)
    opt = torch.optim.Adam([v], lr=lr)
    qmin, qmax = float(spec.qmin), float(spec.qmax)
    for step in range(iters):
        h = rectified_sigmoid(v)
        w_soft = scale * (torch.clamp(floor + h + zero, qmin, qmax) - zero)
        dw = w - w_soft
        if rows is None:
            rec = ((dw @ h32) * dw).sum()
        else:
            rec = (rows @ dw.T).pow(2).sum()
        loss = rec / unit
        b = beta_at(step, iters, warmup, *beta)
        if b is not None:
            loss = loss + reg * (1 - (2 * h - 1).abs().pow(b)).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        up = (rectified_sigmoid(v) >= 0.5).float()
    return torch.clamp(floor + up + zero, qmin, qmax)


def _use_rows(stats: LayerStats, k: int) -> Tensor | None:
    """The sampled rows when they are all the calibration rows and fewer than ``k`` (cheaper)."""
    n = stats.sample.shape[0]
    return stats.sample if 0 < n == stats.count and n < k else None


@register
@dataclass
class AdaRound(Algorithm):
    """Learned up / down rounding on a fixed grid (see module docstring).

    Options: ``iters`` (Adam steps), ``lr``, ``clip`` (grid from the output-aware clipping search
    instead of min-max), ``reg`` (lambda, in grid-step units).
    """

    name = "adaround"
    iters: int = 500
    lr: float = 1e-2
    clip: bool = False
    reg: float = 0.01

    def applies_to(self, layer: QuantMixin) -> bool:
        return layer.weight_spec.mapping == "uniform"

    def quantize_layer(self, layer: QuantMixin, stats: LayerStats | None) -> None:
        spec = layer.weight_spec
        weight = layer.weight.detach().float()
        if stats is None or stats.count == 0:
            layer.calibrate_weight()
            return
        w = weight.reshape(weight.shape[0], -1)
        hessian = stats.hessian()
        qp = best_clip_qparams(w, spec, hessian) if self.clip else compute_qparams(weight, spec)
        scale, zero = (t.reshape(w.shape) for t in element_params(weight, spec, qp))
        rtn = torch.clamp(torch.round(w / scale) + zero, spec.qmin, spec.qmax)
        with torch.enable_grad():
            learned = adaround_codes(w, scale, zero, spec, hessian, _use_rows(stats, w.shape[1]),
                                     iters=self.iters, lr=self.lr, reg=self.reg)
        deq = lambda q: (q - zero) * scale  # noqa: E731
        better = row_errors(w - deq(learned), hessian) < row_errors(w - deq(rtn), hessian)
        codes = torch.where(better[:, None], learned, rtn)
        layer.set_quantized(deq(codes).reshape(weight.shape), qp)
        provisional_act_qparams(layer, stats)

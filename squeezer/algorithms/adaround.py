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
independent of the magnitude of the weights and inputs, so one ``lambda`` fits every layer. The paper's
``lambda = 0.01`` belongs to its absolute output-MSE scale, where a grid step of a typical weight costs
far less than 1; in grid-step units 0.01 is too weak to drive ``h`` to ``{0, 1}`` (measured on a
correlated 64 x 128 layer at 3 bits: 0.81 x the RTN error with 0.01, 0.42 x with 1), so the default
is ``lambda = 1`` (results vary by a few % for 0.3 .. 10). ``beta`` is annealed linearly from
20 to 2 after a warm-up of 20 % of the iterations without regulariser (the paper's schedule).
``V`` starts where ``h(V)`` equals the fractional part of ``W / S``, i.e. at ``W_soft = W``.

At the end ``h`` is rounded to ``{0, 1}``. The output error of the result and of round-to-nearest
(on the same grid) are compared **per output row** (rows are independent in ``tr(dW H dW^T)``) and
the better row is kept, so the layer never ends worse than its round-to-nearest start on this
objective. The final weight handed to ``set_quantized`` is the dequantized result, so
``quantize(weight, spec, qparams)`` gives exactly the chosen codes.

Uniform mappings only (any granularity), Linear and Conv layers. Grouped convolutions keep
round-to-nearest, as in the clipping search and GPTQ: the statistics hold the first group's patches
only (see :mod:`~squeezer.algorithms.stats`), so the other groups' objective is unknown.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..modules.base import QuantMixin
from ..quant.blocks import expand_params, from_blocks, to_blocks
from ..quant.core import QParams, compute_qparams
from ..quant.spec import PerChannel, PerGroup, QuantSpec
from .base import Algorithm, register
from .clip_search import best_clip_qparams
from .stats import SAMPLE_ROWS, LayerStats

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


class RoundingProblem:
    """The AdaRound objective of ``w (N, K)`` on the fixed grid ``scale, zero (N, K)``.

    With ``base = floor(w / S) + Z``, a weight whose ``base`` lies in ``[qmin, qmax - 1]`` is *free*
    (``clamp`` never acts: its code is ``base + h``); any other is pinned at ``qmin`` / ``qmax`` whatever
    ``h`` is. So ``dW = W - W_soft = c - a * h`` with constants ``a = S [free]`` and ``c``, and the
    gradient of ``tr(dW H dW^T) / unit`` in ``h`` is ``-2 a (dW H) / unit``: one ``(N, K) x (K, K)``
    product per step (or two thin ones through the sampled ``rows``), computed by hand rather than
    by autograd (three times fewer matrix products and elementwise passes; :meth:`loss` is the
    autograd-able form used to check it).
    """

    def __init__(self, w: Tensor, scale: Tensor, zero: Tensor, spec: QuantSpec, hessian: Tensor,
                 rows: Tensor | None = None) -> None:
        w, scale, zero = w.float(), scale.float(), zero.float()
        self.floor = torch.floor(w / scale)
        self.frac = w / scale - self.floor
        self.zero, self.qmin, self.qmax = zero, spec.qmin, spec.qmax
        base = self.floor + zero
        free = (base >= spec.qmin) & (base <= spec.qmax - 1)
        pinned = torch.clamp(base, spec.qmin, spec.qmax)
        self.a = torch.where(free, scale, torch.zeros_like(scale))
        self.c = torch.where(free, scale * self.frac, w - scale * (pinned - zero))
        self.hessian = hessian.to(device=w.device, dtype=torch.float32)
        self.rows = None
        if rows is not None:
            self.rows = rows.to(device=w.device, dtype=torch.float32) * (2.0 / max(rows.shape[0], 1)) ** 0.5
        unit = float((scale.pow(2) * torch.diagonal(self.hessian)[None, :]).mean())
        self.unit = unit if unit > 0 and unit == unit else 1.0

    def _times_h(self, dw: Tensor) -> Tensor:
        return dw @ self.hessian if self.rows is None else (dw @ self.rows.T) @ self.rows

    def loss(self, v: Tensor, reg: float, beta: float | None) -> Tensor:
        """``tr(dW H dW^T) / unit + reg * sum(1 - |2h - 1|^beta)`` (no regulariser when ``beta`` is None)."""
        h = rectified_sigmoid(v)
        dw = self.c - self.a * h
        out = (self._times_h(dw) * dw).sum() / self.unit
        if beta is not None:
            out = out + reg * (1 - (2 * h - 1).abs().pow(beta)).sum()
        return out

    @torch.no_grad()
    def grad(self, v: Tensor, reg: float, beta: float | None) -> Tensor:
        """``d loss / d v`` by hand (see class docstring)."""
        sig = torch.sigmoid(v)
        raw = sig * (ZETA - GAMMA) + GAMMA
        h = raw.clamp(0.0, 1.0)
        gh = self._times_h(torch.addcmul(self.c, self.a, h, value=-1.0)).mul_(self.a).mul_(-2.0 / self.unit)
        if beta is not None:
            u = 2 * h - 1
            gh.add_(u.sign() * u.abs().pow(beta - 1), alpha=-2.0 * beta * reg)
        inside = (raw > 0) & (raw < 1)
        return gh.mul_(sig * (1 - sig)).mul_(inside).mul_(ZETA - GAMMA)

    def codes(self, up: Tensor) -> Tensor:
        """``clamp(floor(w / S) + up + Z, qmin, qmax)`` for ``up`` in ``{0, 1}``."""
        return torch.clamp(self.floor + up + self.zero, self.qmin, self.qmax)


def adaround_codes(
    w: Tensor, scale: Tensor, zero: Tensor, spec: QuantSpec, hessian: Tensor, rows: Tensor | None = None,
    iters: int = 500, lr: float = 3e-2, reg: float = 1.0, beta: tuple[float, float] = (20.0, 2.0),
    warmup: float = 0.2,
) -> Tensor:
    """Learned integer codes for ``w (N, K)`` on the fixed grid ``scale, zero (N, K)`` (see module doc).

    ``rows``: optional input rows ``(n, K)`` standing in for ``hessian`` in the optimisation (the
    objective is then ``2 / n ||rows dW^T||^2``, equal to ``tr(dW H dW^T)`` when rows are all the rows).
    Returns codes ``clamp(floor(w / S) + {0, 1} + Z, qmin, qmax)`` (float tensor of integers).
    """
    problem = RoundingProblem(w, scale, zero, spec, hessian, rows)
    with torch.no_grad():
        v = init_v(problem.frac)
        m1, m2 = torch.zeros_like(v), torch.zeros_like(v)
        b1, b2, eps = 0.9, 0.999, 1e-8
        for step in range(iters):  # Adam (Kingma & Ba), written out: no optimizer machinery per call
            g = problem.grad(v, reg, beta_at(step, iters, warmup, *beta))
            m1.lerp_(g, 1 - b1)
            m2.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (m2 / (1 - b2 ** (step + 1))).sqrt_().add_(eps)
            v.addcdiv_(m1, denom, value=-lr / (1 - b1 ** (step + 1)))
        return problem.codes((rectified_sigmoid(v) >= 0.5).float())


def _use_rows(stats: LayerStats, k: int) -> Tensor | None:
    """The sampled rows when they are all the calibration rows and fewer than ``k`` (cheaper)."""
    n = stats.sample.shape[0]
    return stats.sample if 0 < n == stats.count and n < k else None


@register
@dataclass
class AdaRound(Algorithm):
    """Learned up / down rounding on a fixed grid (see module docstring).

    Options: ``iters`` (Adam steps), ``lr``, ``clip`` (grid from the output-aware clipping search
    instead of min-max; per-group and per-output-channel specs), ``reg`` (lambda, in grid-step units).
    """

    name = "adaround"
    sample_rows = SAMPLE_ROWS  # searches on the sampled rows
    iters: int = 500
    lr: float = 3e-2
    clip: bool = False
    reg: float = 1.0

    def applies_to(self, layer: QuantMixin) -> bool:
        grouped_conv = getattr(layer, "groups", 1) > 1  # statistics cover the first group's inputs only
        return layer.weight_spec.mapping == "uniform" and not grouped_conv

    def quantize_layer(self, layer: QuantMixin, stats: LayerStats | None) -> None:
        spec = layer.weight_spec
        weight = layer.weight.detach().float()
        if stats is None or stats.count == 0:
            layer.calibrate_weight()
            return
        w = weight.reshape(weight.shape[0], -1)
        hessian = stats.hessian().to(weight.device)
        g = spec.granularity
        searchable = isinstance(g, PerGroup) or (isinstance(g, PerChannel) and g.axis == 0)
        qp = best_clip_qparams(w, spec, hessian) if self.clip and searchable else compute_qparams(weight, spec)
        scale, zero = (t.reshape(w.shape) for t in element_params(weight, spec, qp))
        rtn = torch.clamp(torch.round(w / scale) + zero, spec.qmin, spec.qmax)
        learned = adaround_codes(w, scale, zero, spec, hessian, _use_rows(stats, w.shape[1]),
                                 iters=self.iters, lr=self.lr, reg=self.reg)
        deq = lambda q: (q - zero) * scale  # noqa: E731
        better = row_errors(w - deq(learned), hessian) < row_errors(w - deq(rtn), hessian)
        codes = torch.where(better[:, None], learned, rtn)
        layer.set_quantized(deq(codes).reshape(weight.shape), qp)

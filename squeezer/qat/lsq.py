"""Learned step size quantization (LSQ; Esser et al., "Learned Step Size Quantization", ICLR 2020).

For a uniform spec with integer range ``[qmin, qmax]``, a fixed zero point ``Z`` and a trainable
step size ``s`` (one per block of the granularity), with ``v = x / s``:

    ``x^ = (clip(round(v) + Z, qmin, qmax) - Z) * s``

Backward (straight-through estimator for ``round``):

* ``dx^/dx = 1`` inside the grid (``qmin <= round(v) + Z <= qmax``), 0 outside;
* ``dx^/ds = round(v) - v`` inside, ``qmin - Z`` below, ``qmax - Z`` above;

and the gradient of ``s`` is multiplied by ``g = 1 / sqrt(N * qmax)``, where ``N`` is the number of
elements that share one step size (weights: the block; activations: its elements per sample, the
paper's number of features ``N_F``) so that step sizes and weights learn at comparable rates.

Parameterisation: ``s = s0 * r`` with ``s0`` the initial (calibrated) step size, a buffer, and
``r`` the trainable ``rel_scale`` (initially 1). The gradient reaching ``r`` is multiplied by
``g / s0^2``, so plain SGD on ``r`` moves ``s`` exactly as LSQ's SGD on ``s`` would
(``ds = s0 dr = -lr g dL/ds``), while Adam -- invariant to gradient scale, steps of about ``lr`` --
changes each step size by a fraction ``~lr`` of its own size instead of by ``lr`` in absolute
terms (which would swamp an 8-bit step of ``~max|w| / 127``).

Both gradient rules are implemented with detach tricks whose forward values are exact,
``round_ste(v) = round(v) + (v - v.detach())`` and ``scale_grad(x, c) = x + (c x - (c x).detach())``,
so the forward equals :func:`squeezer.quant.core.fake_quantize` with the same parameters bit for bit.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..quant.blocks import from_blocks, to_blocks
from ..quant.core import QParams
from ..quant.spec import QuantSpec

_TINY = 1e-12


def round_ste(x: Tensor) -> Tensor:
    """``round(x)`` forward, identity gradient."""
    return torch.round(x).detach() + (x - x.detach())


def scale_grad(x: Tensor, g: Tensor | float) -> Tensor:
    """``x`` forward, gradient multiplied by ``g`` (a number or a tensor broadcast with ``x``)."""
    scaled = x * g
    return x.detach() + (scaled - scaled.detach())


class LearnedScaleQuantizer(nn.Module):
    """LSQ fake quantizer of one tensor: step sizes ``scale = init_scale * rel_scale`` of the spec's
    ``param_shape`` with ``rel_scale`` an ``nn.Parameter``; the zero point (asymmetric specs) is a
    fixed buffer.

    ``per_sample``: the input's first axis is a batch (activations), so ``N`` counts the
    elements of one sample only.
    """

    def __init__(self, spec: QuantSpec, qparams: QParams, per_sample: bool = False) -> None:
        super().__init__()
        if spec.mapping != "uniform":
            raise ConfigError(f"learned step sizes need a uniform mapping, got mapping={spec.mapping!r}")
        self.spec = spec
        self.per_sample = per_sample
        init = qparams.scale.detach().float().clamp_min(_TINY).clone()
        self.register_buffer("init_scale", init)
        self.rel_scale = nn.Parameter(torch.ones_like(init))
        zero = None if qparams.zero_point is None else qparams.zero_point.detach().clone()
        self.register_buffer("zero_point", zero)

    @property
    def scale(self) -> Tensor:
        """The current step sizes ``s = init_scale * rel_scale`` (at least ``1e-12``)."""
        return (self.init_scale * self.rel_scale).clamp_min(_TINY)

    def grad_scale(self, x: Tensor, block_size: int) -> float:
        """``g = 1 / sqrt(N * qmax)``, ``N`` = elements per step size (per sample for activations)."""
        n = block_size // x.shape[0] if self.per_sample and x.dim() > 1 else block_size
        return 1.0 / math.sqrt(max(n, 1) * self.spec.qmax)

    def forward(self, x: Tensor) -> Tensor:
        b = to_blocks(x.float(), self.spec.granularity)
        g = self.grad_scale(x, b.data.numel() // b.data.shape[0]) / self.init_scale**2
        s = (self.init_scale * scale_grad(self.rel_scale, g)).clamp_min(_TINY).reshape(-1, 1)
        zero = 0 if self.zero_point is None else self.zero_point.reshape(-1, 1).to(x.device).float()
        codes = torch.clamp(round_ste(b.data / s) + zero, self.spec.qmin, self.spec.qmax)
        return from_blocks((codes - zero) * s, x.shape, self.spec.granularity).to(x.dtype)

    def qparams(self) -> QParams:
        """The current step sizes as fixed :class:`QParams` (what ``convert`` installs)."""
        zero = None if self.zero_point is None else self.zero_point.clone()
        return QParams(self.scale.detach().clone(), zero)

    def extra_repr(self) -> str:
        return f"{self.spec.describe()}, scales={tuple(self.init_scale.shape)}"

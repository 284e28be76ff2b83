"""Low-rank factorisation of Linear and conv layers by truncated SVD.

A weight viewed as a matrix ``W`` of shape ``(N, K)`` (a Linear's ``(out, in)``; a conv's
``(out, in * prod(kernel))``) has the SVD ``W = U S V^T`` with ``s_1 >= s_2 >= ...``. Its best
rank-``r`` approximation in the Frobenius norm is ``W_r = U_r S_r V_r^T`` (Eckart-Young), with
relative error ``||W - W_r||_F / ||W||_F = sqrt(sum_{i>r} s_i^2 / sum_i s_i^2)``.

``W_r = B A`` with ``A = S_r^{1/2} V_r^T`` (``r x K``) and ``B = U_r S_r^{1/2}`` (``N x r``):

* Linear ``K -> N`` becomes ``Linear(K, r, bias=False)`` (weight ``A``) then ``Linear(r, N)``
  (weight ``B``, the original bias);
* a conv becomes the same conv with ``r`` output channels (weight ``A`` reshaped to
  ``(r, in, *kernel)``, same stride / padding / dilation, no bias) then a 1x1 conv ``r -> out``
  (weight ``B``, the original bias): a conv is linear in its weight, so the pair computes
  exactly the conv with weight ``W_r``.

Weights go from ``N K`` to ``r (N + K)``; a layer where ``r (N + K) >= N K`` is left alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..transform import attach_report, working_copy
from ..prune.report import SkippedLayer, count_params
from ..prune.select import LAYER_CLASSES, select_layers


@dataclass
class LowRankLayer:
    name: str
    kind: str
    rank: int
    full_rank: int
    params_before: int
    params_after: int
    rel_error: float


@dataclass
class LowRankReport:
    layers: list[LowRankLayer] = field(default_factory=list)
    skipped: list[SkippedLayer] = field(default_factory=list)
    model_params_before: int = 0
    model_params_after: int = 0

    @property
    def compression(self) -> float:
        """``model_params_before / model_params_after``."""
        return self.model_params_before / max(self.model_params_after, 1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "summary": {
                "factorized_layers": len(self.layers),
                "skipped_layers": len(self.skipped),
                "model_params_before": self.model_params_before,
                "model_params_after": self.model_params_after,
                "compression": self.compression,
            },
            "layers": [asdict(layer) for layer in self.layers],
            "skipped": [asdict(s) for s in self.skipped],
        }


def _fraction(value: float, argument: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise ConfigError(f"{argument} must be a number in (0, 1], got {value!r}")
    return float(value)


def rank_for_energy(sigma: Tensor, energy: float) -> int:
    """Smallest ``r`` with ``sum_{i<=r} s_i^2 >= energy * sum_i s_i^2`` (``sigma`` descending);
    a relative tolerance of 1e-12 absorbs rounding, so ``energy = 1`` gives the full rank."""
    energy = _fraction(energy, "energy")
    power = sigma.double() ** 2
    cumulative = power.cumsum(0)
    short = int((cumulative < energy * float(power.sum()) * (1 - 1e-12)).sum())
    return min(short + 1, sigma.numel())


def rank_for_budget(n: int, k: int, budget: float, bias: int = 0) -> int:
    """Largest ``r`` with ``r (n + k) + bias <= budget * (n k + bias)``: the factorised layer keeps
    at most ``budget`` of the layer's parameters (0 when not even rank 1 fits)."""
    budget = _fraction(budget, "budget")
    return max(math.floor((budget * (n * k + bias) - bias) / (n + k) + 1e-9), 0)


SVD = tuple[Tensor, Tensor, Tensor]


def weight_svd(weight: Tensor) -> SVD:
    """``U, s, V^T`` of ``weight.flatten(1)`` in float64 (thin SVD, ``s`` descending)."""
    return torch.linalg.svd(weight.detach().flatten(1).double(), full_matrices=False)


def factorize_linear(layer: nn.Linear, rank: int, svd: SVD | None = None) -> nn.Sequential:
    """``Sequential(Linear(K, rank, bias=False), Linear(rank, N))`` computing ``x W_r^T + b``
    (``svd``: :func:`weight_svd` of the layer's weight, when already computed)."""
    a, b = _factors(layer.weight, rank, svd)
    kw = {"device": layer.weight.device, "dtype": layer.weight.dtype}
    first = nn.Linear(layer.in_features, rank, bias=False, **kw)
    second = nn.Linear(rank, layer.out_features, bias=layer.bias is not None, **kw)
    return _assemble(layer, first, second, a, b)


def factorize_conv(layer: nn.Conv1d | nn.Conv2d, rank: int, svd: SVD | None = None) -> nn.Sequential:
    """``Sequential(conv(in -> rank, same kernel / stride / padding / dilation), 1x1 conv(rank -> out))``
    computing the conv with weight ``W_r``. Grouped convolutions raise :class:`ConfigError`."""
    if layer.groups != 1:
        raise ConfigError(f"cannot factorise a grouped convolution (groups={layer.groups})")
    a, b = _factors(layer.weight, rank, svd)
    kw = {"device": layer.weight.device, "dtype": layer.weight.dtype}
    conv = type(layer)
    first = conv(layer.in_channels, rank, layer.kernel_size, stride=layer.stride, padding=layer.padding,
                 dilation=layer.dilation, bias=False, padding_mode=layer.padding_mode, **kw)
    second = conv(rank, layer.out_channels, 1, bias=layer.bias is not None, **kw)
    return _assemble(layer, first, second, a.reshape(first.weight.shape), b.reshape(second.weight.shape))


def _factors(weight: Tensor, rank: int, svd: SVD | None) -> tuple[Tensor, Tensor]:
    """``A = S_r^{1/2} V_r^T`` and ``B = U_r S_r^{1/2}``."""
    full = min(weight.shape[0], weight[0].numel())
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= full:
        raise ConfigError(f"rank must be an integer in [1, {full}], got {rank!r}")
    u, s, vh = weight_svd(weight) if svd is None else svd
    root = s[:rank].sqrt()
    return root[:, None] * vh[:rank], u[:, :rank] * root


def _assemble(layer: nn.Module, first: nn.Module, second: nn.Module, a: Tensor, b: Tensor) -> nn.Sequential:
    with torch.no_grad():
        first.weight.copy_(a)
        second.weight.copy_(b)
        if layer.bias is not None:
            second.bias.copy_(layer.bias)
    return nn.Sequential(first, second).train(layer.training)


def low_rank(
    model: nn.Module,
    *,
    energy: float | None = None,
    budget: float | None = None,
    layer_types: str | Sequence[str] = tuple(LAYER_CLASSES),
    include: str | Sequence[str] = (),
    ignore: str | Sequence[str] = (),
    min_params: int = 0,
    inplace: bool = False,
) -> nn.Module:
    """Replace the selected layers by their rank-``r`` factorisations.

    The rank comes from exactly one of ``energy`` (:func:`rank_for_energy`) and ``budget``
    (:func:`rank_for_budget`, a fraction of each layer's parameters). Layers with fewer than
    ``min_params`` weights, grouped convolutions, and layers whose factorisation would not have
    fewer weights (``r (N + K) >= N K``) are left alone and listed in ``report.skipped``.
    """
    model = working_copy(model, inplace)
    if (energy is None) == (budget is None):
        raise ConfigError("give exactly one of energy (kept fraction of sum s_i^2) and budget (kept fraction of params)")
    _fraction(energy if budget is None else budget, "energy" if budget is None else "budget")
    layers, skipped = select_layers(model, layer_types, include, ignore, min_params)
    report = LowRankReport(skipped=skipped, model_params_before=count_params(model))
    for name, layer in layers.items():
        params = count_params(layer)
        if getattr(layer, "groups", 1) != 1:
            skipped.append(SkippedLayer(name, type(layer).__name__, params, "grouped convolution"))
            continue
        svd = weight_svd(layer.weight)
        sigma = svd[1]
        n, k = svd[0].shape[0], svd[2].shape[1]
        bias = 0 if layer.bias is None else layer.bias.numel()
        rank = rank_for_energy(sigma, energy) if budget is None else rank_for_budget(n, k, budget, bias)
        if rank < 1 or rank * (n + k) >= n * k:
            why = "budget leaves no rank >= 1" if rank < 1 else f"rank {rank} needs {rank * (n + k)} >= {n * k} weights"
            skipped.append(SkippedLayer(name, type(layer).__name__, params, f"no saving: {why}"))
            continue
        factorize = factorize_linear if isinstance(layer, nn.Linear) else factorize_conv
        pair = factorize(layer, rank, svd)
        _set_child(model, name, pair)
        power = sigma**2
        error = math.sqrt(float(power[rank:].sum() / power.sum())) if float(power.sum()) > 0 else 0.0
        report.layers.append(LowRankLayer(name, type(layer).__name__, rank, min(n, k), params, count_params(pair), error))
    report.model_params_after = count_params(model)
    return attach_report(model, report)


def _set_child(model: nn.Module, name: str, child: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, child)

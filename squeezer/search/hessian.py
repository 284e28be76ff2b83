"""Hessian-trace sensitivity proxy (HAWQ-v2, Dong et al. 2020), estimated by Hutchinson's method.

Loss: ``L(W) = 1/(2N) sum ||f(x; W) - f(x; W0)||^2`` over the calibration outputs (``N`` elements).
At ``W0`` its Hessian is the Gauss-Newton matrix ``J^T J / N``; Hutchinson's estimator gives
``tr(H_l) ~ mean_v v^T H_l v`` with Rademacher ``v`` (``Hv`` by double back-propagation). The score of
layer ``l`` in format ``f`` is ``tr(H_l) / n_l * ||Q_f(W_l) - W_l||^2``: the expected loss increase
``1/2 d^T H d`` of a quantization error ``d`` spread evenly over the ``n_l`` weights (up to the 1/2).
A unit is a layer (its ``weight``) or one weight matrix of a recurrent layer, ``<layer>.<matrix>``
(``lstm.weight_hh_l0``): the matrix, differentiated through the whole recurrence.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..calibration import Batch, call_model, output_tensors
from ..errors import ConfigError
from ..quant.core import fake_quantize
from .formats import FLOAT, format_config


def unit_weight(model: nn.Module, name: str) -> nn.Parameter:
    """The weight of unit ``name``: the layer ``name``'s ``weight``, or the weight parameter ``name`` itself (a
    recurrent matrix, ``lstm.weight_hh_l0``); :class:`ConfigError` naming it when it is neither."""
    modules = dict(model.named_modules())
    if name in modules:
        weight = getattr(modules[name], "weight", None)
    else:
        weight = dict(model.named_parameters()).get(name) if name.rpartition(".")[2].startswith("weight") else None
    if not isinstance(weight, nn.Parameter):
        raise ConfigError(f"Hessian sensitivity: {name!r} is neither a layer with a weight nor a weight matrix "
                          "of the model")
    return weight


def hessian_traces(model: nn.Module, batches: list[Batch], names: list[str], samples: int = 8,
                   seed: int = 0) -> dict[str, float]:
    """``tr(H_l)`` per unit ``l`` of ``names`` (:func:`unit_weight`), averaged over ``samples`` draws."""
    weights = [unit_weight(model, n) for n in names]
    saved = [w.requires_grad for w in weights]
    gen = torch.Generator().manual_seed(seed)
    traces = torch.zeros(len(names), dtype=torch.float64)
    try:
        for w in weights:
            w.requires_grad_(True)
        for batch in batches:
            with torch.no_grad():
                targets = [t.detach() for t in output_tensors(call_model(model, batch))]
            outs = output_tensors(call_model(model, batch))
            n = sum(t.numel() for t in targets)
            loss = sum(((o - t) ** 2).sum() for o, t in zip(outs, targets)) / (2 * n)
            grads = torch.autograd.grad(loss, weights, create_graph=True)
            for _ in range(samples):
                vs = [torch.randint(0, 2, w.shape, generator=gen).to(w.dtype) * 2 - 1 for w in weights]
                hv = torch.autograd.grad(grads, weights, grad_outputs=vs, retain_graph=True)
                traces += torch.tensor([float((h * v).sum()) for h, v in zip(hv, vs)], dtype=torch.float64)
    finally:
        for w, s in zip(weights, saved):
            w.requires_grad_(s)
    return {n: float(t) / (samples * len(batches)) for n, t in zip(names, traces)}


def hessian_sensitivity(model: nn.Module, batches: list[Batch], names: list[str],
                        formats: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """``{unit: {format: tr(H_l) / n_l * ||Q_f(W_l) - W_l||^2}}`` (round-to-nearest ``Q_f``)."""
    traces = hessian_traces(model, batches, names)
    out: dict[str, dict[str, float]] = {}
    for n in names:
        w: Tensor = unit_weight(model, n).detach().float()
        out[n] = {}
        for f in formats:
            cfg = format_config(f)
            err = 0.0 if cfg is None else float((fake_quantize(w, cfg.weight) - w).pow(2).sum())
            out[n][f] = traces[n] / w.numel() * err if f != FLOAT else 0.0
    return out

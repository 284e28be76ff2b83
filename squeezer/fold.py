"""Batch-norm folding: an eval-mode ``BatchNorm`` that reads only a convolution's output is folded into that
convolution before quantization, as TFLite, ONNX Runtime and AIMET do.

With the norm's gain ``g = gamma / sqrt(var + eps)`` (per output channel ``c``),

    W'_c = g_c W_c,        b'_c = g_c (b_c - mean_c) + beta_c

so ``conv'(x) = bn(conv(x))``, and the norm is replaced by :class:`FoldedNorm` (an ``nn.Identity`` naming the
convolution it went into): its entries leave the state dict, the convolution gains a ``bias`` when it had none,
and a checkpoint records the pairs so that loading folds the freshly built float model the same way
(:func:`refold`).

Folding matters for deployed int8 graphs, whose every convolution output is put on an int8 grid: unfolded, that
grid sits before the norm and a channel with a near-zero variance (gains of 50 in pretrained nets) multiplies its
rounding error by ``g``; folded, the grid is on the normalised output. Per-channel weight grids are unchanged
by the fold (each channel's grid scales with ``g_c``).

Pairs are found on a ``torch.fx`` trace in which every convolution and norm is a leaf: a ``Conv1d / 2d / 3d``
(not transposed; subclasses too) whose output has the norm as its only user. A subclass with its own
``forward`` is folded only when the folded layer reproduces ``bn(conv(x))`` on a random probe input (its forward
need not be linear in the weight); a model that ``torch.fx`` cannot trace is left as it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .errors import ModelError
from .modules.swap import set_child

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_PROBE_TOLERANCE = 1e-4  # relative: the fold's float rounding is ~1e-7


@dataclass
class FoldReport:
    """Which norms were folded into which convolution (``folded``: ``(conv, norm)`` names), which pairs were
    left (``left``: ``(conv, norm, why)``), and why nothing was looked at (``untraced``: the trace's error)."""

    folded: list[tuple[str, str]] = field(default_factory=list)
    left: list[tuple[str, str, str]] = field(default_factory=list)
    untraced: str | None = None


class _LeafTracer(torch.fx.Tracer):
    """Keeps every convolution and batch norm (subclasses included) as one call_module node."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (*_CONVS, _BatchNorm)) or super().is_leaf_module(m, qualname)


def conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """``(conv, norm)`` module names where the norm is the only user of the convolution's output (fx trace;
    raises what ``torch.fx`` raises on an untraceable model)."""
    graph = _LeafTracer().trace(model)
    modules = dict(model.named_modules())
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), _CONVS):
            continue
        users = list(node.users)
        if len(users) == 1 and users[0].op == "call_module" and isinstance(modules.get(users[0].target), _BatchNorm):
            if users[0].args[0] is node:
                pairs.append((node.target, users[0].target))
    return pairs


def _foldable(conv: nn.Module, bn: _BatchNorm) -> str | None:
    """Why ``bn`` cannot be folded into ``conv``, else None."""
    if bn.training or bn.running_mean is None or bn.running_var is None:
        return "the norm uses batch statistics (training mode or track_running_stats=False)"
    if bn.num_features != conv.out_channels:
        return f"{bn.num_features} norm features for {conv.out_channels} output channels"
    return None


def _probe(conv: nn.Module) -> torch.Tensor:
    """A random input of ``conv``: one sample, each spatial size ``2 (k - 1) d + 9``."""
    sizes = [2 * (k - 1) * d + 9 for k, d in zip(conv.kernel_size, conv.dilation)]
    gen = torch.Generator().manual_seed(0)
    return torch.randn(1, conv.in_channels, *sizes, generator=gen).to(conv.weight)


class FoldedNorm(nn.Identity):
    """The identity that stands where a batch norm was folded into the convolution ``conv`` (a module name)."""

    def __init__(self, conv: str) -> None:
        super().__init__()
        self.conv = conv

    def extra_repr(self) -> str:
        return f"conv={self.conv!r}"


def folded_norms(model: nn.Module) -> dict[str, str]:
    """``{norm: conv}``: each :class:`FoldedNorm` of ``model`` and the convolution its norm was folded into."""
    return {name: m.conv for name, m in model.named_modules() if isinstance(m, FoldedNorm)}


def fold_pair(conv: nn.Module, bn: _BatchNorm) -> None:
    """``W <- g W``, ``b <- g (b - mean) + beta`` in place on ``conv`` (float64 arithmetic); ``bn`` is unchanged."""
    with torch.no_grad():
        gain = bn.weight.double() if bn.affine else torch.ones_like(bn.running_var, dtype=torch.float64)
        gain = gain / (bn.running_var.double() + bn.eps).sqrt()
        shift = bn.bias.double() if bn.affine else torch.zeros_like(gain)
        bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(gain)
        view = (-1,) + (1,) * (conv.weight.dim() - 1)
        conv.weight.copy_((conv.weight.double() * gain.view(view)).to(conv.weight.dtype))
        new_bias = (gain * (bias - bn.running_mean.double()) + shift).to(conv.weight.dtype)
        if conv.bias is None:
            conv.bias = nn.Parameter(new_bias)
        else:
            conv.bias.copy_(new_bias)


def _own_forward(conv: nn.Module) -> bool:
    """Whether ``type(conv)`` redefines the torch convolution's ``forward`` / ``_conv_forward``."""
    torch_class = next(c for c in type(conv).__mro__ if c in _CONVS)
    return any(getattr(type(conv), m) is not getattr(torch_class, m) for m in ("forward", "_conv_forward"))


def _fold_checked(conv: nn.Module, bn: _BatchNorm) -> str | None:
    """Fold into ``conv``; for a subclass with its own forward, check ``conv'(x) = bn(conv(x))`` on a probe and
    undo a mismatch. Returns why the pair was left, else None."""
    if not _own_forward(conv):
        fold_pair(conv, bn)
        return None
    saved_conv = {k: v.detach().clone() for k, v in conv.state_dict().items()}
    had_bias = conv.bias is not None
    try:
        with torch.no_grad():
            x = _probe(conv)
            expected = bn(conv(x))
            fold_pair(conv, bn)
            got = conv(x)
        error = ((got - expected).norm() / expected.norm().clamp_min(1e-12)).item()
        why = f"its own forward is not linear in the weight (probe error {error:.2g})"
    except Exception as exc:  # noqa: BLE001 - a forward we cannot probe: leave the pair as it was
        error, why = float("inf"), f"its own forward failed on a probe input ({type(exc).__name__})"
    if error <= _PROBE_TOLERANCE:
        return None
    if not had_bias:
        conv.bias = None
    conv.load_state_dict(saved_conv)
    return why


def fold_batchnorm(model: nn.Module) -> FoldReport:
    """Fold every foldable eval-mode norm of ``model`` into its convolution, each norm replaced by a
    :class:`FoldedNorm`, in place (see module docstring)."""
    report = FoldReport()
    try:
        pairs = conv_bn_pairs(model)
    except Exception as exc:  # noqa: BLE001 - torch.fx raises many types on dynamic code
        report.untraced = f"{type(exc).__name__}: {str(exc)[:200]}"
        return report
    modules = dict(model.named_modules())
    for conv_name, bn_name in pairs:
        conv, bn = modules[conv_name], modules[bn_name]
        why = _foldable(conv, bn) or _fold_checked(conv, bn)
        if why is None:
            set_child(model, bn_name, FoldedNorm(conv_name))
            report.folded.append((conv_name, bn_name))
        else:
            report.left.append((conv_name, bn_name, why))
    return report


def refold(model: nn.Module, norms: dict[str, str]) -> None:
    """The structure :func:`fold_batchnorm` gave a model, in place on a fresh float ``model``: each norm of
    ``norms`` (``{norm: conv}``, :func:`folded_norms`) replaced by a :class:`FoldedNorm`, its convolution given a
    zero ``bias`` when it has none (the folded values are loaded afterwards, e.g. from a checkpoint). A name that
    is not a batch norm / convolution of ``model`` is a :class:`ModelError`, raised before ``model`` changes."""
    for norm_name, conv_name in norms.items():
        for name, kind, what in ((norm_name, _BatchNorm, "batch norm"), (conv_name, _CONVS, "convolution")):
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise ModelError(f"folded norm {norm_name!r} into {conv_name!r}: the model has no module "
                                 f"{name!r}") from None
            if not isinstance(module, kind):
                raise ModelError(f"folded norm {norm_name!r} into {conv_name!r}: module {name!r} of the model is "
                                 f"{type(module).__name__}, not a {what}")
    for norm_name, conv_name in norms.items():
        conv = model.get_submodule(conv_name)
        if conv.bias is None:
            conv.bias = nn.Parameter(torch.zeros(conv.out_channels, dtype=conv.weight.dtype, device=conv.weight.device))
        set_child(model, norm_name, FoldedNorm(conv_name))

"""Channel dependencies found by tracing: which modules must shrink with a layer's outputs.

``torch.fx.symbolic_trace`` turns ``forward`` into a graph. From a producer (``nn.Linear`` or an
ungrouped ``nn.Conv1d`` / ``nn.Conv2d`` called once) the walk follows every use of its output
and tracks where the channels sit: ``"last"`` (a Linear's output, features on the last axis),
``"dim1"`` (a conv's output, ``(N, C, *spatial)``) or ``"flat"`` (a conv output after
``flatten(1)``: channel ``c`` owns positions ``c*S .. c*S + S - 1`` with ``S = prod(spatial)``).

* passed through: elementwise activations, dropout, identity, arithmetic with a Python number;
  with channels on ``dim1`` also pooling and ``flatten(start_dim >= 2)``;
* resized on the way: ``BatchNorm1d / 2d`` over the channels and ``LayerNorm((C,))`` after a
  Linear (its statistics then span the kept channels only, so pruning through it is approximate);
* consumers, whose inputs shrink and where the walk stops: ``nn.Linear`` reading ``"last"``
  (``in_features == C``) or ``"flat"`` (``in_features == C*S``), ungrouped convs reading ``"dim1"``.

Anything else (a residual add, concatenation, a reshape, a grouped conv, the model output, a
module called at several places) blocks: the producer is left alone, with that reason.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from numbers import Number
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..errors import ModelError

ELEMENTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh,
    nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Identity, nn.Dropout, nn.AlphaDropout,
)
CHANNEL_MODULES: tuple[type[nn.Module], ...] = (  # per-channel ops on (N, C, *spatial)
    nn.Dropout1d, nn.Dropout2d, nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
)
ELEMENTWISE_FUNCTIONS: frozenset[Any] = frozenset({
    torch.relu, F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish, torch.sigmoid,
    F.sigmoid, torch.tanh, F.tanh, F.hardtanh, F.hardswish, F.hardsigmoid, F.softplus, F.dropout,
})
CHANNEL_FUNCTIONS: frozenset[Any] = frozenset({
    F.dropout1d, F.dropout2d, F.max_pool1d, F.max_pool2d, F.avg_pool1d, F.avg_pool2d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_max_pool1d, F.adaptive_max_pool2d,
})
ELEMENTWISE_METHODS: frozenset[str] = frozenset({"relu", "relu_", "sigmoid", "tanh", "contiguous"})
SCALAR_ARITHMETIC: frozenset[Any] = frozenset({
    operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.mul, torch.div,
})
PRODUCERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d)


@dataclass
class Member:
    """A module resized with a producer's channels: ``role`` is ``"batchnorm"`` / ``"layernorm"``
    (per-channel entries) or ``"input"`` (a consumer's input columns, ``block`` per channel)."""

    name: str
    role: str
    block: int = 1


@dataclass
class ChannelGroup:
    """A prunable producer, its channel count and every module that shrinks with it."""

    producer: str
    channels: int
    members: list[Member] = field(default_factory=list)


@dataclass(frozen=True)
class Blocked:
    """Why a graph node stops a producer's channels from being pruned."""

    reason: str


def trace(model: nn.Module) -> fx.GraphModule:
    """``torch.fx.symbolic_trace(model)``; a model it cannot trace raises :class:`ModelError`."""
    try:
        return fx.symbolic_trace(model)
    except Exception as exc:  # fx raises many types (TraceError, TypeError, ...) on untraceable code
        raise ModelError(f"cannot trace {type(model).__name__} with torch.fx ({type(exc).__name__}: {exc}); "
                         "data-dependent control flow is not supported: prune a traceable submodule instead") from None


def call_counts(gm: fx.GraphModule) -> dict[str, int]:
    """How many times each submodule is called in the traced forward."""
    counts: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            counts[node.target] = counts.get(node.target, 0) + 1
    return counts


def channel_group(gm: fx.GraphModule, name: str, counts: dict[str, int]) -> ChannelGroup | Blocked:
    """The channel group of producer ``name``, or why its outputs cannot be pruned."""
    module = gm.get_submodule(name)
    if type(module) not in PRODUCERS:
        return Blocked(f"{type(module).__name__} is not a plain Linear / Conv1d / Conv2d")
    if getattr(module, "groups", 1) != 1:
        return Blocked("grouped convolution")
    if counts.get(name, 0) != 1:
        return Blocked("not called as a module in the traced forward" if not counts.get(name)
                       else f"called at {counts[name]} places in the forward (shared weights)")
    node = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == name)
    channels = module.out_features if isinstance(module, nn.Linear) else module.out_channels
    group = ChannelGroup(name, channels)
    stack, seen = [(node, "last" if isinstance(module, nn.Linear) else "dim1")], set()
    while stack:
        current, layout = stack.pop()
        for user in current.users:
            if (user, layout) in seen:
                continue
            seen.add((user, layout))
            step = _step(gm, user, current, layout, channels, counts, group)
            if isinstance(step, Blocked):
                return Blocked(f"output reaches {_describe(user)}: {step.reason}")
            if step is not None:
                stack.append((user, step))
    return group


def _step(gm: fx.GraphModule, node: fx.Node, source: fx.Node, layout: str, channels: int,
          counts: dict[str, int], group: ChannelGroup) -> str | Blocked | None:
    """Follow ``source -> node``: the layout to keep walking with, ``None`` at a consumer (which
    is added to ``group``), or :class:`Blocked` with the reason."""
    if node.op == "output":
        return Blocked("the model output cannot be resized")
    if node.op == "call_module":
        return _module_step(gm, node, source, layout, channels, counts, group)
    if node.op not in ("call_function", "call_method"):
        return Blocked("unsupported graph node")
    operands = [*node.args, *node.kwargs.values()]
    target = node.target
    if target in SCALAR_ARITHMETIC and len(node.args) == 2 and not node.kwargs:
        other = node.args[1] if node.args[0] is source else node.args[0]
        return layout if isinstance(other, Number) else Blocked("combines the channels with another tensor")
    if node.args[:1] != (source,) or any(isinstance(a, fx.Node) for a in operands[1:]):
        return Blocked("combines the channels with another tensor")
    if target in ELEMENTWISE_FUNCTIONS or target in ELEMENTWISE_METHODS:
        return layout
    if target in CHANNEL_FUNCTIONS:
        return layout if layout == "dim1" and not node.kwargs.get("return_indices") else Blocked("not a per-channel op here")
    if target in (torch.flatten, "flatten"):
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
        return _flatten(layout, start, end)
    return Blocked("operation not known to preserve channels")


def _module_step(gm: fx.GraphModule, node: fx.Node, source: fx.Node, layout: str, channels: int,
                 counts: dict[str, int], group: ChannelGroup) -> str | Blocked | None:
    module, name = gm.get_submodule(node.target), node.target
    if isinstance(module, ELEMENTWISE_MODULES):
        return layout
    if isinstance(module, CHANNEL_MODULES):
        return layout if layout == "dim1" and not getattr(module, "return_indices", False) else Blocked("not a per-channel op here")
    if type(module) is nn.Flatten:
        return _flatten(layout, module.start_dim, module.end_dim)
    if node.args[:1] != (source,) or len(node.args) > 1 or node.kwargs:
        return Blocked("module called with more than one input")
    if counts[name] != 1:
        return Blocked(f"module called at {counts[name]} places in the forward")
    if type(module) in (nn.BatchNorm1d, nn.BatchNorm2d):
        if layout == "flat" or module.num_features != channels:
            return Blocked(f"BatchNorm over {module.num_features} features, not the {channels} channels")
        group.members.append(Member(name, "batchnorm"))
        return layout
    if type(module) is nn.LayerNorm:
        if layout != "last" or tuple(module.normalized_shape) != (channels,):
            return Blocked(f"LayerNorm over {tuple(module.normalized_shape)}, not the last axis of {channels} channels")
        group.members.append(Member(name, "layernorm"))
        return layout
    if type(module) is nn.Linear and layout in ("last", "flat"):
        if module.in_features % channels or (layout == "last" and module.in_features != channels):
            return Blocked(f"in_features {module.in_features} does not map onto {channels} channels")
        group.members.append(Member(name, "input", module.in_features // channels))
        return None
    if type(module) in (nn.Conv1d, nn.Conv2d) and layout == "dim1":
        if module.groups != 1 or module.in_channels != channels:
            return Blocked("grouped convolution" if module.groups != 1 else f"in_channels {module.in_channels} != {channels}")
        group.members.append(Member(name, "input"))
        return None
    return Blocked(f"{type(module).__name__} cannot be resized along these channels")


def _flatten(layout: str, start: Any, end: Any) -> str | Blocked:
    """Layout after ``flatten(start, end)``: only conv outputs flatten in a known way."""
    if layout == "dim1" and isinstance(start, int) and start >= 2:
        return "dim1"
    if layout in ("dim1", "flat") and start == 1 and end == -1:
        return "flat"
    return Blocked(f"flatten(start_dim={start}, end_dim={end}) of this layout cannot be mapped")


def _describe(node: fx.Node) -> str:
    if node.op == "call_module":
        return f"module {node.target!r}"
    if node.op == "output":
        return "the model output"
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return f"{node.op.replace('call_', '')} {target!r} (node {node.name!r})"

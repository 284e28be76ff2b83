"""Quantized drop-in replacements for ``nn.Linear``, ``nn.Conv1d/2d/3d``, ``nn.ConvTranspose1d/2d/3d``,
``nn.Embedding``, ``nn.EmbeddingBag``, and the registry of layer types that :func:`squeezer.modules.swap_layers`
quantizes.

Each is a subclass of the torch layer (so ``isinstance`` checks and attributes still work)
plus :class:`QuantMixin`; ``from_float(layer, scheme, copy)`` moves the layer's parameters over
(copies of them with ``copy=True``, else the same storage: no second copy of a model being
quantized in place or already copied).
Transformers' ``Conv1D`` (``y = x W + b`` with ``W: (in, out)``) becomes a ``QuantLinear`` with
``W^T`` so that output channels are on axis 0 like every other weight; so does a transposed convolution's
``(in, out / groups, k...)`` weight, held as ``(out, in / groups, k...)`` (:class:`QuantConvTranspose`).

A user's subclass of a torch layer that redefines the layer's function (``forward``, or ``_conv_forward``
that a convolution's ``forward`` calls: "same" padding, weight standardisation, an output scale) is not
replaced by the plain quantized layer, which would compute something else: it becomes
``Quant<Subclass>`` (:func:`own_forward_class`), whose ``_op(x, W^)`` runs the subclass's own forward with
``fq_w(W)`` in place of its weight (:func:`own_forward`). Packed, it runs the same forward on the unpacked weight;
exported, the subclass's forward is traced around the dequantized weight (:class:`OwnFunction`, its float function
with the weight as an input), so every backend computes the subclass's function.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cache
from typing import NamedTuple

import torch.nn.functional as F
from torch import Tensor, nn

from ..quant.core import fake_quantize, rows_qparams
from ..quant.scheme import LayerScheme
from .base import QuantMixin
from .recurrent import QuantGRU, QuantLSTM, QuantRNN, activation_refusal


def _adopt(new: nn.Module, weight: Tensor, bias: Tensor | None, copy: bool) -> None:
    """The source's parameters as ``new``'s: copies (``copy=True``: algorithms change the weight in
    place and must not touch a source that lives on, e.g. a weight tied to another layer) or the
    same storage (the source layer is being replaced and its memory is reused)."""
    own = (lambda t: t.detach().clone()) if copy else (lambda t: t.detach())
    new.weight = nn.Parameter(own(weight), requires_grad=weight.requires_grad)
    if bias is not None:
        new.bias = nn.Parameter(own(bias), requires_grad=bias.requires_grad)


class QuantLinear(QuantMixin, nn.Linear):
    """``y = fq_a(x) fq_w(W)^T + b``; ``W: (out, in)``."""

    @classmethod
    def from_float(cls, layer: nn.Module, scheme: LayerScheme, copy: bool = True) -> "QuantLinear":
        weight = layer.weight
        if type(layer).__name__ == "Conv1D" and not isinstance(layer, nn.Linear):
            weight = weight.t().contiguous()
        new = cls(weight.shape[1], weight.shape[0], bias=layer.bias is not None, device="meta")
        _adopt(new, weight, layer.bias, copy)
        new._init_quant(scheme)
        return new

    def _op(self, x: Tensor, weight: Tensor) -> Tensor:
        return F.linear(x, weight, self.bias)


class QuantConvNd(QuantMixin):
    """A convolution: ``y = conv(fq_a(x), fq_w(W)) + b`` with the layer's stride, padding, dilation and groups."""

    token_axis_is_last = False

    @classmethod
    def from_float(cls, layer: nn.Module, scheme: LayerScheme, copy: bool = True):
        new = cls(
            layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride,
            padding=layer.padding, dilation=layer.dilation, groups=layer.groups,
            bias=layer.bias is not None, padding_mode=layer.padding_mode, device="meta",
        )
        _adopt(new, layer.weight, layer.bias, copy)
        new._init_quant(scheme)
        return new

    def _op(self, x: Tensor, weight: Tensor) -> Tensor:
        return self._conv_forward(x, weight, self.bias)


class QuantConv1d(QuantConvNd, nn.Conv1d):
    """``y = conv1d(fq_a(x), fq_w(W)) + b``; ``W: (out, in / groups, k)``."""


class QuantConv2d(QuantConvNd, nn.Conv2d):
    """``y = conv2d(fq_a(x), fq_w(W)) + b``; ``W: (out, in / groups, kh, kw)``."""


class QuantConv3d(QuantConvNd, nn.Conv3d):
    """``y = conv3d(fq_a(x), fq_w(W)) + b``; ``W: (out, in / groups, kd, kh, kw)``."""


def output_channels_first(weight: Tensor, groups: int) -> Tensor:
    """A transposed convolution's weight ``(in, out / groups, k...)`` as ``(out, in / groups, k...)``:
    ``W'[g o_g + j, i] = W[g i_g + i, j]`` (``i_g = in / groups``, ``o_g = out / groups``); a copy."""
    cin, og, *k = weight.shape
    w = weight.reshape(groups, cin // groups, og, *k).transpose(1, 2)
    return w.reshape(groups * og, cin // groups, *k).contiguous()


def input_channels_first(weight: Tensor, groups: int) -> Tensor:
    """The inverse of :func:`output_channels_first`: ``(out, in / groups, k...)`` back to torch's ``(in, out / groups, k...)``."""
    cout, ig, *k = weight.shape
    return weight.reshape(groups, cout // groups, ig, *k).transpose(1, 2).reshape(groups * ig, cout // groups, *k)


class QuantConvTranspose(QuantMixin):
    """A transposed convolution whose ``weight`` is held with output channels on axis 0, like every quantized
    weight: ``(out, in / groups, k...)`` (:func:`output_channels_first` of torch's ``(in, out / groups, k...)``), so a
    per-channel scale is one per OUTPUT channel and a group runs along the input channels of one output.
    ``op(x, W) = conv_transpose(x, input_channels_first(W), b)`` with the layer's stride, padding,
    ``output_padding``, groups and dilation (``forward(x)`` takes no ``output_size``)."""

    token_axis_is_last = False
    transpose: Callable[..., Tensor]

    @classmethod
    def from_float(cls, layer: nn.Module, scheme: LayerScheme, copy: bool = True):
        new = cls(
            layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride, padding=layer.padding,
            output_padding=layer.output_padding, groups=layer.groups, bias=layer.bias is not None,
            dilation=layer.dilation, padding_mode=layer.padding_mode, device="meta",
        )
        _adopt(new, output_channels_first(layer.weight, layer.groups), layer.bias, copy)
        new._init_quant(scheme)
        return new

    def torch_weight(self, weight: Tensor) -> Tensor:
        """``weight`` in torch's layout ``(in, out / groups, k...)``."""
        return input_channels_first(weight, self.groups)

    def _op(self, x: Tensor, weight: Tensor) -> Tensor:
        return self.transpose(x, self.torch_weight(weight), self.bias, self.stride, self.padding, self.output_padding,
                              self.groups, self.dilation)


class QuantConvTranspose1d(QuantConvTranspose, nn.ConvTranspose1d):
    """``y = conv_transpose1d(fq_a(x), fq_w(W)) + b``; ``W: (out, in / groups, k)`` (see ``QuantConvTranspose``)."""

    transpose = staticmethod(F.conv_transpose1d)


class QuantConvTranspose2d(QuantConvTranspose, nn.ConvTranspose2d):
    """``y = conv_transpose2d(fq_a(x), fq_w(W)) + b``; ``W: (out, in / groups, kh, kw)``."""

    transpose = staticmethod(F.conv_transpose2d)


class QuantConvTranspose3d(QuantConvTranspose, nn.ConvTranspose3d):
    """``y = conv_transpose3d(fq_a(x), fq_w(W)) + b``; ``W: (out, in / groups, kd, kh, kw)``."""

    transpose = staticmethod(F.conv_transpose3d)


class QuantEmbedding(QuantMixin, nn.Embedding):
    """``y = fq_w(W)[idx]``; ``W: (num_embeddings, dim)``, one scale per row (token vector) by default."""

    @classmethod
    def from_float(cls, layer: nn.Embedding, scheme: LayerScheme, copy: bool = True) -> "QuantEmbedding":
        new = cls(
            layer.num_embeddings, layer.embedding_dim, padding_idx=layer.padding_idx,
            max_norm=layer.max_norm, norm_type=layer.norm_type,
            scale_grad_by_freq=layer.scale_grad_by_freq, sparse=layer.sparse, device="meta",
        )
        _adopt(new, layer.weight, None, copy)
        new._init_quant(scheme)
        return new

    def _op(self, x: Tensor, weight: Tensor) -> Tensor:
        return F.embedding(x, weight, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse)

    def _simulate(self, x: Tensor) -> Tensor:
        """``fq_w(W[idx])`` with the looked-up rows' own parameters: only the rows used are
        fake-quantized, and no fake-quantized copy of the table is kept (for row-wise formats,
        without a learned weight quantizer or ``max_norm``; else ``fq_w(W)[idx]``)."""
        ids = x.reshape(-1)
        qp = rows_qparams(self.ensured_weight_qparams(), self.weight_spec.granularity, ids)
        if qp is None or self.max_norm is not None or "weight_fake_quant" in self._modules:
            return super()._simulate(x)
        rows = self._op(ids, self.weight)
        return fake_quantize(rows, self.weight_spec, qp).reshape(*x.shape, rows.shape[-1])


class BagInput(NamedTuple):
    """What ``EmbeddingBag.forward`` takes: ids ``(B, L)`` or flat ids ``(n,)`` with ``offsets (B,)``, and
    optional ``per_sample_weights`` shaped like the ids (mode ``sum``)."""

    ids: Tensor
    offsets: Tensor | None = None
    per_sample_weights: Tensor | None = None


class QuantEmbeddingBag(QuantMixin, nn.EmbeddingBag):
    """``y_b = reduce_{i in bag b} w_i fq_w(W)[idx_i]`` (reduce: sum / mean / max, ``w_i`` the per-sample
    weights or 1, ``padding_idx`` rows left out); ``W: (num_embeddings, dim)``, one scale per row by default.
    Its input (token ids) is never quantized: its scheme keeps the weight spec only. The reduction is
    ``bag_mode`` (``mode`` is the quantized layer's float / simulate / ... mode)."""

    @classmethod
    def from_float(cls, layer: nn.EmbeddingBag, scheme: LayerScheme, copy: bool = True) -> "QuantEmbeddingBag":
        new = cls(
            layer.num_embeddings, layer.embedding_dim, max_norm=layer.max_norm, norm_type=layer.norm_type,
            scale_grad_by_freq=layer.scale_grad_by_freq, mode=layer.mode, sparse=layer.sparse,
            include_last_offset=layer.include_last_offset, padding_idx=layer.padding_idx, device="meta",
        )
        _adopt(new, layer.weight, None, copy)
        new._init_quant(replace(scheme, activation=None, activation_mode="none"))  # ids are never quantized
        new.bag_mode = layer.mode  # ``mode`` is now the quantized layer's (float / simulate / ...)
        return new

    def forward(self, input: Tensor, offsets: Tensor | None = None,  # type: ignore[override]
                per_sample_weights: Tensor | None = None) -> Tensor:
        return QuantMixin.forward(self, BagInput(input, offsets, per_sample_weights))

    def _op(self, x: BagInput, weight: Tensor) -> Tensor:  # type: ignore[override]
        return F.embedding_bag(x.ids, weight, x.offsets, self.max_norm, self.norm_type, self.scale_grad_by_freq,
                               self.bag_mode, self.sparse, x.per_sample_weights, self.include_last_offset, self.padding_idx)

    def _simulate(self, x: BagInput) -> Tensor:  # type: ignore[override]
        return self._op(x, self.quantized_weight())


def own_forward(module: nn.Module, float_class: type[nn.Module], x: Tensor, weight: Tensor) -> Tensor:
    """``float_class.forward(module, x)`` while ``module.weight`` reads ``weight`` (a tensor, kept in the graph:
    autograd's STE through ``fq_w(W)``, or a traced / exported node); the module's own weight is restored after."""
    params = module._parameters
    own_weight = params["weight"]
    params["weight"] = weight
    try:
        return float_class.forward(module, x)
    finally:
        params["weight"] = own_weight


class OwnForward(QuantMixin):
    """Mixed in first into ``Quant<Subclass>``: ``op(x, W^)`` = the subclass's own ``forward(x)`` reading
    ``W^`` as ``self.weight`` (the float weight stays the parameter), so whatever it does around the weight
    (pad the input, standardise ``W^``, scale the output) runs on the quantized weight."""

    float_class: type[nn.Module]
    float_attributes: frozenset[str]  # the names in the float layer's ``__dict__`` (the rest is quantization state)

    @classmethod
    def from_float(cls, layer: nn.Module, scheme: LayerScheme, copy: bool = True) -> "OwnForward":
        """The layer with its attributes, submodules and buffers as they are (its own ``__init__`` may take
        other arguments than the torch layer's), its weight and bias adopted like every quantized layer's."""
        new = cls.__new__(cls)  # its registries (parameters, buffers, submodules, hooks) copied, not shared
        new.__dict__.update({k: type(v)(v) if isinstance(v, (dict, set)) else v for k, v in layer.__dict__.items()})
        new.float_attributes = frozenset(layer.__dict__)
        _adopt(new, layer.weight, getattr(layer, "bias", None), copy)
        new._init_quant(scheme)
        return new

    def _op(self, x: Tensor, weight: Tensor) -> Tensor:
        """``float_class.forward(x)`` with ``self.weight`` reading ``weight``."""
        return own_forward(self, self.float_class, x, weight)

    def _simulate(self, x: Tensor) -> Tensor:
        """``op(fq_a(x), fq_w(W))``: the whole weight fake-quantized, whatever the torch layer's shortcut."""
        return QuantMixin._simulate(self, x)

    def deploy_refusal(self) -> str | None:
        """Why packed kernels and exports cannot reproduce this layer's function, else None: an input transform
        folded into its weight (``W diag(s)``, ``W H``: SmoothQuant / AWQ / Hadamard) is undone only by a
        function linear in ``W``, which the subclass's own forward need not be."""
        if self.input_scale is None and self.input_rotation <= 1:
            return None
        return ("an algorithm folded an input scale / rotation into its weight, which its own forward (maybe not "
                "linear in the weight) does not undo; quantize it without smoothquant / awq / hadamard")

    def float_twin(self) -> nn.Module:
        """A ``float_class`` module holding copies of this layer's state (attributes, submodules, buffers, other
        parameters) but no weight and no quantization state: ``own_forward(twin, float_class, x, W^)`` is this
        layer's function of ``x`` and any weight ``W^``."""
        twin = self.float_class.__new__(self.float_class)
        state = {k: v for k, v in self.__dict__.items() if k in self.float_attributes}
        memo = {id(self._parameters["weight"]): None}  # not copied: the weight comes as an input
        twin.__dict__.update(copy.deepcopy(state, memo))
        twin._buffers.pop("input_scale", None)
        return twin.eval()


class OwnFunction(nn.Module):
    """The function of a ``Quant<Subclass>`` layer as a float module for export graphs: ``forward(x, W^, bias)`` =
    the subclass's forward on ``x`` with weight ``W^`` (``bias`` is ignored: the subclass's own bias, with its other
    parameters, is held by ``function``, a :meth:`OwnForward.float_twin`)."""

    def __init__(self, layer: OwnForward) -> None:
        super().__init__()
        self.function = layer.float_twin()

    def forward(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        return own_forward(self.function, type(self.function), x, weight)


@cache
def own_forward_class(quantized: type[QuantMixin], float_class: type[nn.Module]) -> type[OwnForward]:
    """``Quant<Subclass>`` (one per pair, cached): ``OwnForward``, then ``quantized`` (so algorithms and checks
    see e.g. a ``QuantConv2d``), then the user's ``float_class`` (whose methods come before the torch layer's)."""
    return type(f"Quant{float_class.__name__}", (OwnForward, quantized, float_class),
                {"float_class": float_class, "__module__": float_class.__module__})


_FUNCTION_METHODS = ("forward", "_conv_forward")
"""The methods a torch layer's function is made of: a subclass that redefines one computes something else."""


def redefined_methods(layer: nn.Module, torch_class: type[nn.Module]) -> tuple[str, ...]:
    """The methods of ``_FUNCTION_METHODS`` that ``type(layer)`` (a subclass of ``torch_class``) redefines."""
    above = type(layer).__mro__[:type(layer).__mro__.index(torch_class)]
    return tuple(m for m in _FUNCTION_METHODS if hasattr(torch_class, m) and any(m in vars(c) for c in above))


@dataclass(frozen=True)
class LayerType:
    """A quantizable layer type: its name (``QuantConfig.layer_types``, override keys ``type:<name>``),
    the quantized class that replaces a matching module (``from_float(module, scheme, copy)``), the
    predicate that says which modules match and, for a torch layer, its class (``torch_class``): a
    subclass that redefines its function gets ``own_forward_class(quantized, subclass)`` instead."""

    name: str
    quantized: type[QuantMixin]
    matches: Callable[[nn.Module], bool]
    torch_class: type[nn.Module] | None = None
    refusal: Callable[[LayerScheme], str | None] | None = None  # why a scheme leaves such a layer float, else None


def _is_transformers_conv1d(layer: nn.Module) -> bool:
    return type(layer).__name__ == "Conv1D" and hasattr(layer, "nf")


def _plain(torch_class: type[nn.Module]) -> Callable[[nn.Module], bool]:
    """Matches ``torch_class`` and its subclasses that keep its function; a subclass with its own forward stays
    float where ``OwnForward`` cannot run it (a transposed convolution's quantized weight is reordered output
    channels first, an embedding bag's forward takes offsets and per-sample weights besides the ids)."""
    return lambda m: isinstance(m, torch_class) and not redefined_methods(m, torch_class)


_BUILTIN = (
    LayerType("linear", QuantLinear, lambda m: isinstance(m, nn.Linear) or _is_transformers_conv1d(m), nn.Linear),
    LayerType("conv1d", QuantConv1d, lambda m: isinstance(m, nn.Conv1d), nn.Conv1d),
    LayerType("conv2d", QuantConv2d, lambda m: isinstance(m, nn.Conv2d), nn.Conv2d),
    LayerType("embedding", QuantEmbedding, lambda m: isinstance(m, nn.Embedding), nn.Embedding),
    LayerType("conv3d", QuantConv3d, lambda m: isinstance(m, nn.Conv3d), nn.Conv3d),
    LayerType("conv_transpose1d", QuantConvTranspose1d, _plain(nn.ConvTranspose1d)),
    LayerType("conv_transpose2d", QuantConvTranspose2d, _plain(nn.ConvTranspose2d)),
    LayerType("conv_transpose3d", QuantConvTranspose3d, _plain(nn.ConvTranspose3d)),
    LayerType("embedding_bag", QuantEmbeddingBag, _plain(nn.EmbeddingBag)),
)
_RECURRENT = (  # activations they cannot run are refused; a subclass that redefines forward stays float
    LayerType("lstm", QuantLSTM, _plain(nn.LSTM), refusal=activation_refusal),
    LayerType("gru", QuantGRU, _plain(nn.GRU), refusal=activation_refusal),
    LayerType("rnn", QuantRNN, _plain(nn.RNN), refusal=activation_refusal),
)
_BUILTIN = (*_BUILTIN, *_RECURRENT)
_REGISTRY: dict[str, LayerType] = {t.name: t for t in _BUILTIN}


def register_layer_type(layer_type: LayerType) -> LayerType:
    """Make ``layer_type`` quantizable by every config that does not restrict ``layer_types``; types are
    matched in registration order (the built-in ones first)."""
    if layer_type.name in _REGISTRY:
        raise ValueError(f"layer type {layer_type.name!r} is already registered")
    _REGISTRY[layer_type.name] = layer_type
    return layer_type


def unregister_layer_type(name: str) -> None:
    """Forget a registered layer type (the built-in ones stay)."""
    if name in {t.name for t in _BUILTIN}:
        raise ValueError(f"the built-in layer type {name!r} cannot be unregistered")
    _REGISTRY.pop(name, None)


def layer_type_names() -> tuple[str, ...]:
    """The registered layer type names, in matching order."""
    return tuple(_REGISTRY)


def _layer_type(layer: nn.Module) -> LayerType | None:
    if isinstance(layer, QuantMixin):
        return None
    return next((t for t in _REGISTRY.values() if t.matches(layer)), None)


def quantized_class_for(layer: nn.Module) -> type[QuantMixin] | None:
    """The quantized class that replaces ``layer``, or None when its type is not supported: the type's
    quantized class, or ``Quant<Subclass>`` for a subclass of the torch layer that redefines its function."""
    found = _layer_type(layer)
    if found is None:
        return None
    torch_class = found.torch_class
    if torch_class is not None and isinstance(layer, torch_class) and redefined_methods(layer, torch_class):
        return own_forward_class(found.quantized, type(layer))
    return found.quantized


def scheme_refusal(layer: nn.Module, scheme: LayerScheme) -> str | None:
    """Why ``layer``'s type cannot take ``scheme`` (its type's ``refusal``, e.g. activations it cannot run), else None."""
    found = _layer_type(layer)
    return None if found is None or found.refusal is None else found.refusal(scheme)


def layer_type_name(layer: nn.Module) -> str | None:
    """The registered type name of ``layer`` (``linear`` / ``conv1d`` / ``conv2d`` / ``embedding`` / ...), else None."""
    found = _layer_type(layer)
    return None if found is None else found.name

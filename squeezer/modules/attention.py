"""Attention modules rewritten as explicit math over child linear layers, so that their projections are
ordinary layers that squeezer quantizes, packs, saves and exports.

``nn.MultiheadAttention`` hands its float projection weights to one fused function; the inference fast path
of ``nn.TransformerEncoderLayer`` hands all of its weights to one fused kernel, and ``nn.TransformerEncoder``
turns padded batches into nested tensors for that kernel. :func:`unfuse` replaces them in place, with the
same parameters and the same function, before squeezer swaps in its quantized layers (and when a checkpoint
is loaded into the user's model):

* ``nn.MultiheadAttention`` -> :class:`UnfusedMultiheadAttention`: ``in_proj`` (``Linear(E, 3E)``, rows
  q / k / v) when query, key and value have the embedding size ``E``, else ``q_proj`` / ``k_proj`` /
  ``v_proj`` (``Linear(E | kdim | vdim, E)``), then the attention of each head, then ``out_proj``;
* ``nn.TransformerEncoderLayer`` (and a subclass): the same object, made an instance of a subclass whose
  forward always takes torch's standard path (:class:`UnfusedEncoderLayer`), which calls its submodules;
* ``nn.TransformerEncoder``: ``use_nested_tensor = False`` (torch's own switch of its nested-tensor path).

An ``nn.MultiheadAttention`` that is the model itself, or a subclass of it that redefines ``forward``, is left
as it is (:func:`is_fused`): its children stay float.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import cache

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _additive(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A boolean mask (True: not attended) as the additive float mask ``0 / -inf``; a float mask as is."""
    if mask is None or mask.is_floating_point():
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))


class UnfusedMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention``'s function over child linear layers. Per head ``h`` (``d = E / H``)::

        q, k, v = x_q W_q^T + b_q,  x_k W_k^T + b_k,  x_v W_v^T + b_v       (in_proj rows, or q/k/v_proj)
        k, v    = [k; bias_k], [v; bias_v]   (add_bias_kv),   [k; 0], [v; 0]   (add_zero_attn)
        A_h     = softmax(q_h k_h^T / sqrt(d) + M)       M: attn_mask + key_padding_mask (-inf where masked)
        y       = concat_h(dropout(A_h) v_h) W_o^T + b_o                                     (out_proj)

    Shapes as torch's: ``(L, N, E)`` / ``(N, L, E)`` with ``batch_first`` / ``(L, E)`` unbatched; returns
    ``(y, weights)``, ``weights`` ``(N, L, S)`` averaged over heads or ``(N, H, L, S)``, or None unless
    ``need_weights``. Without weights the attention is ``F.scaled_dot_product_attention``."""

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: int | None = None,
                 vdim: int | None = None, batch_first: bool = False, device: torch.device | str | None = None) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.kdim, self.vdim = kdim or embed_dim, vdim or embed_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.dropout, self.batch_first, self.add_zero_attn = dropout, batch_first, add_zero_attn
        if self._qkv_same_embed_dim:
            self.in_proj = nn.Linear(embed_dim, 3 * embed_dim, bias=bias, device=device)
        else:
            self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, device=device)
            self.k_proj = nn.Linear(self.kdim, embed_dim, bias=bias, device=device)
            self.v_proj = nn.Linear(self.vdim, embed_dim, bias=bias, device=device)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, device=device)
        shape = (1, 1, embed_dim)
        self.bias_k = nn.Parameter(torch.zeros(shape, device=device)) if add_bias_kv else None
        self.bias_v = nn.Parameter(torch.zeros(shape, device=device)) if add_bias_kv else None

    @classmethod
    def from_float(cls, mha: nn.MultiheadAttention) -> "UnfusedMultiheadAttention":
        """The same function holding ``mha``'s parameters (the same tensors, no copy) and its ``out_proj``."""
        new = cls(mha.embed_dim, mha.num_heads, mha.dropout, mha.in_proj_bias is not None, mha.bias_k is not None,
                  mha.add_zero_attn, mha.kdim, mha.vdim, mha.batch_first, device="meta")
        if new._qkv_same_embed_dim:
            new.in_proj.weight = mha.in_proj_weight
            if mha.in_proj_bias is not None:
                new.in_proj.bias = mha.in_proj_bias
        else:
            biases = (None,) * 3 if mha.in_proj_bias is None else mha.in_proj_bias.chunk(3)
            for proj, weight, b in zip((new.q_proj, new.k_proj, new.v_proj),
                                       (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight), biases):
                proj.weight = weight
                if b is not None:
                    proj.bias = nn.Parameter(b.detach().clone(), requires_grad=mha.in_proj_bias.requires_grad)
        new.out_proj = mha.out_proj
        new.bias_k, new.bias_v = mha.bias_k, mha.bias_v
        return new

    def _project(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``q, k, v`` ``(L | S, N, E)``: ``in_proj`` run once per distinct input (self-attention: once), its
        rows ``[i E, (i + 1) E)`` taken for the i-th of q / k / v; or ``q_proj`` / ``k_proj`` / ``v_proj``."""
        if not self._qkv_same_embed_dim:
            return self.q_proj(query), self.k_proj(key), self.v_proj(value)
        q, k, v = (y[..., i * self.embed_dim:(i + 1) * self.embed_dim]
                   for i, y in enumerate(_once_per_tensor((query, key, value), self.in_proj)))
        return q, k, v

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        batched = query.dim() == 3
        if not batched:
            query, key, value = _once_per_tensor((query, key, value), lambda t: t.unsqueeze(1))
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        elif self.batch_first:
            query, key, value = _once_per_tensor((query, key, value), lambda t: t.transpose(0, 1))
        out, weights = self._attend(query, key, value, key_padding_mask, need_weights, attn_mask,
                                    average_attn_weights, is_causal)
        if not batched:
            return out.squeeze(1), None if weights is None else weights.squeeze(0)
        return (out.transpose(0, 1) if self.batch_first else out), weights

    def _attend(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None, need_weights: bool,
                attn_mask: Tensor | None, average_attn_weights: bool, is_causal: bool) -> tuple[Tensor, Tensor | None]:
        """The attention of sequence-first inputs ``(L, N, E)``, ``(S, N, kdim)``, ``(S, N, vdim)``."""
        L, N, E = query.shape
        H, d = self.num_heads, self.head_dim
        key_padding_mask = _additive(key_padding_mask, query.dtype)
        if is_causal and attn_mask is None:
            raise RuntimeError("is_causal is a hint that attn_mask is the causal mask: pass attn_mask too")
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None  # scaled_dot_product_attention applies the causal mask itself
        else:
            attn_mask = _additive(attn_mask, query.dtype)
            is_causal = is_causal and key_padding_mask is None
        if attn_mask is not None and attn_mask.dim() == 2:
            attn_mask = attn_mask.unsqueeze(0)
        q, k, v = self._project(query, key, value)
        if self.bias_k is not None:
            k, v = torch.cat([k, self.bias_k.expand(1, N, E)]), torch.cat([v, self.bias_v.expand(1, N, E)])
            attn_mask, key_padding_mask = _pad_last(attn_mask), _pad_last(key_padding_mask)
        q, k, v = (t.reshape(t.shape[0], N * H, d).transpose(0, 1) for t in (q, k, v))  # (N H, L | S, d)
        if self.add_zero_attn:
            k, v = (torch.cat([t, t.new_zeros(N * H, 1, d)], dim=1) for t in (k, v))
            attn_mask, key_padding_mask = _pad_last(attn_mask), _pad_last(key_padding_mask)
        S = k.shape[1]
        if key_padding_mask is not None:
            padding = key_padding_mask.reshape(N, 1, 1, S).expand(-1, H, -1, -1).reshape(N * H, 1, S)
            attn_mask = padding if attn_mask is None else attn_mask + padding
        p = self.dropout if self.training else 0.0
        if need_weights:
            scores = torch.bmm(q * math.sqrt(1.0 / d), k.transpose(1, 2))
            weights = F.softmax(scores if attn_mask is None else scores + attn_mask, dim=-1)
            weights = F.dropout(weights, p) if p > 0 else weights  # returned after dropout, as torch's
            out = torch.bmm(weights, v)  # (N H, L, d)
            out = out.transpose(0, 1).reshape(L, N, E)
            weights = weights.reshape(N, H, L, S)
            return self.out_proj(out), weights.mean(dim=1) if average_attn_weights else weights
        if attn_mask is not None:
            attn_mask = attn_mask.unsqueeze(0) if attn_mask.shape[0] == 1 else attn_mask.reshape(N, H, -1, S)
        out = F.scaled_dot_product_attention(q.reshape(N, H, L, d), k.reshape(N, H, S, d), v.reshape(N, H, S, d),
                                             attn_mask, p, is_causal)
        return self.out_proj(out.permute(2, 0, 1, 3).reshape(L, N, E)), None


def _once_per_tensor(tensors: tuple[Tensor, Tensor, Tensor],
                     f: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """``f`` of each of query / key / value, computed once per distinct tensor (self-attention: once), so that
    the results are the same tensor where the inputs were."""
    done: list[tuple[Tensor, Tensor]] = []
    out = []
    for t in tensors:
        y = next((y for seen, y in done if seen is t), None)
        if y is None:
            y = f(t)
            done.append((t, y))
        out.append(y)
    return out[0], out[1], out[2]


def _pad_last(mask: Tensor | None) -> Tensor | None:
    """One more (attended) key column: ``mask`` padded with 0 on its last axis."""
    return None if mask is None else F.pad(mask, (0, 1))


class UnfusedEncoderLayer(nn.TransformerEncoderLayer):
    """``nn.TransformerEncoderLayer`` that always takes torch's standard path (post-norm shown; ``norm_first``
    normalises before each block instead)::

        x = norm1(x + dropout1(self_attn(x, x, x)));   y = norm2(x + dropout2(linear2(dropout(act(linear1(x))))))
    """

    def forward(self, src: Tensor, src_mask: Tensor | None = None, src_key_padding_mask: Tensor | None = None,
                is_causal: bool = False) -> Tensor:
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal=is_causal)
            return x + self._ff_block(self.norm2(x))
        x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal=is_causal))
        return self.norm2(x + self._ff_block(x))


@cache
def _unfused_encoder_class(cls: type[nn.TransformerEncoderLayer]) -> type[UnfusedEncoderLayer]:
    """``cls`` with :class:`UnfusedEncoderLayer`'s forward right above torch's: a subclass's own ``forward``
    still runs first, and its ``super().forward`` takes the standard path."""
    if issubclass(cls, UnfusedEncoderLayer):
        return cls
    if cls is nn.TransformerEncoderLayer:
        return UnfusedEncoderLayer
    return type(f"Unfused{cls.__name__}", (cls, UnfusedEncoderLayer), {"__module__": cls.__module__})


def _keeps_function(module: nn.Module) -> bool:
    """An ``nn.MultiheadAttention`` (or a subclass that does not redefine ``forward``)."""
    return isinstance(module, nn.MultiheadAttention) and type(module).forward is nn.MultiheadAttention.forward


def is_fused(module: nn.Module) -> bool:
    """A module whose forward reads its children's float weights: an ``nn.MultiheadAttention`` that
    :func:`unfuse` leaves (the model itself, or a subclass with its own ``forward``)."""
    return isinstance(module, nn.MultiheadAttention)


def unfuse(model: nn.Module) -> nn.Module:
    """Rewrite in place the fused attention modules of ``model`` (see the module doc): each transformer encoder
    layer becomes an instance of its unfused class (the same object), each ``nn.MultiheadAttention`` inside
    ``model`` is replaced by :class:`UnfusedMultiheadAttention`; the function and the parameters stay the same.
    Returns ``model``; a second call changes nothing."""
    for parent in list(model.modules()):
        if isinstance(parent, nn.TransformerEncoder):
            parent.use_nested_tensor = False
        if isinstance(parent, nn.TransformerEncoderLayer):
            parent.__class__ = _unfused_encoder_class(type(parent))
        for attr, child in list(parent.named_children()):
            if _keeps_function(child):
                setattr(parent, attr, UnfusedMultiheadAttention.from_float(child))
    return model

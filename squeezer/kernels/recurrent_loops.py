"""The step loop of one packed LSTM / GRU direction compiled with TorchScript: the same ops as the Python loop.

:func:`squeezer.modules.recurrent_steps.run_recurrent` runs ``T`` Python steps per layer and direction; at
batch 1 each step is ~20 tiny tensor ops (the hidden product's activation quantization, its integer kernel,
the gate arithmetic), and the time goes to dispatching them from Python, not to the ``(B, H_out) x (H_out, G H)``
product. For ``w8a8`` (dynamic int8 activations, symmetric per token) with
``W_hh`` on an int8-activation kernel (``int8_codes_bf16`` or ``int_mm``, the paths' symmetric branch), a
direction's loop is a TorchScript function (:func:`lstm_loop`, :func:`gru_loop`) that executes, step by step,
exactly the ops of the Python loop (``_lstm_step`` / ``_gru_step`` with :class:`~squeezer.kernels.recurrent.
PackedRecurrent`'s hooks); the hidden product calls the very functions that :class:`~squeezer.kernels.paths.
Int8CodesBF16` / ``IntMM``'s ``run`` call (:func:`~squeezer.kernels.paths.symmetric_token_codes`, the kernel's
product, :func:`~squeezer.kernels.paths.rescale`; TorchScript compiles them with the loop), so its results are
the Python loop's bit for bit (the tests check it); TorchScript only removes the Python dispatch. The hidden
product, per step, with ``s_x = max(max_k |h_k| / 127, 1e-12)`` per row::

    q = clamp(round(h / s_x), -127, 127)            int8 codes of h_{t-1}
    y = s_x s_w (q W_q^T) + b_hh                     the kernel: bf16 codes into _weight_int8pack_mm, or _int_mm

A GRU also reads ``h_{t-1}`` in its update, through the layer's hook ``fq(h)`` (:func:`_token_fake_quantize`),
then the kernel quantizes ``fq(h)`` again, as the Python loop does.

:func:`hidden_kernel` says whether a matrix's runtime at a rows bucket is such a kernel and returns its
:class:`HiddenKernel` (the kernel's state: codes, scales, bias). The functions are compiled on first use.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any, Optional

import torch
from torch import Tensor

from .paths import int8_codes_bf16_product, int_mm_product, rescale, symmetric_token_codes
from .runtime import PackedLinear

KERNELS = ("int8_codes_bf16", "int_mm")
"""The int8-activation paths whose symmetric per-token branch the compiled loops reproduce (index = ``kernel``)."""


@dataclass(frozen=True)
class HiddenKernel:
    """What the compiled loop needs of ``W_hh``'s path: ``kernel`` (an index of :data:`KERNELS`), the codes in
    that path's layout (``(N, K)`` int8 for bf16 codes, ``(K, N)`` for ``_int_mm``), ``ones`` (bf16, the op's
    unit scales), the per-row scales ``s_w (1, N)`` and the bias ``b_hh`` (None without)."""

    kernel: int
    codes: Tensor
    ones: Tensor
    scale: Tensor
    bias: Optional[Tensor]


def hidden_kernel(runtime: PackedLinear, bucket: int) -> HiddenKernel | None:
    """``runtime``'s path at ``bucket`` as a :class:`HiddenKernel` when it is one of :data:`KERNELS` on symmetric
    per-token activations and the linear has no input transform; else None (the Python loop runs)."""
    name = runtime.choice[bucket]
    problem = runtime.problem
    if name not in KERNELS or problem.rotation is not None or problem.input_scale is not None:
        return None
    state: dict[str, Any] = runtime.states[name]
    if state["general"]:
        return None
    if name == "int_mm":
        return HiddenKernel(1, state["w_t"], torch.ones(0, dtype=torch.bfloat16), state["scale"], state["bias"])
    return HiddenKernel(0, state["w"], state["ones"], state["scale"], state["bias"])


def _hidden(h: Tensor, kernel: int, codes: Tensor, ones: Tensor, scale: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``h W_hh^T + b_hh`` as the path's ``run`` (its symmetric per-token branch): ``(B, K) -> (B, N)``."""
    q, s_x = symmetric_token_codes(h.float())
    if kernel == 0:
        y = int8_codes_bf16_product(q, codes, ones)
    else:
        y = int_mm_product(q.to(torch.int8), codes).float()
    return rescale(y, s_x, scale, bias)


def _token_fake_quantize(h: Tensor) -> Tensor:
    """The GRU's hook on ``h_{t-1} (B, H)`` for ``w8a8``: :func:`squeezer.quant.core.fake_quantize` of ``h`` with
    the layer's symmetric per-token int8 spec, ``s = max(|min_k h_k|, |max_k h_k|) / 127`` clamped to 1e-12 per
    row, ``(clamp(round(h / s) + 0, -127, 127) - 0) s``, written in the ops that ``fake_quantize`` runs for that
    spec (its ``QuantSpec`` / blocks machinery is not TorchScript), so it must stay equal to it bit for bit:
    ``test_compiled_loop_is_the_python_loop_bit_for_bit`` compares the loop with the Python loop's hook."""
    s = (torch.maximum(h.amin(1).abs(), h.amax(1).abs()) / 127).clamp_min(1e-12).reshape(-1, 1)
    return (torch.clamp(torch.round(h / s) + 0, -127, 127) - 0) * s


def _lstm_loop(x: Tensor, h: Tensor, c: Tensor, reverse: bool, kernel: int, codes: Tensor, ones: Tensor,
               scale: Tensor, bias: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """``x (T, B, 4 H)`` input projections, ``h``, ``c (B, H)`` -> ``(y (T B, H), h_T, c_T)``: ``_lstm_step``."""
    steps = x.shape[0]
    rows = c.shape[1]
    outputs = [h] * steps
    for i in range(steps):
        t = steps - 1 - i if reverse else i
        a = x[t] + _hidden(h, kernel, codes, ones, scale, bias)
        gates = torch.sigmoid(a).chunk(4, 1)
        c = torch.addcmul(gates[1] * c, gates[0], torch.tanh(a[:, 2 * rows:3 * rows]))
        h = gates[3] * torch.tanh(c)
        outputs[t] = h
    return torch.cat(outputs), h, c


def _gru_loop(x: Tensor, h: Tensor, reverse: bool, kernel: int, codes: Tensor, ones: Tensor, scale: Tensor,
              bias: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """``x (T, B, 3 H)`` input projections, ``h (B, H)`` -> ``(y (T B, H), h_T)``: ``_gru_step`` with the layer's
    dynamic per-token hook on ``h_{t-1}``."""
    steps = x.shape[0]
    outputs = [h] * steps
    for i in range(steps):
        t = steps - 1 - i if reverse else i
        x_t = x[t]
        hq = _token_fake_quantize(h)
        a = _hidden(hq, kernel, codes, ones, scale, bias)
        n_rows = a.shape[1] // 3
        rz = torch.sigmoid(x_t[:, :2 * n_rows] + a[:, :2 * n_rows]).chunk(2, 1)
        n = torch.tanh(torch.addcmul(x_t[:, 2 * n_rows:], rz[0], a[:, 2 * n_rows:]))
        h = torch.lerp(n, hq, rz[1])
        outputs[t] = h
    return torch.cat(outputs), h


@cache
def _compiled() -> tuple[Callable[..., Any], Callable[..., Any]]:
    """The TorchScript functions (compiled once per process, on first use; torch's deprecation notice of
    ``torch.jit.script`` is silenced: ``torch.compile`` generates fused kernels, not these ops)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.script(_lstm_loop), torch.jit.script(_gru_loop)


def lstm_loop(hk: HiddenKernel, x: Tensor, h: Tensor, c: Tensor, reverse: bool) -> tuple[Tensor, Tensor, Tensor]:
    """One LSTM direction (no ``proj_size``): ``(y (T B, H), h_T, c_T)`` of ``x (T, B, 4 H)``, ``h``, ``c (B, H)``."""
    return _compiled()[0](x, h, c, reverse, hk.kernel, hk.codes, hk.ones, hk.scale, hk.bias)


def gru_loop(hk: HiddenKernel, x: Tensor, h: Tensor, reverse: bool) -> tuple[Tensor, Tensor]:
    """One GRU direction: ``(y (T B, H), h_T)`` of ``x (T, B, 3 H)`` and ``h (B, H)``."""
    return _compiled()[1](x, h, reverse, hk.kernel, hk.codes, hk.ones, hk.scale, hk.bias)

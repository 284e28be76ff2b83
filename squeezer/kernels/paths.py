"""Execution paths for packed linear layers, on PyTorch's own CPU integer ops.

* ``int_mm``: ``y = s_x s_w (X_q W_q^T - z_x colsum(W_q)) + b`` with ``torch._int_mm`` (int8 x int8
  -> int32); activations quantized exactly as the layer specifies (dynamic per token, symmetric or
  asymmetric with one ``(s_x, z_x)`` per row; dynamic or static per tensor), so the result equals
  the simulated layer up to float rounding.
  ``_int_mm`` needs more than 16 rows: smaller inputs are zero-padded to 17. Taken only for
  ``K % 8 == 0`` (measured here: wrong sums for ``K = 1``).
* ``fbgemm_dynamic``: ``quantized::linear_dynamic`` (fbgemm, VNNI): one asymmetric uint8 scale
  for the whole input: squeezer's scheme for dynamic per-tensor uint8 activations (``w8a8-tensor``;
  fbgemm computes that scale and zero point itself, so its output is not bit-identical to squeezer's:
  the tests bound it at 0.2 %), and equal to (or better than) per-token 8-bit for one row, so eligible there too.
  Taken only on CPUs with AVX-512 VNNI: without it fbgemm adds u8 x s8 pairs in saturating int16
  (measured on an AVX2 CPU: 9 % output error).
* ``int8_weight_bf16``: ``aten._weight_int8pack_mm`` on bf16 activations (weight-only int8,
  per-channel symmetric); the op is slow on fp32 inputs, so inputs are cast to bf16. The op takes
  its scales in the input's dtype: it gets scales of 1 and squeezer's float32 scales multiply its
  output, ``y = (x_bf16 W_q^T) * S + b``, so that no channel carries a scale rounded to bf16 (a
  constant error of up to 2^-8 on that channel's outputs). Taken only for ``K % 16 == 0``: measured
  here, other ``K`` give wrong results or crash the process.
* ``int8_codes_bf16``: the activations' integer codes exactly as ``int_mm`` computes them (every scheme
  ``int_mm`` runs), minus their zero point, as bf16 (``|q - z| <= 255``: integers up to 256 are exact in
  bf16) through ``aten._weight_int8pack_mm``: ``y = s_x s_w ((X_q - z_x) W_q^T) + b``. The op
  accumulates in fp32 and rounds its output to bf16, so one layer's result is the simulated layer's
  within bf16 rounding (relative 2^-9 per output, as ``int8_weight_bf16``); through a model the next
  layers' activation codes can flip, so outputs differ from the simulation by about its own
  quantization noise (MLP 1024-4096-4096-1024, ``w8a8``: 1.3 % from the simulation, 1.58 % from fp32
  where the simulation is 1.57 %). The fast path on CPUs without VNNI, where ``_int_mm`` is a
  reference loop. Taken only for ``K % 16 == 0``.
* ``int4_weight_bf16``: ``aten._weight_int4pack_mm_for_cpu`` (weight-only uint4, groups of 32..256,
  ``K % g == 0``, ``N % 16 == 0``); its dequantization is ``(q - 8) s + z_f`` so squeezer's
  ``(q - Z) S`` maps to ``s = S``, ``z_f = (8 - Z) S``; bf16 activations.
* ``dequant_matmul``: any format: unpack, reconstruct ``W^``, fake-quantize the activations as
  the scheme says and multiply in fp32 (no integer kernel; the report says so).

Each path states the formats it runs as name sets (``weights`` / ``activations``, names of
:mod:`squeezer.quant.formats`); ``eligible`` adds its shape conditions.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..quant.core import code_dtype, fake_quantize, uniform_qparams
from ..quant.formats import integer_types
from ..quant.spec import PerTensor, PerToken, QuantSpec
from .base import ONE_BYTE, CodeLayout, KernelPath, LinearProblem, available

INT8_CHANNEL = frozenset({"int8-channel"})
WEIGHT_ONLY = frozenset({"none"})
TOKEN_8BIT = frozenset(f"dynamic-token-{t}" for t in integer_types(8))
TENSOR_8BIT = frozenset(f"{mode}-tensor-{t}" for mode in ("dynamic", "static") for t in integer_types(8))


def _int8_codes(problem: LinearProblem) -> Tensor:
    """The int8 ``(N, K)`` codes: the weight's own ``data`` when it is held :class:`OneByte` (no copy)."""
    return problem.weight.codes().to(torch.int8).contiguous()


# The symmetric per-token int8 math of ``int_mm`` / ``int8_codes_bf16``, as TorchScript-compatible functions:
# the paths' ``run`` and the compiled recurrent step loops (``recurrent_loops``) call these same functions.


def symmetric_token_codes(x: Tensor) -> tuple[Tensor, Tensor]:
    """Codes and scales of ``x (m, K)`` float32, symmetric int8 per row: ``s_x = max(max_k |x_k| / 127, 1e-12)``
    ``(m, 1)`` and ``q = clamp(round(x / s_x), -127, 127)`` ``(m, K)``, integers held as float32."""
    s_x = (x.abs().amax(dim=1, keepdim=True) / 127).clamp_min(1e-12)
    return torch.clamp(torch.round(x / s_x), -127, 127), s_x


def int8_codes_bf16_product(q: Tensor, w: Tensor, ones: Tensor) -> Tensor:
    """``q W^T`` float32 ``(m, N)`` of integer codes ``q (m, K)`` (``|q| <= 256``: exact in bf16) and int8 ``w (N, K)``
    by ``aten._weight_int8pack_mm`` on bf16 codes with unit scales ``ones (N,)`` (fp32 sums, output rounded to bf16)."""
    return torch.ops.aten._weight_int8pack_mm(q.to(torch.bfloat16), w, ones).float()


def int_mm_product(q: Tensor, w_t: Tensor) -> Tensor:
    """``q W^T`` int32 ``(m, N)`` of int8 ``q (m, K)`` and ``w_t = W^T (K, N)`` by ``torch._int_mm``, which needs more
    than 16 rows: ``m <= 16`` rows are zero-padded to 17 and the product cut back to ``m``."""
    m = q.shape[0]
    if m <= 16:
        q = F.pad(q, [0, 0, 0, 17 - m])
    return torch._int_mm(q, w_t)[:m]


def rescale(y: Tensor, s_x: Tensor, scale: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``y s_x s_w + b`` in place on the float32 accumulator ``y (m, N)``: ``s_x (m, 1)``, ``s_w (1, N)``,
    ``b (N,)``."""
    y.mul_(s_x).mul_(scale)
    return y if bias is None else y.add_(bias)


class IntMM(KernelPath):
    name = "int_mm"
    weights = INT8_CHANNEL
    layout = ONE_BYTE
    activations = (TOKEN_8BIT - {"dynamic-token-uint8-sym"}) | TENSOR_8BIT

    @staticmethod
    def _calibrated(problem: LinearProblem) -> bool:
        """Static activations need their calibrated grid; dynamic ones are computed per call."""
        return problem.scheme.activation_mode != "static" or problem.act_qparams is not None

    def eligible(self, problem: LinearProblem, m: int) -> bool:
        return (self.supports(problem.format) and self._calibrated(problem) and available("_int_mm")
                and problem.in_features % 8 == 0)

    def prepare(self, problem: LinearProblem) -> dict[str, Any]:
        w = _int8_codes(problem)
        act = problem.scheme.activation
        # symmetric per token: s_x = max|x_row| / 127 inline; else squeezer's min-max parameters (per
        # tensor: static, or of this call's input; per token: of each row) with a zero point
        general = isinstance(act.granularity, PerTensor) or not act.symmetric
        state = {"w_t": w.t(), "scale": problem.weight.qparams.scale.float().reshape(1, -1),
                 "bias": problem.bias, "general": general}
        if general:
            static = problem.scheme.activation_mode == "static"
            state.update(act=act, act_qparams=problem.act_qparams if static else None,
                         per_row=isinstance(act.granularity, PerToken),
                         shift=0 if act.signed else 128,  # uint8 -> int8 codes
                         # int32: int64 products with the (m, N) accumulator are far slower on CPU
                         colsum=w.to(torch.int32).sum(dim=1, dtype=torch.int32))
        return state

    @staticmethod
    def _general_codes(state: dict[str, Any], x: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """int8 codes, scale ``(r, 1)`` and int8-shifted zero point ``(r, 1)`` (None when 0) of ``x (m, K)``,
        ``r = m`` per row or ``1`` per tensor, by :func:`uniform_qparams` as the simulated layer."""
        act, shift = state["act"], state["shift"]
        qp = state["act_qparams"]
        if qp is None:
            lo, hi = (x.amin(1, keepdim=True), x.amax(1, keepdim=True)) if state["per_row"] else (x.amin(), x.amax())
            qp = uniform_qparams(lo, hi, act)
        s_x = qp.scale.reshape(-1, 1)
        zero = None if qp.zero_point is None else qp.zero_point.reshape(-1, 1)
        q = torch.div(x, s_x).round_()  # one (m, K) buffer, updated in place
        if zero is not None:
            q.add_(zero)
        q.clamp_(act.qmin, act.qmax)
        if not shift:
            return q.to(torch.int8), s_x, zero
        x_zero = torch.full_like(s_x, -shift, dtype=torch.int32) if zero is None else zero - shift
        return q.sub_(shift).to(torch.int8), s_x, x_zero

    def run(self, state: dict[str, Any], x: Tensor) -> Tensor:
        x = x.float()
        x_zero = None
        if state["general"]:
            q, s_x, x_zero = self._general_codes(state, x)
        else:
            q, s_x = symmetric_token_codes(x)
            q = q.to(torch.int8)
        acc = int_mm_product(q, state["w_t"])
        if x_zero is not None:  # acc -= z (x) colsum: a rank-1 update in place, exact in int32
            acc.addr_(x_zero.reshape(-1).expand(x.shape[0]), state["colsum"], alpha=-1)
        # in place from here: each (m, N) temporary is a full pass over memory
        return rescale(acc.float(), s_x, state["scale"], state["bias"])


class FbgemmDynamic(KernelPath):
    name = "fbgemm_dynamic"
    OWN = "dynamic-tensor-uint8"  # fbgemm's own scheme: exactly uint8 asymmetric min-max over the input
    weights = INT8_CHANNEL
    activations = TOKEN_8BIT | {OWN}

    def eligible(self, problem: LinearProblem, m: int) -> bool:
        return (self.supports(problem.format) and (m == 1 or problem.format.activation == self.OWN)
                and "fbgemm" in torch.backends.quantized.supported_engines and torch.cpu._is_vnni_supported())

    def prepare(self, problem: LinearProblem) -> Any:
        w = _int8_codes(problem)
        scale = problem.weight.qparams.scale.double().reshape(-1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qw = torch._make_per_channel_quantized_tensor(w, scale, torch.zeros_like(scale, dtype=torch.long), 0)
            bias = None if problem.bias is None else problem.bias.detach().float()
            return torch.ops.quantized.linear_prepack(qw, bias)

    def run(self, state: Any, x: Tensor) -> Tensor:
        return torch.ops.quantized.linear_dynamic(x if x.dtype == torch.float32 else x.float(), state, False)

    def held(self, state: Any) -> list[Tensor]:
        """fbgemm's prepacked weight is opaque: counted as its unpacked int8 weight (same size) and bias."""
        return [t for t in torch.ops.quantized.linear_unpack(state) if t is not None]


class Int8WeightBF16(KernelPath):
    name = "int8_weight_bf16"
    weights = INT8_CHANNEL
    layout = ONE_BYTE
    activations = WEIGHT_ONLY

    def eligible(self, problem: LinearProblem, m: int) -> bool:
        return self.supports(problem.format) and problem.in_features % 16 == 0 and available("_weight_int8pack_mm")

    def prepare(self, problem: LinearProblem) -> dict[str, Any]:
        return {"w": _int8_codes(problem), "ones": torch.ones(problem.out_features, dtype=torch.bfloat16),
                "scale": problem.weight.qparams.scale.reshape(-1).float(), "bias": problem.bias}

    def run(self, state: dict[str, Any], x: Tensor) -> Tensor:
        y = torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), state["w"], state["ones"]).float()
        # scale and bias in one op: no more calls than a bias add alone
        return y.mul_(state["scale"]) if state["bias"] is None else torch.addcmul(state["bias"], y, state["scale"])


class Int8CodesBF16(IntMM):
    name = "int8_codes_bf16"

    def eligible(self, problem: LinearProblem, m: int) -> bool:
        return (self.supports(problem.format) and self._calibrated(problem) and problem.in_features % 16 == 0
                and available("_weight_int8pack_mm"))

    def prepare(self, problem: LinearProblem) -> dict[str, Any]:
        state = super().prepare(problem)
        state.update(w=state["w_t"].t(), ones=torch.ones(problem.out_features, dtype=torch.bfloat16))
        return state

    def run(self, state: dict[str, Any], x: Tensor) -> Tensor:
        x = x.float()
        if state["general"]:
            q, s_x, x_zero = self._general_codes(state, x)
            if x_zero is not None:  # q - z in [-255, 255]: exact in bf16
                q = q.float().sub_(x_zero)
        else:
            q, s_x = symmetric_token_codes(x)
        return rescale(int8_codes_bf16_product(q, state["w"], state["ones"]), s_x, state["scale"], state["bias"])


def _int4pack(codes: Tensor) -> Tensor:
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 2)


class Int4Cpu(CodeLayout):
    """``aten._convert_weight_to_int4pack_for_cpu``'s uint8 ``(N, K / 2)`` (read on this torch build): rows in
    blocks of ``B`` (``B``: 32 with AVX2, 64 with AVX-512); per block and column ``k``, ``B / 2`` bytes whose low
    nibbles are rows ``0 .. B/2 - 1`` and high nibbles rows ``B/2 .. B - 1``; the last ``N mod B`` rows two per
    byte (low nibble first) per ``k``. ``hold`` writes that layout itself (a few byte passes, no int32 copy of the
    codes); the layout moves codes by position only, so ``hold`` checks it once per ``(N mod 64, K)`` on random
    codes of ``(128 + N mod 64, K)`` (same tails, same ``K``): the first ``B`` whose layout is byte for byte the
    kernel's and whose inverse returns the codes exactly, and holds nothing (None) where no ``B`` does."""

    name = "int4_cpu"
    BLOCKS = (32, 64)

    def __init__(self) -> None:
        self._blocks: dict[tuple[int, int], int | None] = {}

    def _block(self, n: int, k: int) -> int | None:
        key = (n % 64, k)
        if key not in self._blocks:
            probe = torch.randint(0, 16, (128 + key[0], k), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
            data = _int4pack(probe)
            self._blocks[key] = next((b for b in self.BLOCKS if torch.equal(self._pack(probe, b), data)
                                      and torch.equal(self._unpack(data, probe.shape, b), probe)), None)
        return self._blocks[key]

    def hold(self, codes: Tensor, spec: QuantSpec) -> Tensor | None:
        if spec.is_codebook or spec.bits != 4 or spec.qmin != 0 or codes.dim() != 2 or codes.shape[0] % 2:
            return None
        block = self._block(*codes.shape)
        return None if block is None else self._pack(codes.to(torch.uint8), block)

    def codes(self, data: Tensor, spec: QuantSpec, shape: tuple[int, ...]) -> Tensor:
        return self._unpack(data, shape, self._block(*shape)).to(code_dtype(spec))

    @staticmethod
    def _pack(codes: Tensor, block: int) -> Tensor:
        """The layout of uint8 codes ``(N, K)`` (values 0..15) for row blocks of ``block``: ``(N, K / 2)`` uint8."""
        n, k = codes.shape
        full = n // block * block
        head = codes[:full].reshape(n // block, 2, block // 2, k)
        body = (head[:, 0] | (head[:, 1] << 4)).transpose(1, 2).reshape(-1)  # (n / B, k, B / 2)
        if full == n:
            return body.reshape(n, k // 2)
        tail = codes[full:].t().reshape(k, (n - full) // 2, 2)
        return torch.cat((body, (tail[..., 0] | (tail[..., 1] << 4)).reshape(-1))).reshape(n, k // 2)

    @staticmethod
    def _unpack(data: Tensor, shape: tuple[int, ...], block: int) -> Tensor:
        """uint8 codes ``(N, K)`` of ``data`` for row blocks of ``block``."""
        (n, k), flat = shape, data.reshape(-1)
        full = n // block * block
        head = flat[: full * k // 2].reshape(n // block, k, block // 2)
        rows = torch.cat((head & 15, head >> 4), dim=2).transpose(1, 2).reshape(full, k)
        if full == n:
            return rows
        tail = flat[full * k // 2:].reshape(k, (n - full) // 2)
        return torch.cat((rows, torch.stack((tail & 15, tail >> 4), -1).reshape(k, n - full).t()))


INT4_CPU = Int4Cpu()


class Int4WeightBF16(KernelPath):
    name = "int4_weight_bf16"
    GROUPS = (32, 64, 128, 256)
    layout = INT4_CPU
    weights = frozenset({"uint4-group"})
    activations = WEIGHT_ONLY

    def eligible(self, problem: LinearProblem, m: int) -> bool:
        if not self.supports(problem.format):
            return False
        size = problem.weight.spec.granularity.size
        return (size in self.GROUPS and problem.in_features % size == 0 and problem.out_features % 16 == 0
                and available("_weight_int4pack_mm_for_cpu"))

    def prepare(self, problem: LinearProblem) -> dict[str, Any]:
        weight = problem.weight
        packed = weight.data if weight.layout is INT4_CPU else _int4pack(weight.codes())
        qp = weight.qparams
        scale = qp.scale.float()                        # (N, K / g)
        zero = (8 - qp.zero_point.float()) * scale      # float zero of the (q - 8) s + z form
        scales_zeros = torch.stack([scale.t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous()
        return {"w": packed, "group": weight.spec.granularity.size, "sz": scales_zeros, "bias": problem.bias}

    def run(self, state: dict[str, Any], x: Tensor) -> Tensor:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), state["w"], state["group"], state["sz"])
        y = y.float()
        return y if state["bias"] is None else y + state["bias"]


class DequantMatmul(KernelPath):
    name = "dequant_matmul"
    integer = False
    note = "no integer kernel for this format/shape: weights are unpacked and multiplied in fp32"

    def eligible(self, problem: LinearProblem, m: int) -> bool:
        return True

    def prepare(self, problem: LinearProblem) -> LinearProblem:
        return problem

    def run(self, state: LinearProblem, x: Tensor) -> Tensor:
        scheme = state.scheme
        x = x.float()
        if scheme.activation_mode == "dynamic":
            x = fake_quantize(x, scheme.activation)
        elif scheme.activation_mode == "static":
            x = fake_quantize(x, scheme.activation, state.act_qparams)
        return F.linear(x, state.weight.dequantize(), state.bias)


PATHS: tuple[KernelPath, ...] = (IntMM(), FbgemmDynamic(), Int8WeightBF16(), Int8CodesBF16(), Int4WeightBF16(),
                                 DequantMatmul())
"""Every linear path, in order of preference when timings tie."""

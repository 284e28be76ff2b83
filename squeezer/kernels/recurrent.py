"""Packed runtime of a quantized LSTM / GRU / RNN: every weight matrix a :class:`PackedLinear` on integer kernels.

The recurrence is :func:`squeezer.modules.recurrent_steps.run_recurrent`'s step loop, the same one the simulated
layer runs; this runtime is its :class:`StepOps` with the matrix products on packed codes:

* ``input_projection(key, X)``: ``X W_ih^T + b_ih`` for every time step at once, ``X (N, in)``, ``N = T B`` rows
  (or the data of a packed sequence): one call of ``weight_ih_{key}``'s runtime, in the large-rows buckets;
* ``hidden_projection(key, h)``: ``h_{t-1} W_hh^T + b_hh``, ``h (B, H_out)``, once per step: the small-rows
  buckets (int8 / int4 weight-only kernels, or int8 activation codes of ``h_{t-1}`` for ``w8a8``);
* ``output_projection(key, h)``: ``h W_hr^T`` (LSTM with ``proj_size``).

Each matrix is its own linear problem (the layer's scheme with the matrix's weight spec, its codes and bias;
static activations carry the grid of the state the matrix multiplies: ``x``, ``h`` or ``m``), so the kernel rule
of :mod:`squeezer.kernels.select` chooses per matrix and rows bucket, and a matrix no integer kernel runs falls
back to ``dequant_matmul``, said in the pack report. The matrices' runtimes are looked up by key once, before
any step runs.

States (:meth:`squeezer.modules.recurrent.QuantRecurrent.quantize_state`, the simulated layer's hooks): a state
whose only use is a weight product (``x``, ``m``, and ``h`` except in a GRU, whose update ``z h_{t-1}`` reads
it too) is quantized by that product's kernel (``w8a8``: ``x`` per token for all steps at once, ``h_{t-1}`` at
each step; the codes go to the int8 kernel), so its hook is not run twice. The other hooks run as in
simulation: a GRU's ``h_{t-1}`` (its kernel quantizes the already quantized value again: the same codes, the
dynamic grid re-derived from ``fq(h)``, equal up to float rounding: 1e-8 relative in the tests) and,
for ``w8a8-static``, the int16 grids of ``gates``, ``candidate`` and ``c``, fake-quantized in fp32: the
elementwise gate arithmetic runs in fp32 on the states' integer grids, not on integer kernels.

Compiled loops: where :mod:`squeezer.kernels.recurrent_loops` reproduces a direction's Python loop op for op
(``w8a8``: an LSTM without ``proj_size`` or a GRU, ``W_hh`` at the batch's rows bucket on ``int8_codes_bf16`` or
``int_mm``), :meth:`PackedRecurrent.compiled_loop` gives ``run_recurrent`` that TorchScript loop, the same
kernels and results bit for bit without the Python dispatch of each step's ~20 small ops (a packed sequence
whose batch shrinks, and every other scheme, run the Python loop).

Kernel names: :meth:`PackedRecurrent.describe` lists ``{"<matrix> <bucket>": path}``, matrices in torch's
order; a pin of the layer (:func:`squeezer.pack`'s ``kernels``) is one path name for every matrix and bucket,
or that list of names (what :func:`squeezer.kernels.packed_kernels` returns), spread by :func:`matrix_pins`.

Weight-only layers have a second runtime, :class:`FusedRecurrent` (kernel name :data:`FUSED`,
``dequant_fused``): it holds the same packed codes, unpacks them to fp32 matrices at each call,
``W^ = dequantize(codes)``, and runs torch's own fused recurrence on them (``_VF.lstm`` / ``gru`` / ``rnn_*``
through the layer's ``_run``, the path weight-only simulation runs on ``fq(W)``): no integer kernel, but
no Python step loop either. :func:`fused_recurrence` is the rule, deterministic, no timing: a layer whose
scheme quantizes no state runs :class:`FusedRecurrent`, any other the step loop; a pin of ``dequant_fused``
selects it (refused for a layer that quantizes its states), any other pin the step loop. Measured on a
2-core AVX2 EPYC without VNNI under heavy load (``python bench/recurrent_kernels.py --seconds 5``, one LSTM
layer, input 128, hidden 128 / 256, 50 steps, one thread, every path in the same rounds, median per-round
ratio to torch's fp32 LSTM): ``dequant_fused`` w8 / w4g128 ran at 1.5 / 2.1x (batch 1, hidden 128), 1.1 /
1.2x (batch 1, hidden 256), 0.8-1.0x (batch 64); the step loop on the int8 / int4 weight-only kernels at
40 / 43x, 3.0 / 3.2x and 2.6-3.4x: unpacking the ``G H (in + H_out)`` codes once per call cost less than
the ``T`` Python steps at every size measured.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError
from ..modules.recurrent import QuantRecurrent
from ..modules.recurrent_steps import DirectionLoop, cell_kind, run_recurrent
from ..quant.core import QTensor
from ..quant.packing import code_offset
from ..quant.spec import PerChannel, PerGroup, PerTensor
from .base import LinearProblem, PackedWeight
from .recurrent_loops import HiddenKernel, gru_loop, hidden_kernel, lstm_loop
from .runtime import PackedLinear
from .select import BUCKETS, bucket_label, bucket_of

LinearBuilder = Callable[[str, LinearProblem], tuple[PackedLinear, "str | None"]]
"""``(name, problem) -> (runtime, warning)``: :meth:`squeezer.kernels.pack.PackContext.linear`."""


FUSED = "dequant_fused"
"""Kernel name of :class:`FusedRecurrent`: codes unpacked per call into torch's fused recurrence."""
FUSED_NOTE = "no integer kernel: codes unpacked to fp32 per call into torch's fused recurrence"
"""The pack report's warning for a layer that runs :class:`FusedRecurrent`."""

MULTIPLIES = {"ih": "x", "hh": "h", "hr": "m"}
"""A matrix's kind -> the state it multiplies (whose static grid its linear problem carries)."""


def kernel_quantized(kind: str) -> frozenset[str]:
    """The states of cell kind ``kind`` whose only use is a weight product: its kernel quantizes them."""
    return frozenset({"x", "m"} if kind == "GRU" else {"x", "h", "m"})


def matrix_key(matrix: str) -> tuple[str, str]:
    """``weight_hh_l1_reverse`` -> ``("hh", "l1_reverse")``: the matrix's kind and its layer / direction key."""
    _, kind, key = matrix.split("_", 2)
    return kind, key


def matrix_pins(name: str, matrices: Sequence[str], pin: str | Sequence[str] | None) -> dict[str, str | list[str]]:
    """The pin of recurrent layer ``name`` as one pin per matrix (``"<name>.<matrix>"``): a path name for all, or a
    list of ``len(matrices) * len(BUCKETS)`` names, one per matrix and bucket as :meth:`PackedRecurrent.describe`
    lists them."""
    if pin is None:
        return {}
    if isinstance(pin, str):
        return {f"{name}.{m}": pin for m in matrices}
    n = len(BUCKETS)
    if len(pin) != n * len(matrices):
        raise ConfigError(f"kernels[{name!r}] must be a path name or a list of {n * len(matrices)} ({len(matrices)} "
                          f"matrices x {n} rows buckets, as packed_kernels lists them), got {len(pin)} names")
    return {f"{name}.{m}": list(pin[i * n:(i + 1) * n]) for i, m in enumerate(matrices)}


def fused_recurrence(name: str, layer: QuantRecurrent, pin: str | Sequence[str] | None) -> bool:
    """Whether layer ``name`` runs :class:`FusedRecurrent` (module docstring): pinned ``dequant_fused``, else
    unpinned and weight-only. :class:`ConfigError` for ``dequant_fused`` pinned on a layer that quantizes its
    states, or in a list (it runs the whole layer: one name)."""
    if pin is None:
        return not layer.quantized_states
    if isinstance(pin, str) and pin != FUSED or not isinstance(pin, str) and FUSED not in pin:
        return False
    if not isinstance(pin, str):
        raise ConfigError(f"kernels[{name!r}]: {FUSED!r} runs the whole layer: pin it as one name, not in a list")
    if layer.quantized_states:
        raise ConfigError(f"kernels[{name!r}]: {FUSED!r} runs float states, but the layer's scheme quantizes "
                          f"{', '.join(layer.quantized_states)}: pin an integer path or let the rule choose")
    return True


def matrix_problem(layer: QuantRecurrent, matrix: str, qt: QTensor) -> LinearProblem:
    """The linear problem of one matrix: its codes, its bias (``b_ih`` / ``b_hh``; ``W_hr`` has none) and the layer's
    scheme with the matrix's own weight spec; weight-only when the layer does not quantize the state the matrix
    multiplies (dynamic activations leave ``m`` float), and for static activations that state's grid."""
    kind, key = matrix_key(matrix)
    state = MULTIPLIES[kind]
    bias = getattr(layer, f"bias_{kind}_{key}", None) if layer.bias and kind != "hr" else None
    scheme, grid = replace(layer.scheme, weight=qt.spec), None
    if state not in layer.quantized_states:
        scheme = replace(scheme, activation=None, activation_mode="none")
    elif scheme.activation_mode == "static":
        grid = layer.state_qparams[key][state]
    return LinearProblem(PackedWeight.from_qtensor(qt), None if bias is None else bias.detach(), scheme, grid)


@dataclass
class PackedRecurrent:
    """The runtime of a packed recurrent layer, called as the layer: ``(input, hx=None) -> (output, h_n)``
    (LSTM: ``(output, (h_n, c_n))``), every option of the torch layer."""

    layer: QuantRecurrent
    linears: dict[str, PackedLinear]  # matrix name -> its runtime, torch's order

    @classmethod
    def build(cls, name: str, layer: QuantRecurrent, linear: LinearBuilder) -> tuple["PackedRecurrent", str | None]:
        """Each matrix's runtime from ``linear(f"{name}.{matrix}", problem)``, and a warning naming the matrices
        that no integer kernel runs."""
        linears: dict[str, PackedLinear] = {}
        notes: dict[str, str] = {}
        for matrix, qt in layer.matrix_qtensors().items():
            linears[matrix], note = linear(f"{name}.{matrix}", matrix_problem(layer, matrix, qt))
            if note is not None:
                notes[matrix] = note
        warning = "; ".join(f"{', '.join(m for m in notes if notes[m] == note)}: {note}"
                            for note in dict.fromkeys(notes.values()))
        return cls(layer, linears), warning or None

    def __post_init__(self) -> None:
        by_kind: dict[str, dict[str, PackedLinear]] = {"ih": {}, "hh": {}, "hr": {}}
        for matrix, runtime in self.linears.items():
            kind, key = matrix_key(matrix)
            by_kind[kind][key] = runtime
        self._ih, self._hh, self._hr = by_kind["ih"], by_kind["hh"], by_kind["hr"]
        self._hooked = frozenset(self.layer.quantized_states) - kernel_quantized(cell_kind(self.layer))
        self._quantize_state = self.layer.quantize_state
        self._loops = self._compiled_loops()

    def _compiled_loops(self) -> dict[tuple[str, int], DirectionLoop]:
        """``(key, bucket) -> loop``: :mod:`~squeezer.kernels.recurrent_loops`' compiled loop where it computes
        what the Python loop computes: an LSTM without ``proj_size`` or a GRU, dynamic activations, ``W_hh``'s
        path at the bucket one of its kernels (:func:`hidden_kernel`)."""
        kind, layer = cell_kind(self.layer), self.layer
        if kind not in ("LSTM", "GRU") or layer.proj_size or layer.scheme.activation_mode != "dynamic":
            return {}
        loops: dict[tuple[str, int], DirectionLoop] = {}
        for key, runtime in self._hh.items():
            for bucket in range(len(BUCKETS)):
                hk = hidden_kernel(runtime, bucket)
                if hk is not None:
                    loops[key, bucket] = _lstm_direction(hk) if kind == "LSTM" else _gru_direction(hk)
        return loops

    def compiled_loop(self, key: str, batch: int, dtype: torch.dtype = torch.float32) -> DirectionLoop | None:
        """The compiled loop of direction ``key`` at ``batch`` rows of ``dtype``, or None (the Python loop runs;
        the compiled loops hold fp32 states, as the kernels compute)."""
        return self._loops.get((key, bucket_of(batch))) if dtype == torch.float32 else None

    # ------------------------------------------------------------------ StepOps
    def input_projection(self, key: str, x: Tensor) -> Tensor:
        """``X W_ih^T + b_ih``: ``(N, in) -> (N, G H)``, every time step in one call."""
        return self._ih[key](x)

    def hidden_projection(self, key: str, h: Tensor) -> Tensor:
        """``h W_hh^T + b_hh``: ``(B, H_out) -> (B, G H)``."""
        return self._hh[key](h)

    def output_projection(self, key: str, h: Tensor) -> Tensor:
        """``h W_hr^T``: ``(B, H) -> (B, P)``."""
        return self._hr[key](h)

    def state(self, name: str, key: str, t: Tensor) -> Tensor:
        """The simulated layer's hook, except for the states the kernels quantize (module docstring)."""
        return self._quantize_state(name, key, t) if name in self._hooked else t

    # ------------------------------------------------------------------ runtime
    def __call__(self, input: Any, hx: Any = None) -> Any:
        return run_recurrent(self.layer, self, input, hx, self.compiled_loop if self._loops else None)

    @property
    def weights(self) -> dict[str, PackedWeight]:
        """Matrix name -> its packed codes."""
        return {matrix: runtime.weight for matrix, runtime in self.linears.items()}

    def matrix_qtensors(self) -> dict[str, QTensor]:
        """Matrix name -> its integer codes (what saving reads)."""
        return {matrix: w.qtensor() for matrix, w in self.weights.items()}

    def describe(self) -> dict[str, str]:
        """``{"<matrix> <bucket>": path}``, matrices in torch's order, buckets within."""
        return {f"{matrix} {bucket_label(b)}": path for matrix, runtime in self.linears.items()
                for b, path in enumerate(runtime.choice)}

    def nbytes(self) -> int:
        return sum(runtime.nbytes() for runtime in self.linears.values())


def _lstm_direction(hk: HiddenKernel) -> DirectionLoop:
    return lambda x, h, c, reverse: lstm_loop(hk, x, h, c, reverse)


def _gru_direction(hk: HiddenKernel) -> DirectionLoop:
    return lambda x, h, c, reverse: (*gru_loop(hk, x, h, reverse), None)


def unpacker(weight: PackedWeight) -> Callable[[], Tensor]:
    """``() -> W^`` (fp32, ``weight.shape``), equal to ``weight.dequantize()`` bit for bit. Uniform 8- / 4-bit codes
    whose blocks are whole rows of the codes (per tensor, per output row, groups that divide ``K``) take the fast
    path, ``W^ = (u + (offset - z)) s`` on the stored bytes ``u`` (``q = u + offset``, ``(q - z) s`` with the
    integers exact in fp32), blocks ``(B, n / B)``: one conversion, one add, one multiply; others unpack generically."""
    spec, qp, shape = weight.spec, weight.qparams, weight.shape
    g = spec.granularity
    rows_blocks = isinstance(g, PerTensor) or isinstance(g, PerChannel) and g.axis in (0, -2) or \
        isinstance(g, PerGroup) and shape[-1] % g.size == 0
    if spec.mapping != "uniform" or spec.bits not in (4, 8) or not rows_blocks or len(shape) != 2:
        return weight.dequantize
    blocks = qp.scale.numel()
    scale = qp.scale.reshape(blocks, 1).float()
    zero = 0 if qp.zero_point is None else qp.zero_point.reshape(blocks, 1).float()
    shift = code_offset(spec) - zero + torch.zeros(blocks, 1)
    n = shape[0] * shape[1]
    packed = weight.packed
    if spec.bits == 8:
        return lambda: packed[:n].reshape(blocks, -1).float().add_(shift).mul_(scale).reshape(shape)
    return lambda: torch.stack((packed & 15, packed >> 4), -1).reshape(-1)[:n].reshape(blocks, -1).float() \
        .add_(shift).mul_(scale).reshape(shape)


@dataclass
class FusedRecurrent:
    """The runtime of a packed weight-only recurrent layer, called as the layer: ``(input, hx=None) -> (output,
    h_n)``; each call unpacks every matrix, ``W^ = dequantize(codes)`` (fp32), and runs torch's fused recurrence
    on them (module docstring)."""

    layer: QuantRecurrent
    weights: dict[str, PackedWeight]  # matrix name -> its packed codes, torch's order

    @classmethod
    def build(cls, layer: QuantRecurrent) -> tuple["FusedRecurrent", str]:
        """The layer's codes, packed, and the pack report's warning (:data:`FUSED_NOTE`)."""
        return cls(layer, {m: PackedWeight.from_qtensor(qt) for m, qt in layer.matrix_qtensors().items()}), FUSED_NOTE

    def __post_init__(self) -> None:
        self._unpack = [(matrix, unpacker(w)) for matrix, w in self.weights.items()]

    def __call__(self, input: Any, hx: Any = None) -> Any:
        return self.layer._run({matrix: unpack() for matrix, unpack in self._unpack}, input, hx)

    def matrix_qtensors(self) -> dict[str, QTensor]:
        """Matrix name -> its integer codes (what saving reads)."""
        return {matrix: w.qtensor() for matrix, w in self.weights.items()}

    def describe(self) -> dict[str, str]:
        """``{"<matrix> <bucket>": "dequant_fused"}``, the form of :meth:`PackedRecurrent.describe`."""
        return {f"{matrix} {bucket_label(b)}": FUSED for matrix in self.weights for b in range(len(BUCKETS))}

    def nbytes(self) -> int:
        return sum(w.nbytes for w in self.weights.values())

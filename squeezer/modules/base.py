"""`QuantMixin`: what every quantized layer shares.

A quantized layer keeps its :class:`LayerScheme` (``layer.scheme``: weight / activation specs, activation
mode, observer), its float ``weight`` (so QAT can keep training it), the weight's :class:`QParams`, and
optionally an activation quantizer. It runs in one of four modes:

* ``float``:    the original layer's function (for references and A/B comparisons);
* ``observe``:  float compute, while the activation observer records the input range;
* ``simulate``: ``y = op(fq_a(x), fq_w(W))`` with fake quantization (STE gradients);
* ``compare``:  returns the float output and accumulates the error of the simulated one;
* ``packed``:   the float weight is gone; a runtime installed by :func:`squeezer.pack` (real
  integer kernels on bit-packed weights) computes the output.

Quantization-aware training (:mod:`squeezer.qat`) may install trainable fake-quantizers as the
child modules ``weight_fake_quant`` / ``act_fake_quant`` (learned step sizes); while present they
replace the fixed-parameter ``fq_w`` / ``fq_a``, and ``squeezer.qat.convert`` folds them back
into ``weight_qparams`` / ``act_qparams``.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from ..quant.core import QParams, compute_qparams, fake_quantize, quantize, rows_qparams
from ..quant.metrics import ErrorAccumulator, ErrorStats
from ..quant.observers import Observer, make_observer
from ..quant.rotation import hadamard, rotate
from ..quant.scheme import LayerScheme
from ..quant.spec import PerChannel, PerToken, QuantSpec

Mode = Literal["float", "observe", "simulate", "compare", "packed"]


class QuantMixin:
    """Mixed into a subclass of a torch layer; the subclass defines ``_op(x, weight)``."""

    weight: torch.nn.Parameter
    token_axis_is_last: bool = True

    def _init_quant(self, scheme: LayerScheme) -> None:
        self.scheme = scheme
        self.mode: Mode = "simulate"
        self.weight_qparams: QParams | None = None
        self.act_observer: Observer | None = None
        self.act_qparams: QParams | None = None
        self.output_error = ErrorAccumulator()
        self._wq_cache: tuple[int, Tensor | None] | None = None  # (weight version, fq(W) or None: W itself)
        self.runtime: Any = None
        self.register_buffer("input_scale", None)
        self.input_rotation = 1  # Hadamard block size of the input (1: none), see squeezer.quant.rotation
        self.weight_error: ErrorStats | None = None  # set by an algorithm that rewrote the weight
        self.reset_observer()

    @property
    def weight_spec(self) -> QuantSpec:
        return self.scheme.weight

    @property
    def act_spec(self) -> QuantSpec | None:
        if self.scheme.activation is None:
            return None
        spec = self.scheme.activation
        if isinstance(spec.granularity, PerToken) and not self.token_axis_is_last:
            # A "token" of a convolution is one sample: one scale per batch element.
            return QuantSpec(**{**spec.to_dict(), "granularity": PerChannel(0)})
        return spec

    def calibrate_weight(self, qparams: QParams | None = None) -> None:
        """Fix the weight's parameters: given (by an algorithm) or round-to-nearest from the weight."""
        self.weight_qparams = qparams if qparams is not None else compute_qparams(self.weight, self.weight_spec)
        self._wq_cache = None

    def ensured_weight_qparams(self) -> QParams:
        """The weight's parameters; round-to-nearest from the weight when none were fixed yet."""
        if self.weight_qparams is None:
            self.calibrate_weight()
        return self.weight_qparams

    def set_quantized(self, weight: Tensor, qparams: QParams) -> None:
        """Adopt an algorithm's result: ``quantize(weight, qparams)`` gives the chosen codes."""
        with torch.no_grad():
            self.weight.copy_(weight.to(self.weight.dtype).reshape(self.weight.shape))
        self.calibrate_weight(qparams)

    def rotation_matrix(self) -> Tensor | None:
        """``H_b`` of the input rotation (``b = input_rotation``), or None."""
        return None if self.input_rotation <= 1 else hadamard(self.input_rotation)

    def effective_weight(self) -> Tensor:
        """The float weight the layer applies to its raw input: ``rotate(fq(W) diag(input_scale))`` (rows of
        the weight rotated back along the input dimension when the input is rotated)."""
        w = self.quantized_weight().detach()
        if self.input_scale is not None:
            w = w * self.input_scale.reshape(1, -1, *[1] * (w.dim() - 2))
        h = self.rotation_matrix()
        return w if h is None else rotate(w, h)

    def measured_weight_error(self) -> ErrorStats:
        """The error of the applied weight against the float one: an algorithm's (``weight_error``, against
        the float weight it replaced), else ``fq(W)`` vs ``W``, fake-quantized in blocks of ~1M weights where
        each row's parameters are its own (no full-size copy of, e.g., a big embedding table)."""
        if self.weight_error is not None:
            return self.weight_error
        w = self.weight.detach()
        qp, g = self.ensured_weight_qparams(), self.weight_spec.granularity
        if w.dim() != 2 or "weight_fake_quant" in self._modules or rows_qparams(qp, g, torch.arange(1)) is None:
            return ErrorStats.between(w, self.quantized_weight().detach())
        step = max(1, 2**20 // max(w.shape[1], 1))
        blocks = (torch.arange(lo, min(lo + step, w.shape[0])) for lo in range(0, w.shape[0], step))
        return ErrorStats.over_blocks((w[r], fake_quantize(w[r], self.weight_spec, rows_qparams(qp, g, r)))
                                      for r in blocks)

    def reset_observer(self) -> None:
        """A fresh activation observer (static mode), forgetting what was observed so far."""
        if self.scheme.activation_mode == "static":
            self.act_observer = make_observer(self.scheme.observer, self.scheme.activation)

    def freeze_activation(self) -> None:
        """Turn the observed input range into fixed activation parameters (static mode)."""
        if self.act_observer is not None:
            self.act_qparams = self.act_observer.qparams()

    @property
    def activations_calibrated(self) -> bool:
        """Whether every grid the activations need is fixed: always, except static ones before calibration."""
        return self.scheme.activation_mode != "static" or self.act_qparams is not None

    @property
    def is_packed(self) -> bool:
        return self.runtime is not None

    def install_runtime(self, runtime: Any) -> None:
        """Switch to ``packed`` mode: ``runtime(x)`` computes the output; the float weight is freed."""
        self.runtime = runtime
        self.register_parameter("weight", None)
        self._wq_cache = None
        self.mode = "packed"
        self.forward = runtime  # the hot path: nn.Module.__call__ goes straight to the kernel

    def quantized_weight(self) -> Tensor:
        """``fq(W)``; cached while the weight is unchanged and no gradient is needed (a weight that
        already equals ``fq(W)``, e.g. after GPTQ / AdaRound / HQQ, is returned itself)."""
        if self.is_packed:
            return self.runtime.weight.dequantize()
        learned = self._modules.get("weight_fake_quant")
        if learned is not None:
            return learned(self.weight)
        qparams = self.ensured_weight_qparams()
        if self.weight.requires_grad and torch.is_grad_enabled():
            return fake_quantize(self.weight, self.weight_spec, qparams)
        version = self.weight._version
        if self._wq_cache is None or self._wq_cache[0] != version:
            fq = fake_quantize(self.weight.detach(), self.weight_spec, qparams)
            # A weight already on its grid (an algorithm's W^) is its own fq(W): no second copy.
            self._wq_cache = (version, None if torch.equal(fq, self.weight) else fq)
        cached = self._wq_cache[1]
        return self.weight.detach() if cached is None else cached

    def weight_qtensor(self):
        """The integer codes of the weight (``QTensor``)."""
        if self.is_packed:
            return self.runtime.weight.qtensor()
        return quantize(self.weight.detach(), self.weight_spec, self.ensured_weight_qparams())

    def weight_qtensors(self) -> dict[str, Any]:
        """The integer codes (``QTensor``) of each quantized parameter by its name in the layer: ``weight``."""
        return {"weight": self.weight_qtensor()}

    def quantize_input(self, x: Tensor) -> Tensor:
        spec = self.act_spec
        if spec is None or not x.is_floating_point():
            return x
        learned = self._modules.get("act_fake_quant")
        if learned is not None:
            return learned(x)
        if self.scheme.activation_mode == "dynamic":
            return fake_quantize(x, spec)
        if self.act_qparams is None:
            raise RuntimeError(f"{type(self).__name__}: static activations need calibration data before use")
        return fake_quantize(x, spec, self.act_qparams)

    def smooth(self, x: Tensor) -> Tensor:
        """The input as the weight sees it: ``rotate(x) * input_scale``. An algorithm may have rotated the
        weight's input dimension (``W <- rotate(W)``, Hadamard) and moved a per-input-channel factor ``s``
        into it (``W <- W diag(s)``, ``input_scale = 1 / s``: SmoothQuant, AWQ); the float function is unchanged."""
        h = self.rotation_matrix()
        if h is not None:
            x = rotate(x, h)
        return x if self.input_scale is None else x * self.input_scale

    def forward(self, x: Tensor) -> Tensor:
        x = self.smooth(x)
        if self.mode == "float":
            return self._op(x, self.weight)
        if self.mode == "observe":
            if self.act_observer is not None:
                self.act_observer.update(x)
            return self._op(x, self.weight)
        quantized = self._simulate(x)
        if self.mode == "simulate":
            return quantized
        reference = self._op(x, self.weight)
        if self.weight_error is None:  # else the float weight is the algorithm's choice: measured by the pipeline
            self.output_error.update(reference, quantized)
        return reference

    def _simulate(self, x: Tensor) -> Tensor:
        """``op(fq_a(x), fq_w(W))`` on the (smoothed) input."""
        return self._op(self.quantize_input(x), self.quantized_weight())

    def _op(self, x: Tensor, weight: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def extra_repr(self) -> str:  # type: ignore[override]
        base = super().extra_repr()  # type: ignore[misc]
        act = "" if self.act_spec is None else f", act={self.act_spec.describe()} {self.scheme.activation_mode}"
        return f"{base}, weight={self.weight_spec.describe()}{act}, mode={self.mode}"

"""Quantization-aware training: `prepare_qat` before training, `convert` after.

Both follow :mod:`squeezer.transform`: they return a new model unless ``inplace=True``.
``prepare_qat`` runs :func:`squeezer.quantize` (swap, RTN, weight algorithm,
activation calibration) and leaves the layers in ``simulate`` mode with trainable float weights,
so ``y = op(fq_a(x), fq_w(W))`` trains with straight-through gradients. Options:

* ``learnable_scales``: uniform weight step sizes (and static activation step sizes) become
  ``nn.Parameter`` s trained with the LSQ gradient (:mod:`squeezer.qat.lsq`); codebook mappings
  (log2, k-means, binary, ternary, ...) keep their fixed parameters.
* Ranges that are not learned follow the weights and data while training, until
  ``freeze_observers_after`` steps (never frozen when None; 0 keeps the calibrated ranges, e.g. a
  clipping search's): uniform weight parameters are re-fitted by the spec's round-to-nearest rule
  (min / max per block) to the current weights at every step, so no weight is stuck outside a
  stale grid; static activation ranges follow an exponential moving average of each batch's
  range, ``lo <- 0.9 lo + 0.1 min(x)`` (same for ``hi``), from the calibrated range. Learned
  activation step sizes stop training after that many steps instead.
* Recurrent layers (LSTM / GRU / RNN) train every weight matrix through the recurrence, each on its own
  grid: straight-through ``fq_w`` per matrix, a learned step size per matrix block with
  ``learnable_scales`` (the layer's ``matrix_fake_quant``), else its range re-fitted like any weight.
  Their static state grids (``state_qparams``: input, hidden and cell state, gates, ...) each follow their
  own state, with or without ``learnable_scales``: at each training step the float step loop runs once more
  (no gradient) under fresh min-max :class:`StateObservers`, and each grid's range takes the same moving
  average of that batch's range (the cell state's scale kept a power of two).
* ``freeze_bn_after``: after that many steps every BatchNorm layer is kept in eval mode
  (running statistics fixed), even when the model is put back in train mode.

A *step* is one forward pass of the whole model in training mode with gradients enabled, so
any training loop drives the schedule; ``model.squeezer_qat.steps`` counts them (the prepared
model's training state, not a report: ``convert`` removes it).

``convert`` writes the learned step sizes into ordinary ``weight_qparams`` / ``act_qparams`` and
removes the QAT machinery: afterwards ``squeezer.pack`` / ``save`` / ``export_onnx`` work as
after post-training quantization (they read the fixed parameters, so call ``convert`` first).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..api import quantize
from ..calibration import Batch
from ..config import QuantConfig
from ..errors import ConfigError, ModelError
from ..transform import working_copy
from ..modules import quant_layers
from ..modules.base import QuantMixin
from ..modules.recurrent import QuantRecurrent, StateObservers
from ..quant.core import QParams, representable_range
from ..quant.observers import MovingAverageMinMaxObserver
from ..quant.spec import QuantSpec
from .lsq import LearnedScaleQuantizer
from .weights import trained_weights, weights_version

EMA_MOMENTUM = 0.9


@dataclass
class QATState:
    """Step counter and freezing schedule of a prepared model (``model.squeezer_qat``).

    ``ranges_live``: whether the forward pass in progress may update ranges (set by the root
    hook before it counts the step, so ranges are updated on steps ``1..freeze_observers_after``).
    """

    freeze_observers_after: int | None
    freeze_bn_after: int | None
    batchnorms: list[nn.Module]
    learned: list[str] = field(default_factory=list)
    steps: int = 0
    ranges_live: bool = True

    @property
    def observers_frozen(self) -> bool:
        return self.freeze_observers_after is not None and self.steps >= self.freeze_observers_after

    @property
    def bn_frozen(self) -> bool:
        return self.freeze_bn_after is not None and self.steps >= self.freeze_bn_after


class _StepHook:
    """Root forward pre-hook: applies the freezing schedule, then counts a training step."""

    def __init__(self, state: QATState, learned_acts: list[LearnedScaleQuantizer]) -> None:
        self.state = state
        self.learned_acts = learned_acts

    def __call__(self, model: nn.Module, args: Any) -> None:
        state = self.state
        if state.bn_frozen:
            for bn in state.batchnorms:
                bn.eval()
        state.ranges_live = not state.observers_frozen
        if not state.ranges_live:
            for quantizer in self.learned_acts:
                quantizer.rel_scale.requires_grad_(False)
        if model.training and torch.is_grad_enabled():
            state.steps += 1


def _moving_range(spec: QuantSpec, qparams: QParams) -> MovingAverageMinMaxObserver:
    """A moving average of batch ranges, ``lo <- 0.9 lo + 0.1 min``, started from the grid ``qparams``."""
    observer = MovingAverageMinMaxObserver(spec, momentum=EMA_MOMENTUM)
    observer.lo, observer.hi = representable_range(spec, qparams)
    return observer


class _InputRange:
    """A layer's static input grid following the moving average of each batch's range of ``smooth(x)``."""

    def __init__(self, layer: QuantMixin) -> None:
        self.moving = _moving_range(layer.act_spec, layer.act_qparams)

    def update(self, layer: QuantMixin, args: tuple) -> None:
        x = args[0] if args else None
        if isinstance(x, Tensor) and x.is_floating_point():
            self.moving.update(layer.smooth(x))
            layer.act_qparams = self.moving.qparams()


class _StateRanges:
    """A static recurrent layer's state grids, ``(key, state)`` each, following the moving average of each
    batch's range of that state (min / max over all steps of the float step loop, observed in ``observe`` mode)."""

    def __init__(self, layer: QuantRecurrent) -> None:
        self.specs = {(key, state): layer.state_spec(state) for key, state in layer.state_grids()}
        self.moving = StateObservers(self.specs, "minmax")
        self.moving.observers = {grid: _moving_range(spec, layer.state_qparams[grid[0]][grid[1]])
                                 for grid, spec in self.specs.items()}

    def update(self, layer: QuantRecurrent, args: tuple) -> None:
        batch = StateObservers(self.specs, "minmax")
        mode, observer = layer.mode, layer.act_observer
        try:
            layer.mode, layer.act_observer = "observe", batch
            layer.forward(*args)  # not through __call__: the hooks stay out of it
            for grid, moving in self.moving.observers.items():
                moving.update(torch.stack(batch.observers[grid].range()))
            layer.act_observer = self.moving
            layer.freeze_activation()
        finally:
            layer.mode, layer.act_observer = mode, observer


class _RangeTracker:
    """Layer forward pre-hook, while ranges are live: re-fit the weight's parameters when the
    weight has changed (``refit_weight``; in eval mode too, so evaluation sees the current grid)
    and, when training, update the activation grids' moving averages (``observer``)."""

    def __init__(self, state: QATState, refit_weight: bool, observer: _InputRange | _StateRanges | None) -> None:
        self.state = state
        self.refit_weight = refit_weight
        self.observer = observer
        self.fitted_version: tuple[int, ...] | None = None

    def refit(self, layer: QuantMixin) -> None:
        """Round-to-nearest parameters for the current weight(s), unless already fitted to them."""
        if self.refit_weight and weights_version(layer) != self.fitted_version:
            layer.calibrate_weight()
            self.fitted_version = weights_version(layer)

    def __call__(self, layer: QuantMixin, args: tuple) -> None:
        if not self.state.ranges_live:
            return
        self.refit(layer)
        if self.observer is not None and layer.training and torch.is_grad_enabled():
            with torch.no_grad():
                self.observer.update(layer, args)


def _check_steps(name: str, value: int | None) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
        raise ConfigError(f"{name} must be None or an integer >= 0, got {value!r}")


def prepare_qat(
    model: nn.Module,
    config: QuantConfig | str | dict[str, Any],
    calib: Iterable[Batch] | None = None,
    learnable_scales: bool = False,
    freeze_observers_after: int | None = None,
    freeze_bn_after: int | None = None,
    *,
    inplace: bool = False,
) -> nn.Module:
    """``model`` quantized (a copy unless ``inplace``) and ready for quantization-aware training (train
    mode, ``simulate``, float weights requiring grad); see the module docstring for the options.

    ``config``: as for :func:`squeezer.quantize`; ``calib`` is required for static activations. Batch norms stay
    (training updates their statistics; ``freeze_bn_after``): none is folded into its convolution.
    Train it with any loop (``squeezer.training.fit`` or your own), then call :func:`convert`.
    """
    _check_steps("freeze_observers_after", freeze_observers_after)
    _check_steps("freeze_bn_after", freeze_bn_after)
    qmodel = quantize(model, config, calib=calib, inplace=inplace, progress=False, fold_bn=False)
    layers = quant_layers(qmodel)
    batchnorms = [m for m in qmodel.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if freeze_bn_after is not None and not batchnorms:
        raise ConfigError("freeze_bn_after applies to BatchNorm layers; the model has none")
    state = QATState(freeze_observers_after, freeze_bn_after, batchnorms)
    learned_acts: list[LearnedScaleQuantizer] = []
    tracked = False
    for name, layer in layers.items():
        weights = trained_weights(layer)
        for w in weights.values():
            w.requires_grad_(True)
        recurrent = isinstance(layer, QuantRecurrent)
        specs = {n: layer.matrix_spec(n) if recurrent else layer.weight_spec for n in weights}
        uniform = all(spec.mapping == "uniform" for spec in specs.values())
        if learnable_scales and uniform and recurrent:
            qps = layer.ensured_matrix_qparams()
            layer.matrix_fake_quant = nn.ModuleDict({n: LearnedScaleQuantizer(specs[n], qps[n]) for n in weights})
            state.learned.extend(f"{name}.{n}" for n in weights)
        elif learnable_scales and uniform:
            layer.weight_fake_quant = LearnedScaleQuantizer(layer.weight_spec, layer.weight_qparams)
            state.learned.append(f"{name}.weight")
        observer = None
        if recurrent and layer.state_qparams:
            observer = _StateRanges(layer)
        elif layer.act_qparams is not None and learnable_scales:
            layer.act_fake_quant = LearnedScaleQuantizer(layer.act_spec, layer.act_qparams, per_sample=True)
            learned_acts.append(layer.act_fake_quant)
            state.learned.append(f"{name}.act")
        elif layer.act_qparams is not None:
            observer = _InputRange(layer)
        refit = uniform and not learnable_scales
        if refit or observer is not None:
            layer.register_forward_pre_hook(_RangeTracker(state, refit, observer))
            tracked = True
    if freeze_observers_after is not None and not (tracked or learned_acts):
        raise ConfigError("freeze_observers_after applies to observed ranges (uniform weights without learned "
                          "scales, static activations); this model has none")
    qmodel.register_forward_pre_hook(_StepHook(state, learned_acts))
    qmodel.squeezer_qat = state
    return qmodel.train()


def convert(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Fix the quantizers for deployment: learned step sizes become ``weight_qparams`` /
    ``act_qparams``, tracked weight ranges are re-fitted to the final weights (unless frozen), the
    QAT hooks and state are removed; returns the model (a copy unless ``inplace``) in eval mode."""
    model = working_copy(model, inplace)
    state = getattr(model, "squeezer_qat", None)
    if not isinstance(state, QATState):
        raise ModelError("convert: model was not prepared with squeezer.qat.prepare_qat (or is already converted)")
    for module in model.modules():
        hooks = module._forward_pre_hooks
        for key in [k for k, hook in hooks.items() if isinstance(hook, (_StepHook, _RangeTracker))]:
            if isinstance(hooks[key], _RangeTracker) and not state.observers_frozen:
                hooks[key].refit(module)
            del hooks[key]
    for layer in quant_layers(model).values():
        if "weight_fake_quant" in layer._modules:
            layer.calibrate_weight(layer.weight_fake_quant.qparams())
            del layer.weight_fake_quant
        if "matrix_fake_quant" in layer._modules:
            layer.calibrate_weight({n: q.qparams() for n, q in layer.matrix_fake_quant.items()})
            del layer.matrix_fake_quant
        if "act_fake_quant" in layer._modules:
            layer.act_qparams = layer.act_fake_quant.qparams()
            del layer.act_fake_quant
    del model.squeezer_qat
    return model.eval()

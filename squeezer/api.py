"""`squeezer.quantize`: post-training quantization of any ``nn.Module``.

Steps: copy the model (unless ``inplace``), swap the selected layers, fix each weight's
parameters by round-to-nearest, run the config's weight algorithm (GPTQ, AWQ, ...) stage by
stage on the calibration batches, and, when calibration batches are given,
(1) observe activation ranges (static mode), (2) measure each layer's output error in
isolation, (3) measure the whole model's output error against its float outputs (taken
before any algorithm replaced float weights by its rounded choice). The :class:`QuantReport` goes
with the returned model: ``squeezer.report_of(model)`` (:mod:`squeezer.transform`: a copy unless
``inplace=True``). Mixed precision under a budget is :func:`squeezer.search.auto_quantize`.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial
from typing import Any

from torch import Tensor, nn

from .algorithms import make_algorithm, run_algorithm
from .algorithms.pipeline import observers_of
from .algorithms.output_shift import correct_output_shift
from .calibration import Batch, batch_outputs, check_batches, check_fits, run_batches, with_progress
from .config import QuantConfig
from .distributed import LOCAL, Reducer, make_reducer
from .errors import ConfigError, DataError, ModelError
from .fold import fold_batchnorm, folded_norms
from .modules import quant_layers, set_mode, swap_layers
from .modules.base import QuantMixin
from .modules.recurrent import QuantRecurrent
from .quant.core import packed_nbytes
from .quant.metrics import ErrorAccumulator, ErrorStats
from .quant.observers import reduce_observers
from .report.quant import LayerReport, QuantReport
from .resolve import resolve_config
from .transform import attach_report, report_of, working_copy


def _param_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _layer_report(name: str, layer: QuantMixin) -> LayerReport:
    """Weight error against the float weight the user gave (an algorithm may have replaced
    ``layer.weight`` by its rounded choice and moved a factor into ``input_scale``)."""
    spec = layer.weight_spec
    w = layer.weight.detach()
    act = None if layer.act_spec is None else f"{layer.act_spec.describe()} {layer.scheme.activation_mode}"
    return LayerReport(
        name=name, kind=type(layer).__name__, format=spec.describe(), mapping=spec.mapping, bits=spec.bits,
        granularity=spec.granularity.describe(), activation=act, params=w.numel(),
        bytes_before=w.numel() * w.element_size(),
        bytes_after=layer.packed_nbytes() if isinstance(layer, QuantRecurrent)  # its matrices' own specs
        else packed_nbytes(spec, w.numel(), layer.ensured_weight_qparams()),
        weight_error=layer.measured_weight_error(),
        output_error=layer.output_error.stats() if layer.output_error.count else None,
    )


def _refuse_quantized(model: nn.Module) -> None:
    """A model squeezer already quantized is refused: its float weights are rounded (or, packed, gone), so
    quantizing again would compound rounding errors under a report naming only the new preset."""
    layers = quant_layers(model)
    if not layers:
        return
    if any(layer.is_packed for layer in layers.values()):
        raise ConfigError(f"model {type(model).__name__} is packed (its float weights are gone): "
                          "quantize the float model instead")
    try:
        preset = report_of(model, QuantReport).config.get("name")
    except ModelError:
        preset = None
    done = repr(preset) if preset else next(iter(layers.values())).weight_spec.describe()
    raise ConfigError(f"model {type(model).__name__} is already quantized with {done}: quantize the float model "
                      "instead (e.g. the one you quantized, or a fresh one with its float weights)")


def _calibrate(model: nn.Module, batches: list[Batch], reference: list[list[Tensor]] | None,
               progress: bool, correct_bias: bool = False, reducer: Reducer = LOCAL,
               measure: bool = True) -> ErrorStats | None:
    """Observe static activation ranges, measure each layer's output error in isolation
    (``compare`` mode, whose outputs are the float model's), and the model's output error against
    the float outputs: ``reference`` (taken earlier when an algorithm or ``correct_bias`` changed the float
    layers; consumed batch by batch) or the ``compare`` pass's. One batch's outputs are live at a time.
    ``correct_bias``: after the ranges, each convolution's mean output shift is folded into its bias
    (:func:`squeezer.algorithms.output_shift.correct_output_shift`). ``reducer``: the ranges are combined over its
    processes (each observed its own ``batches``); the errors are this process's. ``measure=False``: no errors
    (no compare pass), ``None`` returned."""
    layers = quant_layers(model)
    if any(layer.act_observer is not None for layer in layers.values()):
        set_mode(model, "observe")
        observe = partial(run_batches, model, batches, "observing activations", progress)
        observe()
        reduce_observers(observers_of(layers), reducer, observe)
        for name, layer in layers.items():
            if layer.act_observer is not None:
                try:
                    layer.freeze_activation()
                except DataError as exc:
                    raise DataError(f"layer {name!r} was not reached by the calibration data ({exc})") from None
    if correct_bias:
        correct_output_shift(model, layers, batches)
    if not measure:
        return None
    acc = ErrorAccumulator()
    for i, batch in enumerate(with_progress(batches, "measuring layer and model errors", progress)):
        set_mode(model, "compare")
        compared = batch_outputs(model, batch)
        if reference is not None:
            compared, reference[i] = reference[i], []
        set_mode(model, "simulate")
        for ref, out in zip(compared, batch_outputs(model, batch)):
            acc.update(ref, out)
    return acc.stats() if acc.count else None


def quantize(
    model: nn.Module,
    config: QuantConfig | str | dict[str, Any] = "w8",
    calib: Iterable[Batch] | None = None,
    *,
    inplace: bool = False,
    progress: bool = True,
    correct_bias: bool = False,
    fold_bn: bool = True,
    distributed: bool | Any = False,
    measure: bool = True,
) -> nn.Module:
    """Quantize ``model`` with a preset name, a dict / YAML path or a :class:`QuantConfig`.

    ``calib``: batches (tensor, tuple for ``model(*b)`` or ``(x, y)`` pairs, mapping for ``model(**b)``:
    :mod:`squeezer.calibration`); required for static activations, optional otherwise (it adds output
    errors to the report). The first batch is run through the model before any other work, so data
    that does not fit it is a :class:`DataError` at once. A model squeezer already quantized (or packed)
    is a :class:`ConfigError`: quantize the float model. ``correct_bias`` (needs ``calib``): fold each
    convolution's mean output shift ``E[op(fq_a(x), W_hat) - op(x, W)]`` (per channel, measured on its own
    function: grouped / depthwise convolutions and subclasses that pad first included) into its bias, which
    keeps rounding shifts from being amplified by a following batch norm's gain. ``fold_bn``: fold each
    eval-mode batch norm that reads only a convolution's output into it first (:mod:`squeezer.fold`; the norm
    becomes an identity); its :class:`~squeezer.fold.FoldReport` goes with the model too
    (``squeezer.report_of(q, FoldReport)``). ``distributed``: ``True`` (the default group of an initialised
    ``torch.distributed``) or a process group: ``calib`` is this process's share of the batches, and every
    calibration statistic (Hessians, input magnitudes, activation ranges and histograms) is combined over the
    group before it is used, so every process returns the same model (:mod:`squeezer.distributed`); the
    report's output errors are this process's. ``measure=False``: no passes to measure errors (float reference,
    compare): the report has no model output error, and layers' output errors only where an algorithm measured
    them on its sampled rows; the weights are the same.
    Returns the quantized model (a copy unless ``inplace``) carrying its :class:`QuantReport`.
    """
    if isinstance(config, str) and (config == "auto" or config.startswith("auto-")):
        raise ConfigError(f"config {config!r}: mixed precision under a budget is squeezer.search.auto_quantize(model, "
                          "calib, budget, algorithm=...) (command line: squeezer search)")
    cfg = resolve_config(config)
    reducer = make_reducer(distributed)
    if reducer.active and correct_bias:
        raise ConfigError("correct_bias=True is measured on one process's batches: it cannot be combined with "
                          "distributed=...", argument="correct_bias")
    _refuse_quantized(model)
    batches = None if calib is None else check_batches(calib)
    if cfg.activation_mode == "static" and batches is None:
        raise DataError(f"config {cfg.name!r} has static activations: pass calibration batches with calib=...",
                        argument="calib")
    model = working_copy(model, inplace)
    bytes_before = _param_bytes(model)
    was_training = model.training
    model.eval()
    if batches is not None:
        check_fits(model, batches[0], "calib batch 0")
    if fold_bn:
        attach_report(model, fold_batchnorm(model))
    _, skipped = swap_layers(model, cfg)
    layers = quant_layers(model)
    for layer in layers.values():
        layer.calibrate_weight()
    reference = None
    if correct_bias and batches is None:
        raise DataError("correct_bias=True measures output shifts on calibration batches: pass calib=...",
                        argument="calib")
    if batches is not None and measure and (cfg.algorithm != "rtn" or correct_bias):  # float outputs, before changes
        set_mode(model, "float")
        reference = run_batches(model, batches, "float reference", progress)
    if cfg.algorithm != "rtn":
        algorithm = make_algorithm(cfg.algorithm, cfg.algorithm_options)
        if batches is None and algorithm.needs_stats:
            raise DataError(f"algorithm {cfg.algorithm!r} needs calibration batches: pass calib=...", argument="calib")
        run_algorithm(model, algorithm, batches or [], progress, reducer)
    model_error = None if batches is None else _calibrate(model, batches, reference, progress, correct_bias, reducer,
                                                          measure)
    set_mode(model, "simulate")
    model.train(was_training)
    report = QuantReport(config=cfg.to_dict(), skipped=skipped, calibration_batches=len(batches or []),
                         folded_norms=folded_norms(model), bias_corrected=correct_bias)
    report.layers = [_layer_report(name, layer) for name, layer in layers.items()]
    report.model_bytes_before = bytes_before
    report.model_class = type(model).__name__
    report.model_params = sum(p.numel() for p in model.parameters())
    report.model_bytes_after = bytes_before - report.weight_bytes_before + report.weight_bytes_after
    report.model_output_error = model_error
    return attach_report(model, report)


"""TFLite export through litert-torch (extra ``squeezer[tflite]``) that carries squeezer's integers.

The model's QDQ form (:mod:`squeezer.exporters.qdq`) goes to ``litert_torch.convert``, which folds
``quantize(W^)`` into int8 weight tensors holding squeezer's codes and scales (zero point 0; per
output channel, ``quantized_dimension`` following TFLite's layout). Two modes, by the layers' activations:

* no static layer (``w8``, ``w8a8``, integer codebooks): dynamic range. TFLite's hybrid kernels
  quantize each input row to int8 symmetrically at run time, ``s = max|x_row| / 127``: squeezer's
  dynamic per-token int8 for Linear layers (``w8a8``: outputs equal to float rounding with TFLite's
  built-in kernels). For a weight-only layer, a dynamic convolution or a dynamic spec other than
  int8 symmetric per token this quantization is not squeezer's: a warning names the layer.
* static layers (``w8a8-static``): full integer; int8 tensors between layers on squeezer's
  activation grids; biases int32 at scale ``S_x S_w`` (TFLite's rule). An int8 kernel needs an output
  grid: a layer whose output reaches the next layer's input quantizer only through ReLU / ReLU6 / clamp,
  reshapes, max-pooling or a folded (identity) batch norm gets that grid (the same values as squeezer;
  the converter fuses the activation); so does one whose output also goes elsewhere (e.g. into a residual
  addition): squeezer's grid of that tensor, so the next layer reads it with no requantization; any other
  (e.g. the last layer, a branch into an addition) runs in the int8 kernel with its
  output quantized over its min-max range on ``calib`` (the calibration data alone), taken after the
  activations that follow it (ReLU6: within [0, 6], the grid TFLite's own converter gives a fused RELU6)
  (TFLite's full-integer convention, what int8-only accelerators need; not part of
  squeezer's model: a warning names the layer and the grid), or with ``unquantized_outputs="float"``
  or without ``calib`` (the example alone is no range: one row gives a single value) as a float op
  on its dequantized int8 input and squeezer's ``W^`` (no grid squeezer did not choose; its
  int8 weights are stored as such and dequantized once by a ``DEQUANTIZE`` op:
  :mod:`squeezer.exporters.tflite.int8_weights`). A model whose first op quantizes the input / last op
  dequantizes the output takes / returns int8; :mod:`squeezer.exporters.tflite.runner` applies the scale and zero point.

Every quantized layer of a static model must be static: the converter stores the weights of a
weight-only layer there in float (ConfigError naming it). In dynamic-range mode the converter
quantizes large float weights (layers squeezer left in float) to int8 on its own: a warning names
each such tensor. Embeddings keep their int8 rows and per-row scales (``EMBEDDING_LOOKUP`` dequantizes
the rows it gathers: squeezer's values exactly), in either mode.
The batch size is the example's; the runner resizes (or runs in chunks) for other sizes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from ...calibration import call_model, check_batches
from ...errors import ConfigError
from ...modules import QuantEmbedding, QuantLinear, QuantRecurrent
from ...modules.base import QuantMixin
from ...quant.core import uniform_qparams
from ...quant.formats import activation_format
from ...quant.spec import PerTensor, QuantSpec
from ..base import ExportReport, require_extra
from ...io.atomic import atomic_write
from ..files import check_output_dir
from ..qdq import (
    QdqLayer,
    Unsupported,
    activation_mode,
    checked_weight,
    deployable_layers,
    example_call,
    int8_weight,
    qdq_model,
    static_input_grid,
)
from ..qdq_recurrent import QdqStepOps, qdq_recurrent
from .int8_weights import store_int8_weights

INT8_ASYM = QuantSpec(bits=8, symmetric=False, signed=True, granularity=PerTensor())
ROW_INT8 = "dynamic-token-int8"  # what TFLite's dynamic-range kernels do to each input row: s = max|x_row| / 127
_ATEN = torch.ops.aten
# ops through which an int8 grid passes unchanged (TFLite keeps their input's quantization)
PASS_THROUGH = {_ATEN.view.default, _ATEN.reshape.default,
                _ATEN.flatten.using_ints, _ATEN.squeeze.dim, _ATEN.unsqueeze.default, _ATEN.permute.default,
                _ATEN.transpose.int, _ATEN.max_pool1d.default, _ATEN.max_pool2d.default, _ATEN.clone.default,
                _ATEN.contiguous.default, _ATEN.dropout.default}
NONLINEARITY_INPUTS = {"RNN_TANH": frozenset({"gates"}), "RNN_RELU": frozenset({"gates"})}
"""Recurrent states consumed directly by a TANH / RELU, whose TFLite kernel refuses an int16 input with a float output."""
GEMMS = {_ATEN.linear.default, _ATEN.conv1d.default, _ATEN.conv2d.default}
INF = float("inf")
CLIPS = {_ATEN.relu.default: (0.0, None), _ATEN.relu_.default: (0.0, None), _ATEN.relu6.default: (0.0, 6.0),
         _ATEN.hardtanh.default: (-1.0, 1.0), _ATEN.hardtanh_.default: (-1.0, 1.0), _ATEN.clamp.default: (None, None)}
"""Clipping ops that a converter fuses into the int8 kernel before them (RELU, RELU6, ...) -> their default
bounds ``(lo, hi)`` (None: unbounded), which the op's own arguments after its input replace."""


def _clip_range(node: Any) -> tuple[float, float] | None:
    """``[lo, hi]`` that the clipping op ``node`` maps its input into (``relu``: [0, inf), ``nn.ReLU6``: [0, 6]),
    or None for any other op, or bounds that are not numbers."""
    if node.target not in CLIPS:
        return None
    lo, hi = (*node.args[1:3], *CLIPS[node.target][len(node.args) - 1:])
    if not all(b is None or isinstance(b, (int, float)) for b in (lo, hi)):
        return None
    return -INF if lo is None else float(lo), INF if hi is None else float(hi)


def _weight_buffer(ep: Any, node: Any) -> str | None:
    """The buffer behind a GEMM's weight argument, through ``dequantize(quantize(.))``."""
    while node.op == "call_function":
        node = node.args[0]
    return ep.graph_signature.inputs_to_buffers.get(node.name)


@dataclass(frozen=True)
class OutputPath:
    """Where a layer's output goes in an exported QDQ model, followed through :data:`PASS_THROUGH` and clipping
    ops (:data:`CLIPS`) while each has a single user: ``requantized`` when it then reaches an input quantizer
    alone; ``clip``: the range ``[lo, hi]`` those clipping ops leave (``(-inf, inf)`` for none); ``shared``: the
    ``(scale, zero)`` of the one input grid among several users (e.g. the next layer and a residual addition),
    whose real range lies within ``clip``, else None."""

    requantized: bool
    clip: tuple[float, float]
    shared: tuple[float, int] | None = None


UNTRACED = OutputPath(False, (-INF, INF))
"""The :class:`OutputPath` of a layer :func:`_output_paths` does not follow (not in :data:`GEMMS`)."""


def _grid_within(grid: tuple[float, int], clip: tuple[float, float]) -> bool:
    """Whether the int8 grid ``(scale, zero)`` spans ``[scale (-128 - zero), scale (127 - zero)]`` inside ``clip``,
    so that putting a layer's output on it before the clipping ops equals putting the clipped output on it."""
    scale, zero = grid
    return clip[0] <= scale * (-128 - zero) and scale * (127 - zero) <= clip[1]


def _output_paths(ep: Any) -> dict[str, OutputPath]:
    """:class:`OutputPath` of each layer of an exported QDQ model, named by its weight buffer (``<layer>.weight``)."""
    quantize = torch.ops.quantized_decomposed.quantize_per_tensor.default
    found = {}
    for node in ep.graph.nodes:
        if node.target not in GEMMS:
            continue
        user, lo, hi = node, -INF, INF
        while len(user.users) == 1:
            after = next(iter(user.users))
            clip = _clip_range(after)
            if clip is None and after.target not in PASS_THROUGH:
                break
            if clip is not None:
                lo, hi = max(lo, clip[0]), min(hi, clip[1])
            user = after
        name = _weight_buffer(ep, node.args[1]) or ""
        if name.endswith("weight"):
            grids = {(float(u.args[1]), int(u.args[2])) for u in user.users if u.target == quantize}
            requantized = len(user.users) == 1 and len(grids) == 1
            shared = next(iter(grids)) if len(user.users) > 1 and len(grids) == 1 else None
            if shared is not None and not _grid_within(shared, (lo, hi)):
                shared = None
            found[name.removesuffix("weight").removesuffix(".")] = OutputPath(requantized, (lo, hi), shared)
    return found


def _output_grids(model: nn.Module, clips: dict[str, tuple[float, float]],
                  batches: list[Any]) -> dict[str, tuple[float, int, float, float]]:
    """``(scale, zero, lo, hi)``: int8 asymmetric min-max grid of each named layer's output over ``batches``,
    after the clipping ops that follow it: ``[lo, hi] = clamp([min y, max y], *clips[name])`` (ReLU6: within
    [0, 6]), so that the converter fuses them into the layer's kernel, whose output grid is then TFLite's own."""
    ranges: dict[str, list[Tensor]] = {}
    layers = {n: model.get_submodule(n) for n in clips}
    hooks = [layer.register_forward_hook(lambda _m, _i, y, n=n: ranges.setdefault(n, []).append(y.detach().aminmax()))
             for n, layer in layers.items()]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                call_model(model, batch)
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    grids = {}
    for name, seen in ranges.items():
        lo = torch.stack([s.min for s in seen]).min().clamp(*clips[name])
        hi = torch.stack([s.max for s in seen]).max().clamp(*clips[name])
        qp = uniform_qparams(lo, hi, INT8_ASYM)
        grids[name] = (float(qp.scale), int(qp.zero_point), float(lo), float(hi))
    return grids


def _converter_quantized(content: bytes, qmodel: nn.Module) -> list[str]:
    """Names of the int8 constants in a converted model whose scales are not those of a squeezer layer:
    float weights that the dynamic-range converter quantized on its own."""
    from ai_edge_litert.interpreter import Interpreter

    ours = [m.scale.reshape(-1).numpy() for m in qmodel.modules() if isinstance(m, QdqLayer) and m.scale is not None]
    ours += [s.reshape(-1).numpy() for m in qmodel.modules() if isinstance(m, QdqStepOps) for s in m.weight_scales()]
    foreign = []
    for d in Interpreter(model_content=content).get_tensor_details():
        scales = d["quantization_parameters"]["scales"]
        if d["dtype"] == np.int8 and len(d["shape"]) >= 2 and not any(np.array_equal(scales, s) for s in ours):
            foreign.append(d["name"])
    return foreign


def _mode(layers: dict[str, QuantMixin]) -> str:
    static = [n for n, layer in layers.items() if activation_mode(layer) == "static"]
    other = [n for n, layer in layers.items() if n not in static and not isinstance(layer, QuantEmbedding)]
    if static and other:
        raise ConfigError(f"layer {other[0]!r}: TFLite cannot mix it ({layers[other[0]].scheme.activation_mode} "
                          f"activations) with static layers such as {static[0]!r}: the converter would store its "
                          "weights in float; quantize every layer with static activations, or none")
    return "static" if static else "dynamic"


def _dynamic_note(layer: QuantMixin, name: str) -> str | None:
    """The warning for a layer whose run-time row quantization in TFLite is not squeezer's, else None."""
    act = layer.act_spec
    if isinstance(layer, QuantEmbedding):
        return None
    if layer.scheme.activation_mode == "none":
        return (f"layer {name!r}: weight-only in squeezer, but TFLite's dynamic-range kernels also quantize "
                "its input rows to int8 at run time (not in squeezer's model)")
    if isinstance(layer, QuantLinear) and activation_format("dynamic", act) == ROW_INT8:
        return None
    return (f"layer {name!r}: dynamic {act.describe()} activations run as TFLite's int8 symmetric per-row "
            "quantization (the nearest supported)")


@dataclass
class TfliteOptions:
    """Options of the TFLite export."""

    calib: Any = field(default=None, metadata={
        "help": "full-integer models: batches for the output grids of layers squeezer leaves unquantized "
                "(without them those layers run as float ops)"})
    unsupported: Unsupported = field(default="error", metadata={
        "help": "a layer with no int8 form: error, or float (its dequantized weights in float32)"})
    unquantized_outputs: Literal["int8", "float"] = field(default="int8", metadata={
        "help": "full-integer models, a layer whose output squeezer leaves in float: int8 (an output grid of its own) "
                "or float (a float op on squeezer's dequantized weights)"})


def export_tflite(model: nn.Module, example_inputs: Any, path: Path, options: TfliteOptions) -> ExportReport:
    """Write ``model`` (quantized by squeezer, pruned or fp32) to ``path`` as TFLite; see the module doc.

    ``example_inputs``: a tensor, a tuple (``model(*args)``) or a dict (``model(**kwargs)``);
    ``options.unquantized_outputs``: a static layer whose output squeezer leaves in float (e.g. the last one)
    runs in TFLite's int8 kernel with an output grid of its own (``"int8"``, default: int8 weights, an
    approximation; a warning gives the grid) or as a float op on squeezer's dequantized weights
    (``"float"``: no grid of its own; int8 weights dequantized once); ``options.calib``: batches for those grids' ranges (none: ``"float"``).
    """
    calib, unsupported, unquantized_outputs = options.calib, options.unsupported, options.unquantized_outputs
    if unquantized_outputs not in ("int8", "float"):
        raise ConfigError(f"unquantized_outputs must be 'int8' or 'float', got {unquantized_outputs!r}")
    litert = require_extra("litert_torch", "tflite")
    from litert_torch.quantize import pt2e_quantizer, quant_config

    check_output_dir(path, "TFLite")
    layers = deployable_layers(model, "export_tflite")
    report = ExportReport(str(path))
    mode = _mode(layers)

    def make(name: str, layer: QuantMixin) -> nn.Module:
        if isinstance(layer, QuantRecurrent):
            if layer.rnn_mode == "GRU" and activation_mode(layer) == "static":
                raise ConfigError(f"layer {name!r}: a QuantGRU with static activations has no faithful TFLite form "
                                  "(the converter's integer GRU step is off squeezer's by ~35 % of the output range); "
                                  "export it to ExecuTorch or ONNX, or quantize it weight-only")
            if mode == "dynamic":
                report.warnings.append(f"layer {name!r}: TFLite's dynamic-range kernels quantize the input rows of "
                                       "each of its projections to int8 at run time (not in squeezer's model)")
            return qdq_recurrent(layer, name, "TFLite", unsupported, report, fold_weight=True,
                                 float_states=NONLINEARITY_INPUTS.get(layer.rnn_mode, frozenset()))
        weight = checked_weight(layer, name, "TFLite", unsupported, report)
        grid = static_input_grid(layer, name, "TFLite") if activation_mode(layer) == "static" else None
        note = _dynamic_note(layer, name) if mode == "dynamic" and weight is not None else None
        if note:
            report.warnings.append(note)
        kind = "float32 weights" if weight is None else weight.label
        report.layers[name] = f"{kind}, " + ("EMBEDDING_LOOKUP of int8 rows" if isinstance(layer, QuantEmbedding) else
                                             "static int8 activations" if mode == "static" else "dynamic-range kernel")
        return QdqLayer(layer, name, weight, fold_weight=True, input_grid=grid)

    qmodel = qdq_model(model, make)
    args, kwargs = example_call(example_inputs)
    float_ops: dict[str, Any] = {}
    if mode == "static":
        with torch.no_grad():
            paths = _output_paths(torch.export.export(qmodel, args, kwargs))
        own = [n for n, m in qmodel.named_modules() if isinstance(m, QdqLayer) and m.scale is not None
               and not paths.get(n, UNTRACED).requantized and activation_mode(layers[n]) == "static"]
        shared = {n: paths[n].shared for n in own if paths.get(n, UNTRACED).shared is not None}
        for name, grid in shared.items():  # squeezer's grid of that tensor: no requantization before the next layer
            qmodel.get_submodule(name).output_grid = grid
        own = [n for n in own if n not in shared]
        if own and unquantized_outputs == "int8" and calib is None:
            report.warnings.append(f"layer(s) {', '.join(map(repr, own))}: no calib given, so no range for an int8 "
                                   "output grid of their own (example_inputs alone would give a grid that clips "
                                   "other inputs' outputs); run as float ops instead: pass calib=... for int8 outputs")
        if unquantized_outputs == "float" or calib is None:
            float_ops = {name: int8_weight(layers[name]) for name in own}
            own = []
        batches = check_batches(calib) if own else []  # the calibration data alone, as squeezer's own grids
        clips = {name: paths.get(name, UNTRACED).clip for name in own}
        for name, (scale, zero, lo, hi) in _output_grids(model, clips, batches).items():
            qmodel.get_submodule(name).output_grid = (scale, zero)
            after = "" if clips[name] == UNTRACED.clip else " after the activation that follows it, fused into its kernel"
            report.warnings.append(f"layer {name!r}: TFLite's int8 kernel needs an output grid; output quantized "
                                   f"with scale {scale:.3g}, zero point {zero} (range [{lo:.3g}, {hi:.3g}]{after}, over "
                                   f"{len(batches)} batch(es)), not part of squeezer's model")
    config = None
    if layers:  # the quantizer only picks the converter's q / dq mode: the graph already holds squeezer's q / dq
        global_config = pt2e_quantizer.get_symmetric_quantization_config(is_per_channel=True, is_dynamic=mode == "dynamic")
        config = quant_config.QuantConfig(pt2e_quantizer=pt2e_quantizer.PT2EQuantizer().set_global(global_config))
    with torch.no_grad():
        content = litert.convert(qmodel, args, kwargs or None, quant_config=config).model_content()
    if float_ops:
        content, found = store_int8_weights(content, float_ops)
        for name, what in found.items():
            if what == "none":
                report.warnings.append(f"layer {name!r}: its output has no squeezer grid; the converter fused it with "
                                       "the ops after it (e.g. a BatchNorm) into an int8 kernel whose output is on the "
                                       "next layer's input grid")
                continue
            report.layers[name] = report.layers[name].replace("static int8 activations", "float op on int8 inputs")
            report.warnings.append(f"layer {name!r}: its output has no squeezer grid; TFLite runs it as a float op on "
                                   "its dequantized int8 input and squeezer's dequantized weights (no grid of its own; " +
                                   ("int8 weights, dequantized once by a DEQUANTIZE op)" if what == "rewritten" else
                                    "its weights stay float32: the converter stored them in a layout squeezer does "
                                    "not rewrite)"))
    if mode == "dynamic" and layers:
        report.warnings += [f"TFLite's dynamic-range converter quantized the float weight {name!r} to int8 "
                            "itself (not squeezer's quantization)" for name in _converter_quantized(content, qmodel)]
    atomic_write(path, content)
    return report

"""ExecuTorch export (extra ``squeezer[executorch]``): ``torch.export`` -> XNNPACK partition -> ``.pte``.

The QDQ form (:mod:`squeezer.exporters.qdq`) holds squeezer's int8 codes and scales as buffers, so the
``.pte`` stores them unchanged (inside XNNPACK's blob for delegated layers, as program constants
for the others). Per layer:

* static int8 activations (``w8a8-static``): a layer whose output reaches the next input
  quantizer through at most a ReLU runs in XNNPACK's int8 kernel on squeezer's grids; any other
  (e.g. the last layer) runs ExecuTorch's portable quantize / dequantize and float op: squeezer's
  arithmetic, no grid of its own;
* a q / dq pair that is not part of an int8 GEMM runs portable (XNNPACK 1.5.1 computes 4-D
  standalone ones wrong: ~100 % output error on a convolution's input);
* weight-only Linear (``weight_only="dynamic"``, the default): XNNPACK's dynamic int8 GEMM on
  squeezer's codes, which also quantizes each input row to int8 at run time (not in squeezer's
  model; a warning names the layers), as TFLite's dynamic-range kernels do: XNNPACK has no kernel
  for float inputs and int8 weights, and the exact form below dequantizes every weight on every
  call (far slower than the fp32 program);
* weight-only, exact (``weight_only="exact"``, and every weight-only layer that is not a Linear):
  portable ``dequantize_per_channel`` (squeezer's ``W^``) and the float op: squeezer's arithmetic;
* dynamic activations: XNNPACK's dynamic int8 (it quantizes each input row asymmetrically at run
  time), the nearest to squeezer's dynamic int8: a warning names the layer.

``report.layers`` says which layers XNNPACK runs. The batch axis is dynamic up to ``max_batch``
rows (ExecuTorch plans memory for it); where ``torch.export`` cannot make it dynamic, it is fixed to
the example's (a warning says so).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ...errors import ConfigError
from ...modules import QuantLinear, QuantRecurrent
from ...modules.base import QuantMixin
from ..base import ExportReport, require_extra
from ...io.atomic import atomic_write
from ..files import check_output_dir
from ..qdq_recurrent import qdq_recurrent
from ..qdq import (
    QdqLayer,
    Unsupported,
    activation_mode,
    checked_weight,
    deployable_layers,
    example_call,
    qdq_model,
    static_input_grid,
)

ACTIVATIONS = {"none": "weight-only", "dynamic": "dynamic int8 activations", "static": "static int8 activations"}
WeightOnly = Literal["dynamic", "exact"]
WEIGHT_ONLY: tuple[str, ...] = ("dynamic", "exact")


def _dynamic_batch(model: nn.Module, args: tuple, kwargs: dict[str, Tensor], max_batch: int) -> tuple[tuple, dict, dict | None]:
    """The inputs cut or repeated to ``min(max(rows, 2), max_batch)`` rows (a 1-row example would fix
    the axis) and a dynamic batch axis for each, keyed by ``forward``'s parameter names."""
    names = list(inspect.signature(model.forward).parameters)
    inputs = {**dict(zip(names, args)), **kwargs}
    rows = min(max(next(v.shape[0] for v in inputs.values() if isinstance(v, Tensor) and v.dim()), 2), max_batch)
    inputs = {k: (v[:rows] if v.shape[0] >= rows else v.repeat(rows, *[1] * (v.dim() - 1)))
              if isinstance(v, Tensor) and v.dim() else v for k, v in inputs.items()}
    batch = torch.export.Dim("batch", min=1, max=max_batch) if max_batch > 1 else None
    shapes = {k: {0: batch} if batch is not None and isinstance(v, Tensor) and v.dim() else None for k, v in inputs.items()}
    return tuple(inputs[n] for n in names[:len(args)]), {k: inputs[k] for k in kwargs}, shapes


def _export(qmodel: nn.Module, example_inputs: Any, max_batch: int, report: ExportReport) -> Any:
    args, kwargs = example_call(example_inputs)
    with torch.no_grad():
        try:
            dyn_args, dyn_kwargs, shapes = _dynamic_batch(qmodel, args, kwargs, max_batch)
            return torch.export.export(qmodel, dyn_args, dyn_kwargs, dynamic_shapes=shapes)
        except Exception as exc:  # noqa: BLE001 - torch.export raises many types for data-dependent shapes
            report.warnings.append(f"the batch axis cannot be dynamic ({type(exc).__name__}); fixed to the example's")
            return torch.export.export(qmodel, args, kwargs)


@dataclass
class ExecutorchOptions:
    """Options of the ExecuTorch export."""

    max_batch: int = field(default=1024, metadata={"help": "largest batch the program plans memory for (dynamic batch axis)"})
    unsupported: Unsupported = field(default="error", metadata={
        "help": "a layer with no int8 form: error, or float (its dequantized weights in float32)"})
    weight_only: WeightOnly = field(default="dynamic", metadata={
        "help": "weight-only Linear layers: dynamic (XNNPACK int8, also quantizes input rows) or exact (portable kernels)"})


def export_executorch(model: nn.Module, example_inputs: Any, path: Path, options: ExecutorchOptions) -> ExportReport:
    """Write ``model`` (quantized by squeezer, pruned or fp32) to ``path`` as an ExecuTorch ``.pte``
    with the XNNPACK delegate; see the module doc. ``example_inputs``: a tensor, a tuple
    (``model(*args)``) or a dict (``model(**kwargs)``); ``options.weight_only``: how weight-only Linear
    layers run, ``"dynamic"`` (XNNPACK int8, fast) or ``"exact"`` (float inputs, portable kernels)."""
    max_batch, unsupported, weight_only = options.max_batch, options.unsupported, options.weight_only
    require_extra("executorch.exir", "executorch")
    require_extra("executorch.kernels.quantized", "executorch")  # out variants of the quantized ops
    from executorch.backends.xnnpack.partition.config import ALL_PARTITIONER_CONFIGS
    from executorch.backends.xnnpack.partition.config.generic_node_configs import (
        DeQuantizedPerTensorConfig,
        QuantizedPerTensorConfig,
    )
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import (
        XnnpackPartitioner,
    )
    from executorch.exir import to_edge_transform_and_lower

    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise ConfigError(f"max_batch must be a positive integer, got {max_batch!r}")
    if weight_only not in WEIGHT_ONLY:
        raise ConfigError(f"weight_only must be one of {', '.join(WEIGHT_ONLY)}, got {weight_only!r}")
    check_output_dir(path, "ExecuTorch")
    layers = deployable_layers(model, "export_executorch")
    report = ExportReport(str(path))
    dynamic_rows: list[str] = []  # weight-only Linear layers given XNNPACK's dynamic int8 rows

    def make(name: str, layer: QuantMixin) -> nn.Module:
        if isinstance(layer, QuantRecurrent):
            return qdq_recurrent(layer, name, "ExecuTorch", unsupported, report, fold_weight=False)
        weight = checked_weight(layer, name, "ExecuTorch", unsupported, report)
        mode = activation_mode(layer)
        if mode == "dynamic":
            report.warnings.append(f"layer {name!r}: dynamic {layer.act_spec.describe()} activations run as "
                                   "ExecuTorch's dynamic asymmetric int8 (per row in XNNPACK's GEMMs): the nearest supported")
        grid = static_input_grid(layer, name, "ExecuTorch") if mode == "static" else None
        report.layers[name] = ("float32 weights" if weight is None else weight.label) + f", {ACTIVATIONS[mode]}"
        rows_int8 = mode == "none" and weight is not None and weight_only == "dynamic" and isinstance(layer, QuantLinear)
        if rows_int8:
            dynamic_rows.append(name)
            report.layers[name] += " (XNNPACK also quantizes the input rows)"
        return QdqLayer(layer, name, weight, fold_weight=False, input_grid=grid, dynamic=mode == "dynamic" or rows_int8)

    qmodel = qdq_model(model, make)
    if dynamic_rows:
        report.warnings.append(f"layer(s) {', '.join(dynamic_rows)}: weight-only in squeezer, but XNNPACK's dynamic "
                               "int8 GEMM also quantizes its input rows to int8 at run time (not in squeezer's model; "
                               "weight_only='exact' keeps float inputs on ExecuTorch's slower portable kernels)")
    # a q / dq pair alone (not part of an int8 GEMM) stays portable: XNNPACK 1.5.1 gets 4-D ones wrong
    configs = [c for c in ALL_PARTITIONER_CONFIGS if c not in (QuantizedPerTensorConfig, DeQuantizedPerTensorConfig)]
    program = to_edge_transform_and_lower(_export(qmodel, example_inputs, max_batch, report),
                                          partitioner=[XnnpackPartitioner(configs=configs)])
    portable = set(program.exported_program().graph_signature.inputs_to_buffers.values())
    for name in report.layers:
        if isinstance(layers[name], QuantRecurrent):
            matrices = layers[name].matrix_names
            kept = sum(f"{name}.ops.{matrix}" in portable for matrix in matrices)
            report.layers[name] += f": {kept} of {len(matrices)} matrices dequantized by portable kernels, XNNPACK for the rest"
            continue
        report.layers[name] += ": portable kernels" if f"{name}.weight" in portable else ": XNNPACK"
    atomic_write(path, program.to_executorch().buffer)
    return report

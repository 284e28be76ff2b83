"""Sequential, block-by-block calibration for weight algorithms.

Layers are grouped into stages: each child of the model's block list (the first
``nn.ModuleList`` whose children hold several quantized layers, e.g. transformer layers)
is one stage, and every other quantized layer is a stage of its own, in module order. For each
stage the calibration batches run through the model with the earlier stages already quantized
(``simulate``) and this and later stages in float; hooks gather :class:`LayerStats` of the stage's
inputs and the forward stops as soon as every layer of the stage has been seen, so only the
prefix of the model runs. The algorithm then quantizes the stage, static activation ranges of
the stage are observed (provisionally: the final ranges are observed on the finished model), and
its quantized outputs feed the next one: errors do not compound unseen, and no activations are
stored between stages. With a :class:`~squeezer.distributed.Reducer` over several processes, each runs its
own share of the batches and every statistic (:func:`.stats.reduce_stats`, the observers'
:func:`~squeezer.quant.observers.reduce_observers`) is combined before it is used, so every process
quantizes the stage identically. A recurrent layer is treated matrix by matrix (:mod:`.matrices`): its statistics
are one :class:`LayerStats` per matrix, recorded through its step-by-step recurrence.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..calibration import Batch, call_model, with_progress
from ..distributed import LOCAL, Reducer
from ..memory import release_free_memory
from ..modules import QuantEmbedding, QuantLinear, QuantRecurrent, quant_layers
from ..modules.base import QuantMixin
from ..modules.layers import QuantEmbeddingBag
from ..modules.recurrent import StateObservers
from .base import Algorithm
from .matrices import matrix_views, record_matrix_inputs
from ..quant.metrics import ErrorStats
from ..quant.observers import Observer, reduce_observers
from ..quant.rotation import rotate
from .stats import SAMPLE_ROWS, LayerStats, input_rows, reduce_stats


class _StageDone(Exception):
    """Raised by a hook once every layer of the stage has seen its input."""


def stages(model: nn.Module, names: list[str]) -> list[list[str]]:
    """Group quantized layer ``names`` (module order) into stages (see module docstring); a model whose
    ``one_stage`` attribute is true (one transformer block quantized on its own) is a single stage."""
    if getattr(model, "one_stage", False):
        return [list(names)] if names else []
    blocks: list[str] = []
    for prefix, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 1:
            children = [f"{prefix}.{i}" if prefix else str(i) for i in range(len(module))]
            if sum(any(n.startswith(c + ".") for n in names) for c in children) > 1:
                blocks = children
                break
    groups: list[list[str]] = []
    for name in names:
        block = next((b for b in blocks if name.startswith(b + ".")), None)
        if block is not None and groups and groups[-1][0].startswith(block + "."):
            groups[-1].append(name)
        else:
            groups.append([name])
    return groups


def _run_prefix(model: nn.Module, layers: dict[str, QuantMixin], batches: list[Batch],
                visit: Callable[[str, nn.Module, tuple], None], after: bool = False) -> None:
    """Run ``batches`` through ``model``; ``visit(name, layer, args)`` sees each of ``layers``' inputs
    (``after=True``: once the layer itself has run), and each forward stops when all were seen."""
    seen: set[str] = set()

    def hook(name: str) -> Callable:
        def call(layer: nn.Module, args: tuple, *_: object) -> None:
            visit(name, layer, args)
            seen.add(name)
            if len(seen) == len(layers):
                raise _StageDone
        return call

    handles = [layer.register_forward_hook(hook(name)) if after else layer.register_forward_pre_hook(hook(name))
               for name, layer in layers.items()]
    try:
        for batch in batches:
            seen.clear()
            try:
                with torch.no_grad():  # statistics only: no autograd graph of the prefix (its activations)
                    call_model(model, batch)
            except _StageDone:
                pass
            release_free_memory()
    finally:
        for h in handles:
            h.remove()


def collect_stats(model: nn.Module, layers: dict[str, QuantMixin], batches: list[Batch],
                  max_rows: int = SAMPLE_ROWS,
                  reducer: Reducer = LOCAL) -> dict[str, LayerStats | dict[str, LayerStats]]:
    """Input statistics of ``layers`` over ``batches`` (smoothed inputs, as the weight sees them),
    keeping up to ``max_rows`` sampled rows per layer; a recurrent layer's are per matrix (name -> stats).
    ``reducer``: combined over its processes, each of which ran its own ``batches``."""
    stats: dict[str, Any] = {name: {} if isinstance(l, QuantRecurrent) else None for name, l in layers.items()}

    def visit(name: str, layer: nn.Module, args: tuple) -> None:
        if isinstance(layer, QuantRecurrent):
            record_matrix_inputs(layer, args, stats[name], max_rows)
            return
        rows = input_rows(layer, layer.smooth(args[0]))
        if stats[name] is None:
            stats[name] = LayerStats(rows.shape[1], max_rows=max_rows, seed=reducer.rank)
        stats[name].update(rows)

    _run_prefix(model, layers, batches, visit)
    for name, layer in layers.items():
        if isinstance(layer, QuantRecurrent):
            reduced = {m: reduce_stats(stats[name].get(m), reducer, max_rows) for m in layer.matrix_names}
            stats[name] = {m: s for m, s in reduced.items() if s is not None}
        else:
            stats[name] = reduce_stats(stats[name], reducer, max_rows)
    return stats


def observers_of(layers: dict[str, QuantMixin]) -> list[Observer]:
    """The activation observers of ``layers`` in a fixed order (a recurrent layer's: one per static grid)."""
    out: list[Observer] = []
    for layer in layers.values():
        observer = layer.act_observer
        if isinstance(observer, StateObservers):
            out.extend(observer.observers.values())
        elif observer is not None:
            out.append(observer)
    return out


def observe_stage(model: nn.Module, layers: dict[str, QuantMixin], batches: list[Batch],
                  reducer: Reducer = LOCAL) -> None:
    """Static activation ranges of a just-quantized stage, so that later stages see quantized inputs."""
    static = {n: l for n, l in layers.items() if l.act_observer is not None}
    if not static:
        return
    for layer in static.values():
        layer.mode = "observe"

    def observe() -> None:
        _run_prefix(model, static, batches, lambda *_: None, after=True)

    observe()
    reduce_observers(observers_of(static), reducer, observe)
    for layer in static.values():
        layer.freeze_activation()
        layer.reset_observer()


def _measure(layer: QuantMixin, original: Tensor, stats: LayerStats | None) -> None:
    """Errors against the float weight the algorithm replaced: the weight's, and the layer's output
    on the sampled calibration rows (``original`` and the result both see the raw rows)."""
    layer.weight_error = ErrorStats.between(original, layer.effective_weight())
    if not isinstance(layer, QuantLinear) or stats is None or not stats.count:
        return
    rows = stats.sample
    raw = rows if layer.input_scale is None else rows / layer.input_scale  # rows were collected smoothed
    h = layer.rotation_matrix()
    if h is not None:  # and rotated: the rotation is its own inverse
        raw = rotate(raw, h)
    with torch.no_grad():
        reference = torch.nn.functional.linear(raw, original.reshape(original.shape[0], -1), layer.bias)
        layer.output_error.update(reference, layer._op(layer.quantize_input(layer.smooth(raw)), layer.quantized_weight()))


def run_algorithm(model: nn.Module, algorithm: Algorithm, batches: list[Batch], progress: bool = True,
                  reducer: Reducer = LOCAL) -> list[str]:
    """Apply ``algorithm`` stage by stage; returns the layers it treated (others keep RTN: embeddings and embedding
    bags; a recurrent layer is treated when the algorithm applies to one of its matrices). ``reducer``: this
    process's ``batches`` are its share, and statistics are combined over the reducer's processes."""
    all_layers = quant_layers(model)
    targets = [n for n, l in all_layers.items() if _applies(algorithm, l)]
    groups = stages(model, targets)
    for layer in all_layers.values():
        layer.mode = "float"
    for layer in (l for n, l in all_layers.items() if n not in targets):
        layer.mode = "simulate"
    for group in with_progress(groups, algorithm.name, progress):
        _quantize_stage(model, algorithm, {n: all_layers[n] for n in group}, batches, reducer)
    return targets


def _applies(algorithm: Algorithm, layer: QuantMixin) -> bool:
    if isinstance(layer, QuantRecurrent):
        return any(algorithm.applies_to(view) for view in matrix_views(layer).values())
    return not isinstance(layer, (QuantEmbedding, QuantEmbeddingBag)) and algorithm.applies_to(layer)


def _quantize_layer(algorithm: Algorithm, layer: QuantMixin, stats: LayerStats | dict[str, LayerStats] | None) -> None:
    """The algorithm on one layer, or on each matrix of a recurrent layer it applies to (the others keep RTN)."""
    if not isinstance(layer, QuantRecurrent):
        algorithm.quantize_layer(layer, stats)
        return
    for name, view in matrix_views(layer).items():
        if algorithm.applies_to(view):
            algorithm.quantize_layer(view, (stats or {}).get(name))


def _quantize_stage(model: nn.Module, algorithm: Algorithm, layers: dict[str, QuantMixin], batches: list[Batch],
                    reducer: Reducer) -> None:
    """One stage: statistics, the algorithm, activation ranges, errors; its statistics and float
    weights are freed on return, before the next stage collects its own."""
    stats = (collect_stats(model, layers, batches, algorithm.sample_rows, reducer) if algorithm.needs_stats
             else {n: None for n in layers})
    originals = {name: layer.weight.detach().clone() for name, layer in layers.items()}
    for name, layer in layers.items():
        _quantize_layer(algorithm, layer, stats[name])
    observe_stage(model, layers, batches, reducer)
    for name, layer in layers.items():
        _measure(layer, originals.pop(name), stats[name])
    for layer in layers.values():
        layer.mode = "simulate"

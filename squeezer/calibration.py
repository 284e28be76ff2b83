"""Calibration batches: validation, calling the model, a check that they fit it, and a progress bar.

A batch is a tensor (``model(batch)``), a tuple / list of tensors (``model(*batch)``) or a
keyword mapping (``model(**batch)``: a dict, or a tokenizer's ``BatchEncoding``). Labelled pairs are
accepted as they come from a ``DataLoader``: the elements of a tuple / list beyond the positional inputs
``model.forward`` takes are targets and are left out, so ``(x, y)`` gives ``model(x)`` to a
``forward(x)``.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Iterator, Mapping
from functools import lru_cache
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import Tensor, nn

from .memory import release_free_memory
from .errors import DataError, SqueezerError, one_line

Batch = Tensor | tuple | list | Mapping


def _tensors(batch: Any) -> Iterator[tuple[str, Tensor]]:
    if isinstance(batch, Tensor):
        yield "input", batch
    elif isinstance(batch, (tuple, list)):
        for i, item in enumerate(batch):
            for key, t in _tensors(item):
                yield f"[{i}]" if key == "input" else f"[{i}]{key}", t
    elif isinstance(batch, Mapping):
        for name, item in batch.items():
            for key, t in _tensors(item):
                yield str(name) if key == "input" else f"{name}{key}", t


def check_batches(calib: Iterable[Batch]) -> list[Batch]:
    """Materialise and validate: non-empty, every tensor finite. Errors name batch and field."""
    if isinstance(calib, (Tensor, Mapping)):
        raise DataError("calib must be an iterable of batches (e.g. a list or DataLoader), not a single batch")
    batches = list(calib)
    if not batches:
        raise DataError("calibration data is empty: give at least one batch")
    for i, batch in enumerate(batches):
        if not isinstance(batch, (Tensor, tuple, list, Mapping)):
            raise DataError(f"calibration batch {i} is a {type(batch).__name__}; expected a tensor, tuple or dict")
        named = list(_tensors(batch))
        if not named:
            raise DataError(f"calibration batch {i} holds no tensors")
        for key, t in named:
            if t.numel() == 0:
                raise DataError(f"calibration batch {i} ({key}) is empty")
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise DataError(f"calibration batch {i} ({key}) contains NaN or Inf")
    return batches


@lru_cache(maxsize=256)
def _positional_inputs(forward: Any) -> float:
    """How many positional inputs the (unbound) ``forward`` takes after ``self``; ``inf`` with ``*args``."""
    try:
        params = list(inspect.signature(forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return float("inf")
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return float("inf")
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)


def model_inputs(model: nn.Module, batch: Batch) -> Batch:
    """What of ``batch`` the model takes: a tuple / list cut to the positional inputs of its
    ``forward`` (the rest, e.g. the ``y`` of ``(x, y)``, are targets); anything else unchanged."""
    if isinstance(batch, (tuple, list)):
        limit = _positional_inputs(getattr(type(model), "forward"))
        if len(batch) > limit:
            return tuple(batch[:int(limit)])
    return batch


def call_model(model: nn.Module, batch: Batch) -> Any:
    """``model(batch)``, ``model(*inputs)`` (:func:`model_inputs`) or ``model(**batch)``."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*model_inputs(model, batch))
    return model(batch)


_FIRST_LAYER_INPUT = {
    nn.Linear: lambda m: f"takes {m.in_features} input features (shape [rows, ..., {m.in_features}])",
    nn.Conv1d: lambda m: f"takes {m.in_channels} channels (shape [rows, {m.in_channels}, length])",
    nn.Conv2d: lambda m: f"takes {m.in_channels} channels (shape [rows, {m.in_channels}, height, width])",
    nn.Embedding: lambda m: f"takes integer token ids below {m.num_embeddings} (shape [rows, tokens])",
}


def first_layer_input(model: nn.Module) -> str:
    """What the model's first quantizable layer takes, e.g. ``"its first layer 'fc1' (Linear) takes 61 input
    features (shape [rows, ..., 61])"``; empty when it has none."""
    for name, module in model.named_modules():
        for kind, describe in _FIRST_LAYER_INPUT.items():
            if isinstance(module, kind):
                return f"its first layer {name!r} ({kind.__name__}) {describe(module)}"
    return ""


def describe_batch(batch: Batch) -> str:
    """Each tensor's name, shape and dtype, e.g. ``"input [32, 5] float32"``."""
    return ", ".join(f"{key} {list(t.shape)} {str(t.dtype).removeprefix('torch.')}" for key, t in _tensors(batch))


def check_fits(model: nn.Module, batch: Batch, where: str, error: type[SqueezerError] = DataError) -> None:
    """Run ``model`` once on ``batch`` (without gradients) before any long work; when it fails, ``error``
    naming ``where`` (the file, flag or argument that gave the batch), each input's shape and dtype and
    what the model's first quantizable layer takes. The model runs in eval mode (its mode is restored)."""
    was_training = model.training
    try:
        batch_outputs(model.eval(), batch)
    except SqueezerError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's model may raise anything on inputs it cannot take
        expected = first_layer_input(model)
        reason = one_line(f"{type(exc).__name__}: {exc}")
        raise error(f"{where}: inputs {describe_batch(model_inputs(model, batch))} do not fit the model"
                    f"{'; ' + expected if expected else ''} ({reason})") from None
    finally:
        model.train(was_training)


def output_tensors(output: Any) -> list[Tensor]:
    """The floating tensors in a model output (tensor, tuple, dict or a ``ModelOutput``)."""
    if isinstance(output, Tensor):
        return [output] if output.is_floating_point() else []
    if isinstance(output, dict) or hasattr(output, "to_tuple"):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in output_tensors(item)]
    return []


def batch_outputs(model: nn.Module, batch: Batch) -> list[Tensor]:
    """The floating output tensors of ``model`` on one batch, without gradients."""
    with torch.no_grad():
        return [t.detach() for t in output_tensors(call_model(model, batch))]


def with_progress(items: list[Any], label: str, progress: bool = True) -> Iterator[Any]:
    """The items, behind a transient progress bar (on a terminal, for more than one item); the
    memory each step freed goes back to the OS before the next one starts."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    show = progress and len(items) > 1 and Console(stderr=True).is_terminal
    with Progress(*columns, console=Console(stderr=True), transient=True, disable=not show) as bar:
        task = bar.add_task(label, total=len(items))
        for item in items:
            yield item
            release_free_memory()
            bar.advance(task)


def run_batches(model: nn.Module, batches: list[Batch], label: str, progress: bool = True) -> list[list[Tensor]]:
    """Run ``model`` on every batch without gradients; returns each batch's output tensors."""
    return [batch_outputs(model, batch) for batch in with_progress(batches, label, progress)]


def batch_signature(batch: Batch) -> dict[str, Any]:
    """Kind (tensor / tuple / dict) and each input's per-row shape and dtype, JSON-ready."""
    kind = "dict" if isinstance(batch, Mapping) else "tuple" if isinstance(batch, (tuple, list)) else "tensor"
    items = batch.items() if isinstance(batch, Mapping) else enumerate(batch if kind == "tuple" else [batch])
    return {"kind": kind, "inputs": [{"name": str(k), "shape": list(t.shape[1:]), "dtype": str(t.dtype).removeprefix("torch.")}
                                     for k, t in items]}


def example_from_signature(signature: dict[str, Any], rows: int = 1) -> Batch:
    """Zero-filled example batch of ``rows`` rows matching :func:`batch_signature`."""
    tensors = {i["name"]: torch.zeros(rows, *i["shape"], dtype=getattr(torch, i["dtype"])) for i in signature["inputs"]}
    if signature["kind"] == "dict":
        return tensors
    values = tuple(tensors.values())
    return values if signature["kind"] == "tuple" else values[0]

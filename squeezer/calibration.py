"""Calibration batches: validation, calling the model, and a progress bar.

A batch is a tensor (``model(batch)``), a tuple / list of tensors (``model(*batch)``) or a
keyword dict (``model(**batch)``, as tokenizers return).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import Tensor, nn

from .memory import release_free_memory
from .errors import DataError

Batch = Tensor | tuple | list | dict


def _tensors(batch: Any) -> Iterator[tuple[str, Tensor]]:
    if isinstance(batch, Tensor):
        yield "input", batch
    elif isinstance(batch, (tuple, list)):
        for i, item in enumerate(batch):
            for key, t in _tensors(item):
                yield f"[{i}]" if key == "input" else f"[{i}]{key}", t
    elif isinstance(batch, dict):
        for name, item in batch.items():
            for key, t in _tensors(item):
                yield str(name) if key == "input" else f"{name}{key}", t


def check_batches(calib: Iterable[Batch]) -> list[Batch]:
    """Materialise and validate: non-empty, every tensor finite. Errors name batch and field."""
    if isinstance(calib, (Tensor, dict)):
        raise DataError("calib must be an iterable of batches (e.g. a list or DataLoader), not a single batch")
    batches = list(calib)
    if not batches:
        raise DataError("calibration data is empty: give at least one batch")
    for i, batch in enumerate(batches):
        if not isinstance(batch, (Tensor, tuple, list, dict)):
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


def call_model(model: nn.Module, batch: Batch) -> Any:
    """``model(batch)``, ``model(*batch)`` or ``model(**batch)``."""
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


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
    kind = "dict" if isinstance(batch, dict) else "tuple" if isinstance(batch, (tuple, list)) else "tensor"
    items = batch.items() if isinstance(batch, dict) else enumerate(batch if kind == "tuple" else [batch])
    return {"kind": kind, "inputs": [{"name": str(k), "shape": list(t.shape[1:]), "dtype": str(t.dtype).removeprefix("torch.")}
                                     for k, t in items]}


def example_from_signature(signature: dict[str, Any], rows: int = 1) -> Batch:
    """Zero-filled example batch of ``rows`` rows matching :func:`batch_signature`."""
    tensors = {i["name"]: torch.zeros(rows, *i["shape"], dtype=getattr(torch, i["dtype"])) for i in signature["inputs"]}
    if signature["kind"] == "dict":
        return tensors
    values = tuple(tensors.values())
    return values if signature["kind"] == "tuple" else values[0]

"""The callable an exported file is loaded as: ``run(*inputs, **named_inputs)``.

A :class:`Runner` maps positional and keyword inputs (numpy arrays or torch tensors) onto the file's
named inputs, cast to their types, and runs ``_run``; outputs come back as torch tensors when any
input was a tensor, else as numpy arrays; one output bare, several as a tuple. An input the file cannot
take (not numbers, another rank, another size on a fixed axis after the batch axis) is a
:class:`ModelError` naming it, the shape and dtype expected and those given, before the runtime sees it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ModelError, excerpt, one_line

Arrays = dict[str, np.ndarray]
Shape = tuple[int | None, ...]
"""An input's shape as the file declares it; ``None`` for an axis of any size."""
_NUMERIC_KINDS = "biuf"


class Runner:
    """Maps ``(*args, **kwargs)`` onto named inputs (``self.inputs``: name, numpy dtype) and runs ``_run``."""

    path: Path
    inputs: list[tuple[str, Any]]
    shapes: dict[str, Shape] = {}
    """Declared shapes by input name (inputs without an entry are not checked); axis 0, the batch axis,
    is never checked: runners resize it or run blocks of it."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if len(args) > len(self.inputs):
            raise ModelError(f"{self.path.name} takes {len(self.inputs)} input(s), got {len(args)}")
        types = dict(self.inputs)
        feeds = dict(zip(types, args))
        for name, value in kwargs.items():
            if name not in types:
                raise ModelError(f"{self.path.name} has no input {name!r}; inputs: {list(types)}")
            feeds[name] = value
        missing = [n for n in types if n not in feeds]
        if missing:
            raise ModelError(f"{self.path.name}: missing input(s) {missing}")
        as_torch = any(isinstance(v, torch.Tensor) for v in feeds.values())
        arrays = {name: self._array(name, feeds[name], dtype) for name, dtype in self.inputs}
        outputs = self._run(arrays)
        if as_torch:
            outputs = [torch.from_numpy(np.ascontiguousarray(o)) for o in outputs]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    def _array(self, name: str, value: Any, dtype: Any) -> np.ndarray:
        """``value`` as a contiguous array of ``dtype``, checked against the declared shape of ``name``."""
        given = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        expected = self.shapes.get(name)
        want = f"{np.dtype(dtype).name if dtype is not None else 'any'} of shape {_shape_text(expected)}"
        if given.dtype.kind not in _NUMERIC_KINDS:
            raise ModelError(f"{self.path.name}: input {name!r} takes {want}, got {given.dtype} values "
                             f"{excerpt(given.tolist() if given.size <= 8 else given.shape)}")
        if given.ndim and given.shape[0] == 0:
            raise ModelError(f"{self.path.name}: input {name!r} takes {want}, got no rows (shape {list(given.shape)})")
        if expected is not None and (given.ndim != len(expected) or any(
                e is not None and e != g for e, g in zip(expected[1:], given.shape[1:]))):
            raise ModelError(f"{self.path.name}: input {name!r} takes {want}, got {given.dtype} of shape "
                             f"{list(given.shape)}")
        return np.ascontiguousarray(given, dtype=dtype)

    def _failed(self, feeds: Arrays, exc: Exception) -> ModelError:
        """The runtime's error on ``feeds`` as a :class:`ModelError` naming each input's expected and given form."""
        inputs = "; ".join(f"{name!r} takes {_shape_text(self.shapes.get(name))} {np.dtype(dtype).name if dtype else ''}, "
                           f"got {list(feeds[name].shape)} {feeds[name].dtype}" for name, dtype in self.inputs)
        return ModelError(f"{self.path.name}: the runtime refused the inputs ({inputs}): {one_line(exc)}")

    def _run(self, feeds: Arrays) -> list[np.ndarray]:  # pragma: no cover - abstract
        raise NotImplementedError


def _shape_text(shape: Shape | None) -> str:
    """``[?, 61]``; ``any`` when undeclared."""
    return "any" if shape is None else "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def in_chunks(run: Callable[[Arrays], list[np.ndarray]], feeds: Arrays, rows: int) -> list[np.ndarray]:
    """``run`` on blocks of ``rows`` rows (the last one zero-padded), outputs concatenated on axis 0."""
    n = len(next(iter(feeds.values())))
    parts = []
    for start in range(0, n, rows):
        chunk = {k: v[start:start + rows] for k, v in feeds.items()}
        short = rows - len(next(iter(chunk.values())))
        chunk = {k: np.concatenate([v, np.zeros((short, *v.shape[1:]), v.dtype)]) for k, v in chunk.items()}
        parts.append([o[:rows - short] for o in run(chunk)])
    return [np.concatenate(outs) for outs in zip(*parts)]

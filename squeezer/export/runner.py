"""The callable an exported file is loaded as: ``run(*inputs, **named_inputs)``.

A :class:`Runner` maps positional and keyword inputs (numpy arrays or torch tensors) onto the file's
named inputs, cast to their types, and runs ``_run``; outputs come back as torch tensors when any
input was a tensor, else as numpy arrays; one output bare, several as a tuple.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ModelError

Arrays = dict[str, np.ndarray]


class Runner:
    """Maps ``(*args, **kwargs)`` onto named inputs (``self.inputs``: name, numpy dtype) and runs ``_run``."""

    path: Path
    inputs: list[tuple[str, Any]]

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
        arrays = {name: np.ascontiguousarray(feeds[name].detach().cpu().numpy() if isinstance(feeds[name], torch.Tensor)
                                             else feeds[name], dtype=dtype) for name, dtype in self.inputs}
        outputs = self._run(arrays)
        if as_torch:
            outputs = [torch.from_numpy(np.ascontiguousarray(o)) for o in outputs]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    def _run(self, feeds: Arrays) -> list[np.ndarray]:  # pragma: no cover - abstract
        raise NotImplementedError


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

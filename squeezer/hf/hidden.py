"""The hidden states of the calibration batches at one depth of the model, in memory or spilled to disk.

Batch ``j`` holds a float32 array of ``shapes[j]``. When ``sum_j prod(shapes[j]) * 4`` bytes exceed the memory
bound, the arrays live in one numpy memmap file under ``spill_dir`` instead (tensors read back are views of
the map, so resident memory holds only the pages in use); :meth:`HiddenStore.close` removes the file."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor


class HiddenStore:
    def __init__(self, shapes: list[tuple[int, ...]], max_bytes: int, spill_dir: Path) -> None:
        self.shapes = [tuple(s) for s in shapes]
        sizes = [math.prod(s) for s in self.shapes]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.spilled = int(self.offsets[-1]) * 4 > max_bytes
        self._memory: list[Tensor | None] = [None] * len(shapes)
        self._path: Path | None = None
        if self.spilled:
            spill_dir.mkdir(parents=True, exist_ok=True)
            handle, name = tempfile.mkstemp(prefix=".squeezer-hidden-", suffix=".f32", dir=spill_dir)
            self._path = Path(name)
            with open(handle, "wb"):
                pass
            self._map = np.memmap(self._path, dtype=np.float32, mode="w+", shape=(max(int(self.offsets[-1]), 1),))

    def __len__(self) -> int:
        return len(self.shapes)

    def __setitem__(self, j: int, value: Tensor) -> None:
        value = value.detach().float()
        if tuple(value.shape) != self.shapes[j]:
            raise ValueError(f"hidden states {j}: shape {list(value.shape)}, expected {list(self.shapes[j])}")
        if self.spilled:
            self._map[self.offsets[j]:self.offsets[j + 1]] = value.reshape(-1).numpy()
        else:
            self._memory[j] = value.clone()

    def __getitem__(self, j: int) -> Tensor:
        if not self.spilled:
            return self._memory[j]
        return torch.from_numpy(self._map[self.offsets[j]:self.offsets[j + 1]]).reshape(self.shapes[j])

    def close(self) -> None:
        self._memory = [None] * len(self.shapes)
        if self._path is not None:
            del self._map
            self._path.unlink(missing_ok=True)
            self._path = None

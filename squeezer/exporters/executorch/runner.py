"""ExecuTorch ``.pte`` programs run by the ExecuTorch runtime (portable kernels + XNNPACK) as a callable."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ...errors import ModelError
from ..base import require_extra
from ..runner import Arrays, Runner, in_chunks

# ExecuTorch ScalarType codes (c10 numbering)
_ET_TYPES = {0: np.uint8, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.int64, 6: np.float32, 7: np.float64, 11: np.bool_}


class PteModule(Runner):
    """A callable over an ExecuTorch program's ``forward`` (portable kernels + XNNPACK). Inputs are
    positional (``input_0, ...``, the export's order); more rows than the planned maximum (or another
    count than a fixed batch) run in blocks of it."""

    def __init__(self, path: str | Path) -> None:
        runtime = require_extra("executorch.runtime", "executorch")
        require_extra("executorch.kernels.quantized", "executorch")  # kernels of the quantized ops
        self.path = Path(path)
        try:
            self.method = runtime.Runtime.get().load_program(self.path).load_method("forward")
        except (ValueError, RuntimeError) as exc:
            raise ModelError(f"ExecuTorch cannot load {path}: {exc}") from None
        meta = self.method.metadata
        infos = [meta.input_tensor_meta(i) for i in range(meta.num_inputs())]
        self.inputs = [(f"input_{i}", _ET_TYPES.get(info.dtype())) for i, info in enumerate(infos)]
        # planned sizes are upper bounds of dynamic axes: only the rank is checked here
        self.shapes = {f"input_{i}": (None,) * len(info.sizes()) for i, info in enumerate(infos)}
        self.rows = int(infos[0].sizes()[0]) if infos and infos[0].sizes() else 1

    def _execute(self, feeds: Arrays) -> list[np.ndarray]:
        try:
            outputs = self.method.execute([torch.from_numpy(v) for v in feeds.values()])
        except (RuntimeError, ValueError, TypeError) as exc:
            raise self._failed(feeds, exc) from None
        return [o.numpy() for o in outputs]

    def _run(self, feeds: Arrays) -> list[np.ndarray]:
        if len(next(iter(feeds.values()))) <= self.rows:
            try:
                return self._execute(feeds)
            except ModelError:  # a batch axis fixed at export: pad to it
                pass
        return in_chunks(self._execute, feeds, self.rows)

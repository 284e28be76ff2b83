"""Run an exported model like a module: ``squeezer.runtime.load(path)(x)``.

``OnnxModule`` wraps an ONNX Runtime session: positional or keyword inputs as numpy arrays or
torch tensors (cast to the graph's input types), outputs returned as torch tensors when any
input was a tensor, else as numpy arrays; one output comes back bare, several as a tuple.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import ModelError

_ONNX_TYPES = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(int32)": np.int32,
               "tensor(double)": np.float64, "tensor(bool)": np.bool_, "tensor(uint8)": np.uint8, "tensor(int8)": np.int8}


class OnnxModule:
    """A callable over an ONNX Runtime ``InferenceSession`` (CPU)."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
            raise ModelError(f"ONNX Runtime cannot load {path}: {exc}") from None
        self.path = Path(path)
        self.inputs = [(i.name, _ONNX_TYPES.get(i.type)) for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if len(args) > len(self.inputs):
            raise ModelError(f"{self.path.name} takes {len(self.inputs)} input(s), got {len(args)}")
        feeds: dict[str, np.ndarray] = {}
        as_torch = False
        for (name, dtype), value in zip(self.inputs, args):
            feeds[name] = value
        for name, value in kwargs.items():
            if name not in dict(self.inputs):
                raise ModelError(f"{self.path.name} has no input {name!r}; inputs: {[n for n, _ in self.inputs]}")
            feeds[name] = value
        missing = [n for n, _ in self.inputs if n not in feeds]
        if missing:
            raise ModelError(f"{self.path.name}: missing input(s) {missing}")
        types = dict(self.inputs)
        for name, value in feeds.items():
            if isinstance(value, torch.Tensor):
                as_torch = True
                value = value.detach().cpu().numpy()
            feeds[name] = np.ascontiguousarray(value, dtype=types[name])
        outputs = self.session.run(self.output_names, feeds)
        if as_torch:
            outputs = [torch.from_numpy(o) for o in outputs]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)


def load(path: str | Path, threads: int | None = None) -> OnnxModule:
    """Load an exported ``.onnx`` file as a callable."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"exported model {path} does not exist")
    if path.suffix != ".onnx":
        raise ModelError(f"{path}: unknown export format {path.suffix!r} (this runtime reads .onnx)")
    return OnnxModule(path, threads)

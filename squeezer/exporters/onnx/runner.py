"""ONNX files run by ONNX Runtime (CPU) as a callable."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...errors import ModelError
from ..runner import Arrays, Runner

_ONNX_TYPES = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(int32)": np.int32,
               "tensor(double)": np.float64, "tensor(bool)": np.bool_, "tensor(uint8)": np.uint8, "tensor(int8)": np.int8}


class OnnxModule(Runner):
    """A callable over an ONNX Runtime ``InferenceSession`` (CPU).

    ``spinning=False`` stops the intra-op worker threads from spin-waiting after a call: a little
    slower back to back, but they no longer take the cores from other work between requests
    (e.g. several sessions, or a server doing more than inference).

    ONNX Runtime fuses a ``DequantizeLinear`` weight in front of ``MatMul`` into ``MatMulNBits``, which
    by default (accuracy level 4) also quantizes the activations: the session sets
    ``session.qdq_matmulnbits_accuracy_level=1`` (fp32 activations), so such layers compute what the
    file says. squeezer's own ``MatMulNBits`` nodes keep the level written in them."""

    def __init__(self, path: str | Path, threads: int | None = None, spinning: bool = True) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
        if threads is not None:
            options.intra_op_num_threads = threads
        if not spinning:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
            raise ModelError(f"ONNX Runtime cannot load {path}: {exc}") from None
        self.path = Path(path)
        self.inputs = [(i.name, _ONNX_TYPES.get(i.type)) for i in self.session.get_inputs()]
        self.shapes = {i.name: tuple(d if isinstance(d, int) else None for d in i.shape) for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]

    def _run(self, feeds: Arrays) -> list[np.ndarray]:
        try:
            return self.session.run(self.output_names, feeds)
        except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types (InvalidArgument, Fail, ...)
            raise self._failed(feeds, exc) from None

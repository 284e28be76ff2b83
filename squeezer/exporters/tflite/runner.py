"""TFLite files run by the LiteRT interpreter (CPU) as a callable, int8 input / output scaling hidden."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ...errors import ModelError
from ..base import require_extra
from ..runner import Arrays, Runner, in_chunks


def _signature_order(names: list[str], prefix: str) -> list[str]:
    """``args_0, args_1, ...`` (``output_0, ...``) by number, then the keyword names in file order."""
    numbered = sorted((n for n in names if n.removeprefix(prefix).isdigit()), key=lambda n: int(n.removeprefix(prefix)))
    return numbered + [n for n in names if n not in numbered]


class TfliteModule(Runner):
    """A callable over a LiteRT interpreter (CPU).

    An int8 input takes floats, quantized here as ``clip(round(x / s) + z)`` with the file's scale and
    zero point (squeezer's rounding of the first layer's input); an int8 output is returned as
    ``(q - z) * s``. Built-in kernels by default: XNNPACK's dynamic-range path quantizes rows
    asymmetrically, unlike squeezer (~1 % apart); ``xnnpack=True`` for its speed. The batch size
    is the exported one; another is resized when the graph allows it, else run in blocks of it.
    """

    def __init__(self, path: str | Path, threads: int | None = None, xnnpack: bool = False) -> None:
        lite = require_extra("ai_edge_litert.interpreter", "tflite")
        resolver = lite.OpResolverType.AUTO if xnnpack else lite.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        self.path = Path(path)
        self._interpreter = lambda: lite.Interpreter(model_path=str(path), num_threads=threads,
                                                     experimental_op_resolver_type=resolver)
        try:
            self._load()
        except (ValueError, RuntimeError) as exc:
            raise ModelError(f"LiteRT cannot load {path}: {exc}") from None
        details = self.runner.get_input_details()
        self.input_details, self.output_details = details, self.runner.get_output_details()
        self.inputs = [(n, np.float32 if self._quantized(details[n]) else details[n]["dtype"])
                       for n in _signature_order(list(details), "args_")]
        self.output_names = _signature_order(list(self.output_details), "output_")
        self.shapes = {n: tuple(None if s < 0 else int(s) for s in details[n].get("shape_signature", details[n]["shape"]))
                       for n, _ in self.inputs}
        self.rows = int(details[self.inputs[0][0]]["shape"][0]) if self.inputs else 1

    def _load(self) -> None:
        interpreter = self._interpreter()
        self.runner = interpreter.get_signature_runner(next(iter(interpreter.get_signature_list())))

    @staticmethod
    def _quantized(detail: dict[str, Any]) -> bool:
        return detail["dtype"] in (np.int8, np.uint8) and detail["quantization"][0] != 0

    def _invoke(self, feeds: Arrays) -> list[np.ndarray]:
        out = self.runner(**feeds)
        return [out[n] for n in self.output_names]

    def _run(self, feeds: Arrays) -> list[np.ndarray]:
        for name, value in feeds.items():
            detail = self.input_details[name]
            if self._quantized(detail):
                scale, zero = detail["quantization"]
                info = np.iinfo(detail["dtype"])
                feeds[name] = np.clip(np.round(value / np.float32(scale)) + zero, info.min, info.max).astype(detail["dtype"])
        try:
            outputs = self._invoke(feeds)
        except (ValueError, RuntimeError):  # a reshape fixed to the exported batch: run blocks of it
            self._load()
            try:
                outputs = in_chunks(self._invoke, feeds, self.rows)
            except (ValueError, RuntimeError) as exc:
                raise self._failed(feeds, exc) from None
        for i, name in enumerate(self.output_names):
            detail = self.output_details[name]
            if self._quantized(detail):
                scale, zero = detail["quantization"]
                outputs[i] = (outputs[i].astype(np.float32) - zero) * np.float32(scale)
        return outputs

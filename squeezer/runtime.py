"""Run an exported model like a module: ``squeezer.runtime.load(path)(x)``.

By suffix: ``.onnx`` -> :class:`OnnxModule` (ONNX Runtime), ``.tflite`` -> :class:`TfliteModule`
(ai-edge-litert, extra ``squeezer[tflite]``), ``.pte`` -> :class:`PteModule` (ExecuTorch, extra
``squeezer[executorch]``). Each takes positional (or, ONNX / TFLite, keyword) inputs as numpy
arrays or torch tensors, cast to the model's input types; outputs come back as torch tensors when
any input was a tensor, else as numpy arrays; one output bare, several as a tuple.

Outputs vs squeezer's PyTorch model (relative L2 error, test MLP / CNN): ONNX see the README;
TFLite ``w8a8`` Linear layers <= 1e-5 (TFLite's built-in hybrid kernels quantize rows exactly as
squeezer), ``w8`` / integer codebooks and dynamic convolutions <= 3 % (TFLite also quantizes the
activations), quantized embeddings exact, ``w8a8-static`` <= 3 % (TFLite's int8 requantization and
extra output grids, listed in the export's warnings; none with ``unquantized_outputs="float"``);
ExecuTorch weight-only and static <= 1e-3 (portable kernels are exact, XNNPACK's int8 GEMMs round
the requantization their own way), dynamic <= 3 % (XNNPACK's asymmetric per-row quantization).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import ConfigError, ModelError

_ONNX_TYPES = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(int32)": np.int32,
               "tensor(double)": np.float64, "tensor(bool)": np.bool_, "tensor(uint8)": np.uint8, "tensor(int8)": np.int8}
# ExecuTorch ScalarType codes (c10 numbering)
_ET_TYPES = {0: np.uint8, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.int64, 6: np.float32, 7: np.float64, 11: np.bool_}
Arrays = dict[str, np.ndarray]


class _Runner:
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


def _in_chunks(run: Callable[[Arrays], list[np.ndarray]], feeds: Arrays, rows: int) -> list[np.ndarray]:
    """``run`` on blocks of ``rows`` rows (the last one zero-padded), outputs concatenated on axis 0."""
    n = len(next(iter(feeds.values())))
    parts = []
    for start in range(0, n, rows):
        chunk = {k: v[start:start + rows] for k, v in feeds.items()}
        short = rows - len(next(iter(chunk.values())))
        chunk = {k: np.concatenate([v, np.zeros((short, *v.shape[1:]), v.dtype)]) for k, v in chunk.items()}
        parts.append([o[:rows - short] for o in run(chunk)])
    return [np.concatenate(outs) for outs in zip(*parts)]


class OnnxModule(_Runner):
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
        self.output_names = [o.name for o in self.session.get_outputs()]

    def _run(self, feeds: Arrays) -> list[np.ndarray]:
        return self.session.run(self.output_names, feeds)


def _signature_order(names: list[str], prefix: str) -> list[str]:
    """``args_0, args_1, ...`` (``output_0, ...``) by number, then the keyword names in file order."""
    numbered = sorted((n for n in names if n.removeprefix(prefix).isdigit()), key=lambda n: int(n.removeprefix(prefix)))
    return numbered + [n for n in names if n not in numbered]


class TfliteModule(_Runner):
    """A callable over a LiteRT interpreter (CPU).

    An int8 input takes floats, quantized here as ``clip(round(x / s) + z)`` with the file's scale and
    zero point (squeezer's rounding of the first layer's input); an int8 output is returned as
    ``(q - z) * s``. Built-in kernels by default: XNNPACK's dynamic-range path quantizes rows
    asymmetrically, unlike squeezer (~1 % apart); ``xnnpack=True`` for its speed. The batch size
    is the exported one; another is resized when the graph allows it, else run in blocks of it.
    """

    def __init__(self, path: str | Path, threads: int | None = None, xnnpack: bool = False) -> None:
        from .io.export import require_extra

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
                outputs = _in_chunks(self._invoke, feeds, self.rows)
            except (ValueError, RuntimeError) as exc:
                raise ModelError(f"{self.path.name}: inputs of shapes {[v.shape for v in feeds.values()]} do not fit "
                                 f"the exported model: {exc}") from None
        for i, name in enumerate(self.output_names):
            detail = self.output_details[name]
            if self._quantized(detail):
                scale, zero = detail["quantization"]
                outputs[i] = (outputs[i].astype(np.float32) - zero) * np.float32(scale)
        return outputs


class PteModule(_Runner):
    """A callable over an ExecuTorch program's ``forward`` (portable kernels + XNNPACK). Inputs are
    positional (``input_0, ...``, the export's order); more rows than the planned maximum (or another
    count than a fixed batch) run in blocks of it."""

    def __init__(self, path: str | Path) -> None:
        from .io.export import require_extra

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
        self.rows = int(infos[0].sizes()[0]) if infos and infos[0].sizes() else 1

    def _execute(self, feeds: Arrays) -> list[np.ndarray]:
        try:
            outputs = self.method.execute([torch.from_numpy(v) for v in feeds.values()])
        except RuntimeError as exc:
            raise ModelError(f"{self.path.name}: ExecuTorch failed on inputs of shapes "
                             f"{[v.shape for v in feeds.values()]}: {exc}") from None
        return [o.numpy() for o in outputs]

    def _run(self, feeds: Arrays) -> list[np.ndarray]:
        if len(next(iter(feeds.values()))) <= self.rows:
            try:
                return self._execute(feeds)
            except ModelError:  # a batch axis fixed at export: pad to it
                pass
        return _in_chunks(self._execute, feeds, self.rows)


RUNNERS: dict[str, Callable[..., _Runner]] = {".onnx": OnnxModule, ".tflite": TfliteModule, ".pte": PteModule}


def load(path: str | Path, threads: int | None = None, **options: Any) -> _Runner:
    """Load an exported ``.onnx`` / ``.tflite`` / ``.pte`` file as a callable (``threads`` for ONNX
    Runtime and LiteRT; ``spinning=False`` for ONNX Runtime, see :class:`OnnxModule`;
    ``xnnpack=True`` for LiteRT's XNNPACK delegate)."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"exported model {path} does not exist")
    if path.suffix not in RUNNERS:
        raise ModelError(f"{path}: unknown export format {path.suffix!r} (this runtime reads {', '.join(RUNNERS)})")
    if threads is not None:
        if path.suffix == ".pte":
            raise ConfigError(f"{path}: threads applies to .onnx and .tflite models")
        options["threads"] = threads
    return RUNNERS[path.suffix](path, **options)

"""Run an exported model like a module: ``squeezer.runtime.load(path)(x)``.

The runner is the one of the export format that the file's suffix belongs to
(:func:`squeezer.exporters.for_path`): ``.onnx`` -> :class:`~squeezer.exporters.onnx.OnnxModule` (ONNX Runtime),
``.tflite`` -> :class:`~squeezer.exporters.tflite.TfliteModule` (ai-edge-litert, extra ``squeezer[tflite]``),
``.pte`` -> :class:`~squeezer.exporters.executorch.PteModule` (ExecuTorch, extra ``squeezer[executorch]``), and
any registered plugin format. Each takes positional (or, ONNX / TFLite, keyword) inputs as numpy
arrays or torch tensors, cast to the model's input types; outputs come back as torch tensors when
any input was a tensor, else as numpy arrays; one output bare, several as a tuple. When the file has a
``NAME.sha256`` sidecar (written by :func:`squeezer.export`), its digest must match before it is loaded.

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

from .errors import ModelError
from .exporters import for_path, suffixes
from .io.digest import check_sidecar


def load(path: str | Path, threads: int | None = None, **options: Any) -> Callable[..., Any]:
    """Load an exported file (``.onnx``, ``.tflite``, ``.pte`` or a registered format's suffix) as a callable.
    ``threads``: intra-op threads (ONNX Runtime, LiteRT); ``options`` go to the format's runner
    (``spinning=False`` for ONNX Runtime, see :class:`~squeezer.exporters.onnx.OnnxModule`; ``xnnpack=True``
    for LiteRT's XNNPACK delegate). :class:`ModelError` when a sidecar digest does not match the file."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"exported model {path} does not exist")
    if path.suffix not in suffixes():
        raise ModelError(f"{path}: unknown export format {path.suffix!r} (this runtime reads {', '.join(suffixes())})")
    check_sidecar(path)
    if threads is not None:
        options["threads"] = threads
    return for_path(path).runner(path, **options)

"""Export formats as plugins: ``squeezer.export(model, example, "model.onnx")``.

One :class:`Exporter` per format, found by name or file suffix in a registry (:mod:`.base`); the
built-in formats are the subpackages :mod:`.onnx`, :mod:`.tflite` and :mod:`.executorch`, which
register themselves here. :func:`squeezer.runtime.load` and ``squeezer export`` look formats up in
the same registry, so a format registered with :func:`register` is usable everywhere at once.
"""

from __future__ import annotations

# the built-in formats register themselves, in this order
from . import onnx  # noqa: F401, I001
from . import tflite  # noqa: F401
from . import executorch  # noqa: F401
from .base import (
    ExportReport,
    Exporter,
    export,
    exporter_for,
    for_path,
    formats,
    get,
    register,
    require_extra,
    suffixes,
    unregister,
)
from .checkpoint import export_checkpoint
from .onnx import export_onnx
from .options import describe_options, options_from_text
from .runner import Runner

__all__ = [
    "ExportReport", "Exporter", "Runner", "export", "export_checkpoint", "exporter_for", "export_onnx", "for_path",
    "formats", "get", "register", "require_extra", "suffixes", "unregister", "describe_options", "options_from_text",
]

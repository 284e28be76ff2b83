"""The ``tflite`` export format (``.tflite``, extra ``squeezer[tflite]``): the QDQ form converted by
litert-torch (:mod:`.convert`, float weight constants rewritten as int8 by :mod:`.int8_weights`), run by
the LiteRT interpreter (:mod:`.runner`). litert-torch and ai-edge-litert are imported only when used."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from ..base import Exporter, ExportReport, register
from .convert import TfliteOptions, export_tflite
from .runner import TfliteModule


class TfliteExporter(Exporter):
    name = "tflite"
    suffixes = (".tflite",)
    summary = "LiteRT (TFLite), extra squeezer[tflite]"
    options = TfliteOptions

    def export(self, model: nn.Module, example_inputs: Any, path: Path, options: TfliteOptions) -> ExportReport:
        return export_tflite(model, example_inputs, path, options)

    def runner(self, path: Path, threads: int | None = None, xnnpack: bool = False) -> TfliteModule:
        return TfliteModule(path, threads=threads, xnnpack=xnnpack)


register(TfliteExporter())

__all__ = ["TfliteExporter", "TfliteModule", "TfliteOptions", "export_tflite"]

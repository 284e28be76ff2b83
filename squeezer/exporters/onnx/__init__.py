"""The ``onnx`` export format (``.onnx``): squeezer's integers in ONNX Runtime's integer kernels and QDQ
(:mod:`.graph`), a compacted graph (:mod:`.compact`), TensorRT's QDQ conventions checked (:mod:`.tensorrt`),
run by ONNX Runtime (:mod:`.runner`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from ..base import Exporter, ExportReport, register
from .graph import OnnxOptions, export_onnx
from .runner import OnnxModule


class OnnxExporter(Exporter):
    name = "onnx"
    suffixes = (".onnx",)
    summary = "ONNX Runtime / TensorRT"
    options = OnnxOptions

    def export(self, model: nn.Module, example_inputs: Any, path: Path, options: OnnxOptions) -> ExportReport:
        """:func:`export_onnx`, also for a model with no quantized layer (fp32, pruned)."""
        return export_onnx(model, example_inputs, path, require_quantized=False, **vars(options))

    def runner(self, path: Path, threads: int | None = None, spinning: bool = True) -> OnnxModule:
        return OnnxModule(path, threads=threads, spinning=spinning)


register(OnnxExporter())

__all__ = ["OnnxExporter", "OnnxModule", "OnnxOptions", "export_onnx"]

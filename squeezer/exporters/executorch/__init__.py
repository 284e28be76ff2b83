"""The ``executorch`` export format (``.pte``, extra ``squeezer[executorch]``): the QDQ form lowered to
XNNPACK (:mod:`.lower`), run by the ExecuTorch runtime (:mod:`.runner`). executorch is imported only when used."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from ...errors import ConfigError
from ..base import Exporter, ExportReport, register
from .lower import ExecutorchOptions, export_executorch
from .runner import PteModule


class ExecutorchExporter(Exporter):
    name = "executorch"
    suffixes = (".pte",)
    summary = "ExecuTorch with the XNNPACK delegate, extra squeezer[executorch]"
    options = ExecutorchOptions

    def export(self, model: nn.Module, example_inputs: Any, path: Path, options: ExecutorchOptions) -> ExportReport:
        return export_executorch(model, example_inputs, path, options)

    def runner(self, path: Path, threads: int | None = None) -> PteModule:
        if threads is not None:
            raise ConfigError(f"{path}: an ExecuTorch program takes no threads option")
        return PteModule(path)


register(ExecutorchExporter())

__all__ = ["ExecutorchExporter", "ExecutorchOptions", "PteModule", "export_executorch"]

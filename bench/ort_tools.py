"""ONNX Runtime's quantization tools as the peer benchmarks call them: pre-processing, calibration feeds."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from common import short_error


def ort_preprocess(fp32: Path, work: Path) -> tuple[Path, str]:
    """ORT's recommended quantization pre-processing (shape inference + graph optimization) of ``fp32`` into
    ``work/fp32_pre.onnx``, retried without symbolic shape inference (which gives up on some graphs, BERT's):
    ``(file to quantize, what was done)``; the raw export when both fail."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out = work / "fp32_pre.onnx"
    failures = []
    for skip_symbolic in (False, True):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                quant_pre_process(str(fp32), str(out), skip_symbolic_shape=skip_symbolic)
            return out, "quant_pre_process applied" + (" (skip_symbolic_shape=True)" if skip_symbolic else "")
        except Exception as exc:  # noqa: BLE001
            failures.append(short_error(exc))
    return fp32, f"quant_pre_process failed ({'; '.join(failures)}); quantized the raw export"


def calibration_reader(feeds: list[dict[str, np.ndarray]]) -> Any:
    """An ``onnxruntime.quantization.CalibrationDataReader`` that yields ``feeds`` once, in order."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(feeds)

        def get_next(self) -> dict | None:
            return next(self.it, None)

    return Reader()

"""A squeezer checkpoint exported to a file: the model rebuilt by a factory the caller names, an example
input from the checkpoint's recorded input signature (or a given shape), then :func:`squeezer.export`.

A checkpoint never names code that squeezer imports: its recorded ``model_factory`` is only quoted
in the error that asks for ``model``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..calibration import check_fits, example_from_signature
from ..errors import ConfigError, DataError, ModelError
from ..io.checkpoint import load, read_manifest
from ..io.user_model import load_factory
from .base import ExportReport, export


def export_checkpoint(directory: str | Path, path: str | Path, format: str | None = None, *, model: str | None = None,
                      input_shape: tuple[int, ...] | None = None, calib_source: str = "calib batch 0",
                      **options: Any) -> ExportReport:
    """Load the checkpoint in ``directory`` and export it to ``path`` (``format`` as :func:`squeezer.export`).

    ``model``: the factory ``pkg.module:function`` that builds the float model (required: it is imported
    and run; the factory a checkpoint records is never used);
    ``input_shape``: the shape of a zero example input (default: the checkpoint's recorded example);
    ``calib_source``: how an error names the calibration data of ``options["calib"]`` (the CLI: its flag and file);
    ``options``: the format's options."""
    path = Path(path)
    manifest = read_manifest(directory)
    if not model:
        recorded = manifest.get("model_factory")
        hint = f" (the checkpoint says it was written from {recorded[:200]!r})" if recorded else ""
        raise ConfigError(f"exporting checkpoint {directory} needs the model's factory: give --model "
                          f"pkg.module:factory{hint}; squeezer never imports code a checkpoint names")
    if input_shape is not None:
        example: Any = torch.zeros(*input_shape)
    elif "example_inputs" in manifest:
        example = example_from_signature(manifest["example_inputs"])
    else:
        raise ConfigError(f"checkpoint {directory} records no example input: give an input shape (--input-shape, e.g. 1x61)")
    net = load(directory, model=load_factory(model))
    if path.is_dir():
        raise DataError(f"export output {path} is a directory; give a file name such as model.onnx")
    check_fits(net, example, "recorded example input" if input_shape is None
               else f"input shape {'x'.join(map(str, input_shape))}", ModelError)
    if isinstance(options.get("calib"), list) and options["calib"]:
        check_fits(net, options["calib"][0], calib_source)
    return export(net, example, path, format, **options)

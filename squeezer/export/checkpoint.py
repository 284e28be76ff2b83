"""A squeezer checkpoint exported to a file: the model rebuilt from its recorded factory, an example
input from its recorded input signature (or a given shape), then :func:`squeezer.export`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..calibration import example_from_signature
from ..errors import ConfigError, DataError
from ..io.checkpoint import load, read_manifest
from ..io.user_model import load_factory
from .base import ExportReport, export


def export_checkpoint(directory: str | Path, path: str | Path, format: str | None = None, *, model: str | None = None,
                      input_shape: tuple[int, ...] | None = None, **options: Any) -> ExportReport:
    """Load the checkpoint in ``directory`` and export it to ``path`` (``format`` as :func:`squeezer.export`).

    ``model``: a factory ``pkg.module:function`` (default: the one the checkpoint records);
    ``input_shape``: the shape of a zero example input (default: the checkpoint's recorded example);
    ``options``: the format's options."""
    path = Path(path)
    manifest = read_manifest(directory)
    factory = model or manifest.get("model_factory")
    if not factory:
        raise ConfigError(f"checkpoint {directory} records no model factory: give one (pkg.module:factory, --model)")
    if input_shape is not None:
        example: Any = torch.zeros(*input_shape)
    elif "example_inputs" in manifest:
        example = example_from_signature(manifest["example_inputs"])
    else:
        raise ConfigError(f"checkpoint {directory} records no example input: give an input shape (--input-shape, e.g. 1x61)")
    net = load(directory, model=load_factory(factory))
    if path.is_dir():
        raise DataError(f"export output {path} is a directory; give a file name such as model.onnx")
    return export(net, example, path, format, **options)

"""The exporter interface and the registry of export formats.

An :class:`Exporter` writes a model in one format (``export``) and loads such a file back as a
callable (``runner``, what :func:`squeezer.runtime.load` returns). Its ``options`` is a dataclass
type: every field a keyword of :func:`export` with its default and a one-line help
(``field(metadata={"help": ...})``). Formats are found by name (:func:`get`) or by file suffix
(:func:`for_path`); the built-in ones (``squeezer.exporters.onnx``, ``.tflite``, ``.executorch``)
register themselves when :mod:`squeezer.exporters` is imported, and a plugin with :func:`register`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

from torch import nn

from ..calibration import check_fits
from ..errors import ConfigError, ModelError
from ..io.digest import write_sidecar
from .options import build_options


@dataclass
class ExportReport:
    """What each layer became in the exported file, and the warnings (layers stored in float, ...)."""

    path: str
    layers: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


class Exporter:
    """One export format: ``name``, file ``suffixes`` (``(".onnx",)``), a one-line ``summary`` and the
    ``options`` dataclass type; ``export`` writes a file, ``runner`` loads one as a callable."""

    name: ClassVar[str]
    suffixes: ClassVar[tuple[str, ...]]
    summary: ClassVar[str]
    options: ClassVar[type]

    def export(self, model: nn.Module, example_inputs: Any, path: Path, options: Any) -> ExportReport:
        """Write ``model`` (``example_inputs``: a tensor, a tuple or a keyword dict) to ``path``."""
        raise NotImplementedError

    def runner(self, path: Path, **runtime_options: Any) -> Callable[..., Any]:
        """``path`` loaded as a callable ``run(*inputs, **named_inputs)`` (see :mod:`squeezer.exporters.runner`)."""
        raise NotImplementedError


_REGISTRY: dict[str, Exporter] = {}


def register(exporter: Exporter) -> Exporter:
    """Add ``exporter``; its name and suffixes must be new. Returns it."""
    if exporter.name in _REGISTRY:
        raise ConfigError(f"an export format named {exporter.name!r} is already registered")
    taken = [s for s in exporter.suffixes if s in suffixes()]
    if taken:
        raise ConfigError(f"export format {exporter.name!r}: suffix {taken[0]!r} already belongs to "
                          f"{suffixes()[taken[0]]!r}")
    _REGISTRY[exporter.name] = exporter
    return exporter


def unregister(name: str) -> None:
    """Remove the format ``name`` (:func:`get`'s error when there is none)."""
    _REGISTRY.pop(get(name).name)


def formats() -> list[str]:
    """Names of the registered formats, in registration order."""
    return list(_REGISTRY)


def suffixes() -> dict[str, str]:
    """``{suffix: format name}`` over the registered formats."""
    return {suffix: name for name, exporter in _REGISTRY.items() for suffix in exporter.suffixes}


def _valid() -> str:
    return f"valid: {', '.join(formats())} (or a path ending in {', '.join(suffixes())})"


def get(name: str) -> Exporter:
    """The format called ``name``, or :class:`ConfigError` listing the formats."""
    if name not in _REGISTRY:
        raise ConfigError(f"unknown export format {name!r}; {_valid()}")
    return _REGISTRY[name]


def for_path(path: str | Path) -> Exporter:
    """The format whose suffix ``path`` ends in, or :class:`ConfigError` listing the formats."""
    path = Path(path)
    if path.suffix not in suffixes():
        raise ConfigError(f"unknown export format {path.suffix!r} for {path}; {_valid()}")
    return _REGISTRY[suffixes()[path.suffix]]


def exporter_for(path: str | Path, format: str | None = None) -> Exporter:
    """The format called ``format``, or by default the one of ``path``'s suffix."""
    return for_path(path) if format is None else get(format)


def export(model: nn.Module, example_inputs: Any, path: str | Path, format: str | None = None,
           **options: Any) -> ExportReport:
    """Write ``model`` (quantized by squeezer, pruned or plain fp32) to ``path`` as ``format`` (a name of
    :func:`formats`; default: from ``path``'s suffix); returns what each layer became and the warnings.
    ``options`` are the fields of the format's options dataclass (e.g. ``unsupported="float"``,
    ``calib=batches`` for TFLite, ``max_batch`` for ExecuTorch, ``opset`` for ONNX). The file's SHA-256 is
    written beside it (``model.onnx.sha256``), which :func:`squeezer.runtime.load` checks."""
    path = Path(path)
    exporter = exporter_for(path, format)
    check_fits(model, example_inputs, "example_inputs", ModelError)
    report = exporter.export(model, example_inputs, path, build_options(exporter.name, exporter.options, options))
    write_sidecar(path)
    return report


def require_extra(module: str, extra: str) -> ModuleType:
    """Import an optional dependency, or :class:`ConfigError` naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(f"the {extra} format needs the optional package {module.split('.')[0]!r} "
                          f"({exc}); install it with: pip install 'squeezer[{extra}]'") from None

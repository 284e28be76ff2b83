"""squeezer: make trained PyTorch models smaller and faster, and prove it with numbers.

The public names below are imported on first use (PEP 562 module ``__getattr__``), and so is any
submodule (``squeezer.modules``): ``import squeezer`` and the command line stay light until a name
that needs torch is touched.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import ConfigError, DataError, ModelError, SqueezerError
from .version import __version__

if TYPE_CHECKING:  # what the names below resolve to, for type checkers and the import graph
    from . import runtime
    from .api import quantize
    from .config import PRESETS, QuantConfig
    from .exporters import export, export_onnx
    from .io.checkpoint import load, save
    from .kernels import pack
    from .quant.core import QParams, QTensor, dequantize, fake_quantize
    from .quant.core import quantize as quantize_tensor
    from .quant.spec import PerChannel, PerGroup, PerTensor, PerToken, QuantSpec
    from .recipe import compress
    from .report.quant import QuantReport
    from .transform import report_of

_PUBLIC: dict[str, tuple[str, str | None]] = {  # name -> (module, attribute; None: the module itself)
    "quantize": ("squeezer.api", "quantize"),
    "PRESETS": ("squeezer.config", "PRESETS"),
    "QuantConfig": ("squeezer.config", "QuantConfig"),
    "load": ("squeezer.io.checkpoint", "load"),
    "save": ("squeezer.io.checkpoint", "save"),
    "export": ("squeezer.exporters", "export"),
    "export_onnx": ("squeezer.exporters", "export_onnx"),
    "pack": ("squeezer.kernels", "pack"),
    "QParams": ("squeezer.quant.core", "QParams"),
    "QTensor": ("squeezer.quant.core", "QTensor"),
    "dequantize": ("squeezer.quant.core", "dequantize"),
    "fake_quantize": ("squeezer.quant.core", "fake_quantize"),
    "quantize_tensor": ("squeezer.quant.core", "quantize"),
    "PerChannel": ("squeezer.quant.spec", "PerChannel"),
    "PerGroup": ("squeezer.quant.spec", "PerGroup"),
    "PerTensor": ("squeezer.quant.spec", "PerTensor"),
    "PerToken": ("squeezer.quant.spec", "PerToken"),
    "QuantSpec": ("squeezer.quant.spec", "QuantSpec"),
    "compress": ("squeezer.recipe", "compress"),
    "report_of": ("squeezer.transform", "report_of"),
    "QuantReport": ("squeezer.report.quant", "QuantReport"),
    "runtime": ("squeezer.runtime", None),
}


def __getattr__(name: str) -> Any:
    """Import a public name or a submodule on first access, then keep it as a plain attribute."""
    if name in _PUBLIC:
        module, attr = _PUBLIC[name]
        value = importlib.import_module(module)
        value = value if attr is None else getattr(value, attr)
    else:
        try:
            value = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})

__all__ = [
    "quantize", "compress", "pack", "save", "load", "export", "export_onnx", "QuantConfig", "QuantSpec", "PRESETS", "QuantReport", "report_of",
    "PerTensor", "PerChannel", "PerGroup", "PerToken",
    "QParams", "QTensor", "quantize_tensor", "dequantize", "fake_quantize",
    "runtime", "SqueezerError", "ConfigError", "DataError", "ModelError", "__version__",
]

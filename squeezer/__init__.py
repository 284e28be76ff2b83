"""squeezer: make trained PyTorch models smaller and faster, and prove it with numbers."""

from .api import quantize
from .config import PRESETS, QuantConfig
from .io.checkpoint import load, save
from .io.onnx_export import export_onnx
from .io.export import export
from .kernels import pack
from .errors import ConfigError, DataError, ModelError, SqueezerError
from .quant.core import QParams, QTensor, dequantize, fake_quantize
from .quant.core import quantize as quantize_tensor
from .quant.spec import PerChannel, PerGroup, PerTensor, PerToken, QuantSpec
from .recipe import compress
from .report import QuantReport
from .version import __version__
from . import runtime


__all__ = [
    "quantize", "compress", "pack", "save", "load", "export", "export_onnx", "QuantConfig", "QuantSpec", "PRESETS", "QuantReport",
    "PerTensor", "PerChannel", "PerGroup", "PerToken",
    "QParams", "QTensor", "quantize_tensor", "dequantize", "fake_quantize",
    "runtime", "SqueezerError", "ConfigError", "DataError", "ModelError", "__version__",
]

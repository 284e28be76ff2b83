"""squeezer: make trained PyTorch models smaller and faster, and prove it with numbers."""

from .api import quantize
from .config import PRESETS, QuantConfig
from .io.checkpoint import load, save
from .kernels import pack
from .errors import ConfigError, DataError, ModelError, SqueezerError
from .quant.core import QParams, QTensor, dequantize, fake_quantize
from .quant.core import quantize as quantize_tensor
from .quant.spec import PerChannel, PerGroup, PerTensor, PerToken, QuantSpec
from .report import QuantReport
from .version import __version__


__all__ = [
    "quantize", "pack", "save", "load", "QuantConfig", "QuantSpec", "PRESETS", "QuantReport",
    "PerTensor", "PerChannel", "PerGroup", "PerToken",
    "QParams", "QTensor", "quantize_tensor", "dequantize", "fake_quantize",
    "SqueezerError", "ConfigError", "DataError", "ModelError", "__version__",
]

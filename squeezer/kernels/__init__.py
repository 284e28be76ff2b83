"""Packed low-bit weights executed by PyTorch's own integer CPU kernels."""

from .base import KernelPath, LinearProblem, PackedWeight
from .pack import PackedLayer, pack
from .paths import PATHS

__all__ = ["KernelPath", "LinearProblem", "PackedWeight", "PackedLayer", "pack", "PATHS"]

"""Packed low-bit weights executed by PyTorch's own integer CPU kernels."""

from .base import KernelPath, LinearProblem, PackedWeight
from .pack import Kernels, PackedLayer, PackReport, pack, packed_kernels
from .paths import PATHS

__all__ = ["KernelPath", "LinearProblem", "PackedWeight", "PackedLayer", "PackReport", "Kernels", "pack", "packed_kernels", "PATHS"]

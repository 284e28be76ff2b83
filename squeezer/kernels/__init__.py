"""Packed low-bit weights executed by PyTorch's own integer CPU kernels."""

from .base import KernelPath, LinearProblem, PackedWeight
from .pack import (Kernels, PackContext, PackedLayer, PackReport, pack, packed_kernels, register_packer,
                   unregister_packer)
from .paths import PATHS

__all__ = ["KernelPath", "LinearProblem", "PackedWeight", "PackedLayer", "PackReport", "Kernels", "pack", "packed_kernels",
           "PackContext", "register_packer", "unregister_packer", "PATHS"]

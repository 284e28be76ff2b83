"""Weight-quantization algorithms on the shared core, and the sequential pipeline that runs them.

Importing this package registers every algorithm in :data:`ALGORITHMS`."""

from . import rtn  # noqa: F401  (registers)
from .base import ALGORITHMS, Algorithm, make_algorithm, register
from .pipeline import run_algorithm, stages
from .stats import LayerStats

__all__ = ["ALGORITHMS", "Algorithm", "LayerStats", "make_algorithm", "register", "run_algorithm", "stages"]

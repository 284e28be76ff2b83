"""Weight-quantization algorithms on the shared core, and the sequential pipeline that runs them.

Every module of this package is imported here, so each ``@register``-ed algorithm is in
:data:`ALGORITHMS`: a new algorithm is one new module, nothing else to edit."""

import importlib
import pkgutil

from .base import ALGORITHMS, Algorithm, make_algorithm, register
from .pipeline import run_algorithm, stages
from .stats import LayerStats

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["ALGORITHMS", "Algorithm", "LayerStats", "make_algorithm", "register", "run_algorithm", "stages"]

"""Mixed precision and automatic compression: sensitivity, bit allocation, accuracy-driven tuning."""

from .allocate import Allocation, Budget, allocate, costs
from .formats import DEFAULT_FORMATS, FLOAT
from .latency import LatencyTable, measure_latency
from .sensitivity import Sensitivity, measure_sensitivity

__all__ = [
           "DEFAULT_FORMATS",
           "FLOAT",
           "Allocation",
           "Budget",
           "LatencyTable",
           "Sensitivity",
           "allocate",
           "costs",
           "measure_latency",
           "measure_sensitivity",
]

"""Mixed precision and automatic compression: per-layer sensitivity, bit allocation under a budget,
accuracy-driven tuning, the joint Pareto search, and one search run with its report."""

from .allocate import Allocation, Budget, allocate, costs
from .auto import auto_quantize
from .formats import DEFAULT_FORMATS, FLOAT
from .joint import SearchResult, SearchSpace, pareto_search
from .latency import LatencyTable, measure_latency
from .sensitivity import Sensitivity, measure_sensitivity
from .tune import TuneResult, tune

__all__ = [
    "DEFAULT_FORMATS", "FLOAT", "Allocation", "Budget", "LatencyTable", "SearchResult", "SearchSpace", "Sensitivity",
    "TuneResult", "allocate", "auto_quantize", "costs", "measure_latency", "measure_sensitivity", "pareto_search", "tune",
]

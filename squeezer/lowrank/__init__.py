"""Low-rank factorisation: replace Linear / conv layers by two thinner ones (truncated SVD).

:func:`low_rank` returns the factorised model (a copy unless ``inplace=True``) carrying its
:class:`LowRankReport` (``squeezer.report_of(model)``); see :mod:`squeezer.transform`.
"""

from .svd import (
    LowRankLayer, LowRankReport, factorize_conv, factorize_linear, low_rank, rank_for_budget, rank_for_energy, weight_svd,
)

__all__ = [
    "low_rank", "factorize_linear", "factorize_conv", "rank_for_energy", "rank_for_budget", "weight_svd",
    "LowRankReport", "LowRankLayer",
]

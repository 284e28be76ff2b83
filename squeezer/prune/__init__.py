"""Pruning: masks (unstructured, N:M, gradual) and real shrinking (channels, input features).

Every function changes the given model in place and returns a report with ``to_dict()``.
"""

from .features import FeaturePruneReport, SelectColumns, feature_importance, input_layer, prune_features
from .magnitude import magnitude_prune, nm_prune, weight_sparsity
from .mask import remove_masks, weight_mask
from .report import LayerPruneReport, PruneReport, SkippedLayer, count_params
from .schedule import GradualPruneReport, PruneStep, cubic_sparsity, gradual_prune
from .structured import channel_scores, prune_channels

__all__ = [
    "magnitude_prune", "nm_prune", "remove_masks", "weight_mask", "weight_sparsity",
    "prune_channels", "channel_scores", "prune_features", "feature_importance", "input_layer", "SelectColumns",
    "gradual_prune", "cubic_sparsity", "PruneReport", "LayerPruneReport", "SkippedLayer", "FeaturePruneReport",
    "GradualPruneReport", "PruneStep", "count_params",
]

"""Pruning: masks (unstructured, N:M, gradual) and real shrinking (channels, attention heads,
input features).

Every pruning function follows :mod:`squeezer.transform`: it returns the pruned model, a copy unless
``inplace=True``, carrying its report (``squeezer.report_of(model)``, with ``to_dict()``).
:func:`remove_masks` is the exception: a helper that makes the masks of a model permanent, in place.
"""

from .features import (
    FeaturePruneReport,
    SelectColumns,
    feature_importance,
    input_layer,
    prune_features,
)
from .heads import (
    HeadGroup,
    HeadPruneReport,
    attention_groups,
    head_scores,
    prune_heads,
)
from .magnitude import magnitude_prune, nm_prune, weight_sparsity
from .mask import remove_masks, weight_mask
from .report import LayerPruneReport, PruneReport, SkippedLayer, count_params
from .schedule import GradualPruneReport, PruneStep, cubic_sparsity, gradual_prune
from .structured import channel_scores, prune_channels

__all__ = [
    "FeaturePruneReport",
    "GradualPruneReport",
    "HeadGroup",
    "HeadPruneReport",
    "LayerPruneReport",
    "PruneReport",
    "PruneStep",
    "SelectColumns",
    "SkippedLayer",
    "attention_groups",
    "channel_scores",
    "count_params",
    "cubic_sparsity",
    "feature_importance",
    "gradual_prune",
    "head_scores",
    "input_layer",
    "magnitude_prune",
    "nm_prune",
    "prune_channels",
    "prune_features",
    "prune_heads",
    "remove_masks",
    "weight_mask",
    "weight_sparsity",
]

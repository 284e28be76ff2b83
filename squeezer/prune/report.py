"""`PruneReport`: what pruning did to each layer, and to the whole model.

Per layer: parameters before and after (``after`` counts the parameters still in use: a
zeroed weight entry under a mask no longer counts, a removed channel's weights are gone) and
the weight sparsity ``1 - nonzero_or_kept_weights / weights_before``. Model totals count every
parameter the same way, so ``model_params_after / model_params_before`` is the size ratio.
Structured pruning also records ``channels``: layer -> kept output channels (original numbering).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from ..modules.swap import SkippedLayer  # noqa: F401  (re-exported: the one record of a skipped layer)
from .mask import weight_mask


@dataclass
class LayerPruneReport:
    name: str
    kind: str
    params_before: int
    params_after: int
    sparsity: float
    note: str = ""


@dataclass
class PruneReport:
    method: str
    layers: list[LayerPruneReport] = field(default_factory=list)
    skipped: list[SkippedLayer] = field(default_factory=list)
    model_params_before: int = 0
    model_params_after: int = 0
    channels: dict[str, list[int]] = field(default_factory=dict)

    @property
    def compression(self) -> float:
        """``model_params_before / model_params_after``."""
        return self.model_params_before / max(self.model_params_after, 1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "summary": {
                "pruned_layers": len(self.layers),
                "skipped_layers": len(self.skipped),
                "model_params_before": self.model_params_before,
                "model_params_after": self.model_params_after,
                "compression": self.compression,
            },
            "layers": [asdict(layer) for layer in self.layers],
            "skipped": [asdict(s) for s in self.skipped],
            "channels": self.channels,
        }


def count_params(model: nn.Module) -> int:
    """Parameters in use: every element of every parameter, except that a weight under a
    pruning mask (:mod:`squeezer.prune.mask`) counts only its entries where the mask is 1.
    """
    total = sum(p.numel() for p in model.parameters())
    for module in model.modules():
        mask = weight_mask(module)
        if mask is not None:
            total -= mask.numel() - int(mask.count_nonzero())
    return total

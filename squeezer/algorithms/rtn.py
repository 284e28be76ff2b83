"""Round-to-nearest: ``q = clip(round(W / S) + Z)`` with min-max parameters per block.
The baseline every other algorithm must beat."""

from __future__ import annotations

from dataclasses import dataclass

from ..modules.base import QuantMixin
from .base import Algorithm, register
from .stats import LayerStats


@register
@dataclass
class RoundToNearest(Algorithm):
    name = "rtn"
    needs_stats = False

    def quantize_layer(self, layer: QuantMixin, stats: LayerStats | None) -> None:
        layer.calibrate_weight()

"""`QuantReport`: what quantization did to each layer, as a table and as JSON.

Per layer: format, bits, granularity, #params, bytes before (float) and after (packed:
``bits`` per weight + fp32 scales / zero points / codebooks), weight error (MSE, SQNR,
cosine of ``W^`` vs ``W``) and, with calibration data, the layer's output error measured in
isolation (float input, quantized layer vs float layer). Model totals count every parameter.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from rich.table import Table

from .modules.swap import SkippedLayer
from .quant.metrics import ErrorStats


@dataclass
class LayerReport:
    name: str
    kind: str
    format: str
    mapping: str
    bits: int
    granularity: str
    activation: str | None
    params: int
    bytes_before: int
    bytes_after: int
    weight_error: ErrorStats
    output_error: ErrorStats | None = None


@dataclass
class QuantReport:
    config: dict[str, Any]
    layers: list[LayerReport] = field(default_factory=list)
    skipped: list[SkippedLayer] = field(default_factory=list)
    model_bytes_before: int = 0
    model_bytes_after: int = 0
    model_output_error: ErrorStats | None = None
    calibration_batches: int = 0

    @property
    def weight_bytes_before(self) -> int:
        return sum(layer.bytes_before for layer in self.layers)

    @property
    def weight_bytes_after(self) -> int:
        return sum(layer.bytes_after for layer in self.layers)

    @property
    def weight_compression(self) -> float:
        """Bytes of the quantized layers' float weights / bytes of their packed form."""
        return self.weight_bytes_before / max(self.weight_bytes_after, 1)

    @property
    def bits_per_weight(self) -> float:
        """Packed bits (codes + parameters) per quantized weight."""
        params = sum(layer.params for layer in self.layers)
        return 8 * self.weight_bytes_after / max(params, 1)

    @property
    def weight_sqnr_db(self) -> float:
        """SQNR of all quantized weights together: ``10 log10(sum signal / sum noise)``."""
        signal = sum(l.weight_error.mse * l.params * 10 ** (l.weight_error.sqnr_db / 10) for l in self.layers
                     if math.isfinite(l.weight_error.sqnr_db))
        noise = sum(l.weight_error.mse * l.params for l in self.layers)
        return math.inf if noise == 0 else 10 * math.log10(signal / noise) if signal else -math.inf

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "summary": {
                "quantized_layers": len(self.layers),
                "skipped_layers": len(self.skipped),
                "weight_bytes_before": self.weight_bytes_before,
                "weight_bytes_after": self.weight_bytes_after,
                "weight_compression": self.weight_compression,
                "bits_per_weight": self.bits_per_weight,
                "weight_sqnr_db": self.weight_sqnr_db,
                "model_bytes_before": self.model_bytes_before,
                "model_bytes_after": self.model_bytes_after,
                "calibration_batches": self.calibration_batches,
                "model_output_error": None if self.model_output_error is None else self.model_output_error.to_dict(),
            },
            "layers": [asdict(layer) for layer in self.layers],
            "skipped": [asdict(s) for s in self.skipped],
        }

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(_finite(self.to_dict()), **{"indent": 2, **kwargs})

    def table(self) -> Table:
        """A rich table, one row per quantized layer, then the skipped ones."""
        t = Table(title=f"squeezer: {self.config.get('name', 'custom')}")
        for col in ("layer", "format", "params", "bytes before", "bytes after", "weight SQNR dB", "output SQNR dB"):
            t.add_column(col, justify="left" if col in ("layer", "format") else "right")
        for l in self.layers:
            out = "-" if l.output_error is None else f"{l.output_error.sqnr_db:.1f}"
            t.add_row(l.name, l.format, f"{l.params:,}", f"{l.bytes_before:,}", f"{l.bytes_after:,}",
                      f"{l.weight_error.sqnr_db:.1f}", out)
        for s in self.skipped:
            t.add_row(s.name, f"float ({s.reason})", f"{s.params:,}", "", "", "", "")
        t.caption = (f"quantized weights {self.weight_bytes_before:,} -> {self.weight_bytes_after:,} bytes "
                     f"(x{self.weight_compression:.2f}, {self.bits_per_weight:.2f} bits/weight)")
        return t


def _finite(value: Any) -> Any:
    """JSON has no inf / nan: write them as strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value

"""`QuantReport`: what quantization did to each layer, as a table and as a dict.

Per layer: format, bits, granularity, #params, bytes before (float) and after (packed:
``bits`` per weight + fp32 scales / zero points / codebooks), weight error (MSE, SQNR,
cosine of ``W^`` vs ``W``) and, with calibration data, the layer's output error measured in
isolation (float input, quantized layer vs float layer). Model totals count every parameter;
a layer left in float is listed with its share ``params / model_params`` of the model, and the
float share of the whole model is ``1 - sum(quantized weights) / model_params`` (biases, norms and
skipped layers): :meth:`QuantReport.float_warning` speaks up when it is more than half. What was done to the
float model before its layers were quantized (batch norms folded into convolutions, output biases corrected) is
one more line, :meth:`QuantReport.float_changes`, and the JSON fields ``folded_norms`` / ``bias_corrected``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from rich.table import Table

from ..modules.swap import SkippedLayer
from ..quant.metrics import ErrorStats
from .json import dumps


def _display_name(name: str) -> str:
    """A module's name in the table; the model's own parameters (name ``""``) as ``(model)``."""
    return name or "(model)"


def ratio_text(before: float, after: float) -> str:
    """``"×3.76"``: how many times smaller ``after`` is than ``before``."""
    return f"×{before / max(after, 1):.2f}"


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

    @property
    def bits_per_weight(self) -> float:
        """Packed bits (codes + parameters) per weight: ``8 bytes_after / params``."""
        return 8 * self.bytes_after / max(self.params, 1)


@dataclass
class QuantReport:
    config: dict[str, Any]
    layers: list[LayerReport] = field(default_factory=list)
    skipped: list[SkippedLayer] = field(default_factory=list)
    model_bytes_before: int = 0
    model_bytes_after: int = 0
    model_output_error: ErrorStats | None = None
    calibration_batches: int = 0
    model_class: str = ""
    model_params: int = 0
    folded_norms: dict[str, str] = field(default_factory=dict)
    """``{norm: conv}``: the batch norms folded into convolutions before quantization (:mod:`squeezer.fold`)."""
    bias_corrected: bool = False
    """Whether each convolution's mean output shift on the calibration data was folded into its bias
    (``correct_bias=True``)."""

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
    def model_compression(self) -> float:
        """Bytes of every parameter before / after (float layers and biases count on both sides)."""
        return self.model_bytes_before / max(self.model_bytes_after, 1)

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

    def param_share(self, params: int) -> float | None:
        """``params / model_params`` (``None`` when the model's parameter count is unknown)."""
        return params / self.model_params if self.model_params else None

    @property
    def float_params(self) -> int:
        """Parameters left in float: ``model_params - sum(quantized weights)``."""
        return self.model_params - sum(layer.params for layer in self.layers)

    def float_warning(self) -> str | None:
        """A warning line when more than half of the model's parameters stay float, naming the largest
        float layers; else None."""
        share = self.param_share(self.float_params)
        if share is None or share <= 0.5:
            return None
        largest = sorted(self.skipped, key=lambda s: -s.params)[:3]
        named = ", ".join(f"{_display_name(s.name)} ({s.kind}, {self.param_share(s.params):.1%}: {s.reason})"
                          for s in largest)
        return (f"{share:.1%} of the model's {self.model_params:,} parameters stay float"
                + (f"; largest float layers: {named}" if named else ""))

    def float_changes(self) -> str | None:
        """``batch norms folded: bn1 into conv1, ...; convolution biases corrected for their mean output shift``, or
        None when neither."""
        parts = []
        if self.folded_norms:
            parts.append("batch norms folded: " + ", ".join(f"{n} into {c}" for n, c in self.folded_norms.items()))
        if self.bias_corrected:
            parts.append("convolution biases corrected for their mean output shift")
        return "; ".join(parts) or None

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "summary": {
                "model_class": self.model_class,
                "model_params": self.model_params,
                "quantized_layers": len(self.layers),
                "skipped_layers": len(self.skipped),
                "float_params": self.float_params,
                "float_param_share": self.param_share(self.float_params),
                "weight_bytes_before": self.weight_bytes_before,
                "weight_bytes_after": self.weight_bytes_after,
                "weight_compression": self.weight_compression,
                "bits_per_weight": self.bits_per_weight,
                "weight_sqnr_db": self.weight_sqnr_db,
                "model_bytes_before": self.model_bytes_before,
                "model_bytes_after": self.model_bytes_after,
                "model_compression": self.model_compression,
                "calibration_batches": self.calibration_batches,
                "model_output_error": None if self.model_output_error is None else self.model_output_error.to_dict(),
            },
            "layers": [asdict(layer) for layer in self.layers],
            "skipped": [{**asdict(s), "param_share": self.param_share(s.params)} for s in self.skipped],
            "folded_norms": dict(self.folded_norms),
            "bias_corrected": self.bias_corrected,
        }

    def to_json(self, **kwargs: Any) -> str:
        return dumps(self.to_dict(), **kwargs)

    def headline(self) -> str:
        """The whole model's bytes before -> after, then the quantized weights' share of it."""
        return (f"model {self.model_bytes_before:,} -> {self.model_bytes_after:,} bytes "
                f"({ratio_text(self.model_bytes_before, self.model_bytes_after)}); quantized weights "
                f"{self.weight_bytes_before:,} -> {self.weight_bytes_after:,} bytes "
                f"({ratio_text(self.weight_bytes_before, self.weight_bytes_after)}, "
                f"{self.bits_per_weight:.2f} bits/weight)")

    def table(self) -> Table:
        """A rich table, one row per quantized layer, then the layers left in float with their share."""
        model = f"{self.model_class}, " if self.model_class else ""
        t = Table(title=f"squeezer: {model}preset {self.config.get('name', 'custom')}")
        for col in ("layer", "format", "params", "bytes before", "bytes after", "smaller", "bits/weight",
                    "weight SQNR dB", "output SQNR dB"):
            t.add_column(col, justify="left" if col in ("layer", "format") else "right")
        for l in self.layers:
            out = "-" if l.output_error is None else f"{l.output_error.sqnr_db:.1f}"
            t.add_row(l.name, l.format, f"{l.params:,}", f"{l.bytes_before:,}", f"{l.bytes_after:,}",
                      ratio_text(l.bytes_before, l.bytes_after), f"{l.bits_per_weight:.2f}",
                      f"{l.weight_error.sqnr_db:.1f}", out)
        for s in self.skipped:
            share = self.param_share(s.params)
            t.add_row(_display_name(s.name), f"float ({s.reason})", f"{s.params:,}" + ("" if share is None else f" ({share:.1%})"),
                      "", "", "", "", "", "")
        changes = self.float_changes()
        t.caption = self.headline() + ("" if changes is None else f"\n{changes}")
        return t

"""Hadamard input rotation before quantization (incoherence processing: Tseng et al., "QuIP#: Even Better
LLM Quantization with Hadamard Incoherence and Lattice Codebooks", ICML 2024; Ashkboos et al., "QuaRot:
Outlier-Free 4-Bit Inference in Rotated LLMs", NeurIPS 2024).

A linear layer's weight is rotated along its input dimension in blocks of ``b`` (the largest power of two
``<= block`` dividing ``K``), ``W' = rotate(W)``, and its input the same way at run time,
``x' = rotate(x)`` (``layer.input_rotation = b``: applied by ``layer.smooth`` in every mode, the packed
runtime and the exports), so the float function is unchanged (:mod:`squeezer.quant.rotation`). Large
weights and input channels are spread over their block, so a per-group grid fits the rotated weight
better and the Hessian of the rotated inputs is flatter. The cost at run time is one ``(m, K) x (b, b)``
product per layer (``b / N`` of the layer's own multiply-adds).

Alone (``w4g128-hadamard``) the rotated weight is rounded to nearest; as the first step of a chain
(``w4g128-hadamard+gptq``) the next steps see the rotated weight and :meth:`LayerStats.rotated` inputs.
Linear layers only (convolutions and embeddings keep their input unrotated).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from ..modules.base import QuantMixin
from ..modules.layers import QuantLinear
from ..quant.core import compute_qparams
from ..quant.rotation import hadamard, is_block_size, rotate, rotation_block
from .base import Algorithm, register
from .stats import LayerStats


@register
@dataclass
class Hadamard(Algorithm):
    """Rotate each Linear layer's input dimension by block Hadamard matrices (see module docstring).

    Options: ``block`` (largest block size, a power of two >= 2; default 64: on MiniLM W4 g128 + GPTQ the
    same accuracy as 128 within the measurement's noise, ``python bench/probes.py w4``, at half the run-time
    multiply-adds of the rotation).
    """

    name = "hadamard"
    needs_stats = False
    first_only = "rotates the layer's input"
    block: int = 64

    def __post_init__(self) -> None:
        if not is_block_size(self.block) or self.block < 2:
            raise ConfigError(f"hadamard: block must be a power of two >= 2, got {self.block!r}")

    def applies_to(self, layer: QuantMixin) -> bool:
        return isinstance(layer, QuantLinear) and rotation_block(layer.in_features, self.block) > 1

    def quantize_layer(self, layer: QuantMixin, stats: LayerStats | None) -> None:
        if layer.input_scale is not None or layer.input_rotation > 1:
            raise ConfigError("hadamard must rotate a layer before any other input transform (first step of a chain)")
        b = rotation_block(layer.in_features, self.block)
        w = rotate(layer.weight.detach().float(), hadamard(b))
        layer.input_rotation = b
        layer.set_quantized(w, compute_qparams(w, layer.weight_spec))

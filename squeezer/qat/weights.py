"""The float weights QAT trains in one quantized layer, and their fake-quantized targets.

A layer quantizes ``weight``; a recurrent layer quantizes each of its matrices on its own grid
(``weight_ih_l0``, ``weight_hh_l0``, ...), and each is trained, penalised and (with learned step sizes)
given its own LSQ quantizer, held in the layer's ``matrix_fake_quant`` (name -> quantizer).
"""

from __future__ import annotations

from torch import Tensor, nn

from ..modules.base import QuantMixin
from ..modules.recurrent import QuantRecurrent
from ..quant.core import fake_quantize


def trained_weights(layer: QuantMixin) -> dict[str, nn.Parameter]:
    """Name -> float weight: ``{"weight": W}``, or each matrix of a recurrent layer."""
    return dict(layer.matrices()) if isinstance(layer, QuantRecurrent) else {"weight": layer.weight}


def weights_version(layer: QuantMixin) -> tuple[int, ...]:
    """Changes whenever one of the layer's weights is written (their ``_version`` counters)."""
    return tuple(w._version for w in trained_weights(layer).values())


def grid_targets(layer: QuantMixin) -> dict[str, tuple[nn.Parameter, Tensor]]:
    """Name -> ``(W, fq(W))`` with ``fq`` of the detached weight: the learned quantizer's (gradients reach its
    step sizes) or the fixed parameters'."""
    if not isinstance(layer, QuantRecurrent):
        learned = layer._modules.get("weight_fake_quant")
        w = layer.weight
        target = learned(w.detach()) if learned is not None else \
            fake_quantize(w.detach(), layer.weight_spec, layer.ensured_weight_qparams())
        return {"weight": (w, target)}
    learned = layer._modules.get("matrix_fake_quant")
    qps = layer.ensured_matrix_qparams()
    return {n: (w, learned[n](w.detach()) if learned is not None and n in learned
                else fake_quantize(w.detach(), layer.matrix_spec(n), qps[n]))
            for n, w in layer.matrices().items()}

"""Quantization-aware training: fine-tune a model through its quantizers, then freeze them.

With your own training loop (``fit`` from :mod:`squeezer.training` does the same)::

    qmodel = prepare_qat(model, "w2g64", learnable_scales=True)              # 1. quantized copy, train mode
    optimizer = torch.optim.Adam(qmodel.parameters(), lr=1e-4)               # 2. weights (+ step sizes)
    for x, y in batches:
        terms = qat_loss(loss_fn(qmodel(x), y), qmodel, lam=1e-2)            # 3. L_task + lam * E_quant
        optimizer.zero_grad(); terms.loss.backward(); optimizer.step()       # 4. an ordinary step
    qmodel = convert(qmodel)                                                 # 5. fixed qparams: pack / save / export

``qat_loss`` is optional (plain ``loss_fn(...)`` is QAT with ``lam = 0``); ``terms.task`` and
``terms.quant`` are there for logging.
"""

from .loss import QATLoss, qat_loss, quant_error
from .lsq import LearnedScaleQuantizer
from .prepare import QATState, convert, prepare_qat

__all__ = ["prepare_qat", "convert", "quant_error", "qat_loss", "QATLoss", "QATState", "LearnedScaleQuantizer"]

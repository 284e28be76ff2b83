"""Knowledge distillation: train a small (or quantized, or pruned) student on a teacher's outputs.

* :func:`distillation_loss` -- ``T^2 KL(teacher || student)`` on tempered softmax / sigmoid outputs;
* :class:`FeatureMatcher` -- MSE between paired intermediate outputs (optionally projected);
* :func:`distill` -- the training loop: ``alpha * task + (1 - alpha) * KD (+ beta * features)``; it
  returns the trained student, a copy unless ``inplace=True`` (:mod:`squeezer.transform`).
"""

from .features import FeatureMatcher
from .losses import distillation_loss
from .loop import DistillReport, distill, logits_of

__all__ = ["distillation_loss", "FeatureMatcher", "DistillReport", "distill", "logits_of"]

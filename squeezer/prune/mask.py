"""Pruning masks kept as buffers: ``weight = weight_orig * mask`` recomputed at every access.

A mask is a ``torch.nn.utils.parametrize`` parametrization of ``weight`` holding a 0/1 buffer
``mask`` of the weight's shape; the trained tensor lives in
``module.parametrizations.weight.original``. Because the effective weight is the product,
``d loss / d original = mask * d loss / d weight``: gradients, momentum and weight decay may move
``original`` at masked positions, but ``weight`` stays exactly 0 there through any fine-tuning.
:func:`remove_masks` writes ``original * mask`` into a plain parameter and drops the mask.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn.utils import parametrize


class WeightMask(nn.Module):
    """Parametrization ``w -> w * mask`` with ``mask`` a 0/1 buffer (saved in the state dict)."""

    def __init__(self, mask: Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, weight: Tensor) -> Tensor:
        return weight * self.mask


def weight_mask(module: nn.Module) -> Tensor | None:
    """The mask buffer on ``module.weight``, or ``None`` when the weight is not masked."""
    if not parametrize.is_parametrized(module, "weight"):
        return None
    return next((p.mask for p in module.parametrizations.weight if isinstance(p, WeightMask)), None)


def set_mask(module: nn.Module, mask: Tensor) -> None:
    """Mask ``module.weight`` with ``mask`` (same shape, 0/1); replaces an existing mask in place."""
    mask = mask.to(dtype=module.weight.dtype, device=module.weight.device)
    current = weight_mask(module)
    if current is None:
        parametrize.register_parametrization(module, "weight", WeightMask(mask))
    else:
        current.copy_(mask)


def remove_masks(model: nn.Module) -> list[str]:
    """Make every mask permanent in place: ``weight <- original * mask`` as a plain parameter.

    Returns the names of the modules whose masks were removed.
    """
    names = [name for name, module in model.named_modules() if weight_mask(module) is not None]
    for name in names:
        parametrize.remove_parametrizations(model.get_submodule(name), "weight", leave_parametrized=True)
    return names

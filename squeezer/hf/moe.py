"""Mixture-of-experts blocks for block-wise quantization: experts as the Linear layers the checkpoint stores,
and the count of calibration tokens each expert receives.

transformers holds Mixtral's experts fused (``gate_up_proj (E, 2I, H)``, ``down_proj (E, H, I)``) while its
checkpoints store one ``w1`` (gate), ``w3`` (up), ``w2`` (down) Linear per expert. :class:`UnfusedExperts`
computes the same function, ``sum_k p_k w2_e(act(w1_e x) * w3_e x)`` over the token's ``top_k`` experts ``e``,
with those Linears, so that squeezer quantizes each one and the codes are written under the stored names."""

from __future__ import annotations

import torch
from torch import Tensor, nn

STORED_NAMES: dict[str, tuple[tuple[str, str], ...]] = {"mixtral": ((".mlp.", ".block_sparse_moe."),)}
"""Per model type, ``(model part, checkpoint part)`` renamings from the module path to the shard name."""


class Expert(nn.Module):
    """One expert: ``w2(act(w1 x) * w3 x)``."""

    def __init__(self, hidden: int, intermediate: int, act: nn.Module) -> None:
        super().__init__()
        self.w1 = nn.Linear(hidden, intermediate, bias=False)
        self.w3 = nn.Linear(hidden, intermediate, bias=False)
        self.w2 = nn.Linear(intermediate, hidden, bias=False)
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(self.act(self.w1(x)) * self.w3(x))


class UnfusedExperts(nn.ModuleList):
    """The experts of a fused ``MixtralExperts``, called as it is: ``(hidden (n, H), top_k_index (n, k),
    top_k_weights (n, k)) -> (n, H)``."""

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        out = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self):
            token, slot = torch.where(top_k_index == e)
            if token.numel():
                y = expert(hidden_states[token]) * top_k_weights[token, slot, None]
                out.index_add_(0, token, y.to(out.dtype))
        return out


def unfuse_experts(model: nn.Module) -> None:
    """Replace every fused experts module (``gate_up_proj`` / ``down_proj`` 3-D parameters) of ``model`` by
    :class:`UnfusedExperts` (new parameters on the meta device, as the skeleton's)."""
    for name, module in list(model.named_modules()):
        gate_up = getattr(module, "gate_up_proj", None)
        if not isinstance(gate_up, nn.Parameter) or gate_up.dim() != 3:
            continue
        n, two_i, hidden = gate_up.shape
        experts = UnfusedExperts([Expert(hidden, two_i // 2, module.act_fn) for _ in range(n)]).to("meta")
        owner, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner), attr, experts)


def expert_tokens(block: nn.Module, run: callable) -> dict[str, int]:
    """Calibration tokens each :class:`Expert` of ``block`` receives while ``run()`` feeds the block (name -> count)."""
    counts: dict[str, int] = {}
    handles = []
    for name, module in block.named_modules():
        if isinstance(module, Expert):
            counts[name] = 0
            handles.append(module.register_forward_pre_hook(
                lambda _, args, name=name: counts.__setitem__(name, counts[name] + args[0].shape[0])))
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return counts

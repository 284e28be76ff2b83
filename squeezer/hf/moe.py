"""Mixture-of-experts blocks for block-wise quantization: experts as the Linear layers the checkpoint stores,
and the count of calibration tokens each expert receives.

transformers holds the experts of Mixtral and Qwen2-MoE fused (``gate_up_proj (E, 2I, H)``, ``down_proj
(E, H, I)``) while their checkpoints store one gate, up and down Linear per expert (Mixtral's ``w1`` / ``w3`` /
``w2``, Qwen2-MoE's ``gate_proj`` / ``up_proj`` / ``down_proj``: :data:`STORED_NAMES`). :class:`UnfusedExperts`
computes the same function, ``sum_k p_k down_e(act(gate_e x) * up_e x)`` over the token's ``top_k`` experts
``e``, with those Linears, so that squeezer quantizes each one and the codes are written under the stored names.
Qwen2-MoE's shared expert is a dense MLP (quantized as one); the routers (``gate``, ``shared_expert_gate``) stay
in float (:data:`squeezer.hf.folder.ROUTER_WEIGHTS`)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..distributed import LOCAL, Reducer

STORED_NAMES: dict[str, tuple[tuple[str, str], ...]] = {
    "mixtral": ((".mlp.", ".block_sparse_moe."),),
    "qwen2_moe": ((".w1.", ".gate_proj."), (".w3.", ".up_proj."), (".w2.", ".down_proj.")),
}
"""Per model type, ``(model part, checkpoint part)`` renamings from the module path to the shard name (an
:class:`Expert`'s Linears are ``w1`` gate, ``w3`` up, ``w2`` down in the model)."""


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
    :class:`UnfusedExperts`: on the meta device when the fused parameters are (the skeleton's), else holding
    their values (``w1_e = gate_up_proj[e, :I]``, ``w3_e = gate_up_proj[e, I:]``, ``w2_e = down_proj[e]``)."""
    for name, module in list(model.named_modules()):
        gate_up = getattr(module, "gate_up_proj", None)
        if not isinstance(gate_up, nn.Parameter) or gate_up.dim() != 3:
            continue
        n, two_i, hidden = gate_up.shape
        with torch.device(gate_up.device):
            experts = UnfusedExperts([Expert(hidden, two_i // 2, module.act_fn) for _ in range(n)])
        if not gate_up.is_meta:
            with torch.no_grad():
                for e, expert in enumerate(experts):
                    gate, up = gate_up[e].chunk(2)
                    expert.w1.weight.copy_(gate)
                    expert.w3.weight.copy_(up)
                    expert.w2.weight.copy_(module.down_proj[e])
        owner, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner), attr, experts)


def expert_tokens(block: nn.Module, run: Callable[[], None], reducer: Reducer = LOCAL) -> dict[str, int]:
    """Calibration tokens each :class:`Expert` of ``block`` receives while ``run()`` feeds the block (name -> count),
    summed over ``reducer``'s processes (each fed its own share)."""
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
    totals = reducer.sum(torch.tensor(list(counts.values()), dtype=torch.float64))
    return dict(zip(counts, (int(t) for t in totals.tolist())))

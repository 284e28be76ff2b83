"""A transformers model without its weights: parameters on the meta device (buffers, such as rotary
``inv_freq``, real), its list of blocks, and tensors moved in from the shards and back out, one part at a time."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import ModelError
from .folder import HFFolder
from .moe import STORED_NAMES, unfuse_experts


@contextmanager
def meta_parameters() -> Iterator[None]:
    """Inside, every parameter a module registers lands on the meta device (no storage); buffers stay real."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


class BlockStage(nn.Module):
    """One block as a model of its own: ``forward(hidden_states, **kwargs)`` returns the block's hidden states;
    ``one_stage`` makes :func:`squeezer.quantize` calibrate all its layers in one pass."""

    one_stage = True

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, hidden_states: Tensor, **kwargs: object) -> Tensor:
        out = self.block(hidden_states, **kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out


@dataclass
class Skeleton:
    """The model of ``source`` (meta parameters), its blocks (``prefix.<i>``) and where each tensor lies."""

    source: HFFolder
    model: nn.Module
    blocks: nn.ModuleList
    prefix: str
    shard_of: dict[str, Path]
    linear_weights: frozenset[str]
    """Shard names of the weights of the blocks' ``nn.Linear`` layers that a preset quantizes (routers stay float:
    :meth:`.folder.HFFolder.router`)."""

    @classmethod
    def build(cls, source: HFFolder) -> "Skeleton":
        import transformers

        config_file = source.path / "config.json"
        try:
            config = transformers.AutoConfig.from_pretrained(str(source.path))
        except (ValueError, KeyError, OSError) as exc:
            raise ModelError(f"{config_file}: transformers does not know this architecture ({exc})") from None
        arch = (getattr(config, "architectures", None) or [None])[0]
        model_class = getattr(transformers, arch, None) if arch else None
        with meta_parameters():
            try:
                model = (model_class._from_config(config) if model_class is not None
                         else transformers.AutoModelForCausalLM.from_config(config))
            except (ValueError, KeyError) as exc:
                raise ModelError(f"{config_file}: architecture {arch or config.model_type!r} is not supported "
                                 f"({exc})") from None
        unfuse_experts(model)
        model.eval().requires_grad_(False)
        if hasattr(model.config, "use_cache"):
            model.config.use_cache = False
        prefix, blocks = _block_list(model, config_file)
        shard_of = {name: shard for shard in source.shards for name, _, _ in source.infos(shard)}
        skeleton = cls(source, model, blocks, prefix, shard_of, frozenset())
        linear = (f"{prefix}.{name}.weight" for name, m in blocks.named_modules()
                  if isinstance(m, nn.Linear) or source.transposed(f"{prefix}.{name}.weight"))
        stored = (skeleton.stored_name(n) for n in linear if skeleton._stored(n))
        skeleton.linear_weights = frozenset(n for n in stored if not source.router(n))
        return skeleton

    def stored_name(self, name: str) -> str:
        """The shard name of the model's tensor ``name`` (with or without the base model's prefix, and under the
        checkpoint's own module names, :data:`.moe.STORED_NAMES`)."""
        for candidate in self._candidates(name):
            if candidate in self.shard_of:
                return candidate
        raise ModelError(f"{self.source.path}: tensor {name!r} of the model is in no shard")

    def _candidates(self, name: str) -> list[str]:
        base = getattr(self.model, "base_model_prefix", "")
        names = [name]
        for model_part, stored_part in STORED_NAMES.get(self.source.config.get("model_type"), ()):
            names.append(names[-1].replace(model_part, stored_part))
        return [c for n in names for c in (n, f"{base}.{n}", n.removeprefix(f"{base}."))]

    def float_linears(self, i: int) -> list[str]:
        """The ``nn.Linear`` layers of block ``i`` kept in float (routers), by their names in the block."""
        block = self.blocks[i]
        return [name for name, m in block.named_modules() if isinstance(m, nn.Linear)
                and self.source.router(self.stored_name(f"{self.prefix}.{i}.{name}.weight"))]

    def block_names(self, i: int) -> list[str]:
        """The shard names of block ``i``'s tensors."""
        return self._stored_under(f"{self.prefix}.{i}.")

    def _stored_under(self, prefix: str) -> list[str]:
        base = getattr(self.model, "base_model_prefix", "")
        return [n for n in self.shard_of if any(c.startswith(prefix) for c in (n, n.removeprefix(f"{base}."),
                                                                              f"{base}.{n}"))]

    def outside_names(self) -> list[str]:
        """The model's stored tensors outside the blocks (embeddings, final norm, head), shard names."""
        inside = set(self._stored_under(f"{self.prefix}."))
        return [n for n in self.shard_of if n not in inside]

    def load(self, module: nn.Module, where: str, dtype: torch.dtype) -> None:
        """Read ``module``'s (named ``where`` in the model) parameters and stored buffers from the shards."""
        for name, value in list(_tensors(module)):
            full = f"{where}.{name}" if where else name
            if isinstance(value, nn.Parameter) or self._stored(full):
                stored = self.stored_name(full)
                tensor = self.source.tensor(self.shard_of[stored], stored)
                assign(module, name, tensor.to(dtype) if tensor.is_floating_point() else tensor)

    def load_outside(self, dtype: torch.dtype, before_blocks: bool = False) -> None:
        """Read the model's parameters outside the blocks (embeddings, final norm, head) from the shards; with
        ``before_blocks`` only those registered before the first block (what runs before it: embeddings)."""
        for name, _ in list(self.model.named_parameters()):
            if before_blocks and name.startswith(f"{self.prefix}."):
                return
            tied = getattr(self.model.config, "tie_word_embeddings", False) and not self._stored(name)
            if not name.startswith(f"{self.prefix}.") and not tied:  # a tied head follows tie_weights()
                stored = self.stored_name(name)
                assign(self.model, name, self.source.tensor(self.shard_of[stored], stored).to(dtype))

    def unload(self, module: nn.Module) -> None:
        """Parameters of ``module`` back to the meta device (their storage freed)."""
        for name, value in list(module.named_parameters()):
            assign(module, name, value.to("meta"))

    def release(self, i: int) -> None:
        """Drop block ``i`` (quantized and written): an empty module takes its place, its tensors are freed."""
        self.blocks[i] = nn.Module()

    def _stored(self, name: str) -> bool:
        try:
            self.stored_name(name)
        except ModelError:
            return False
        return True


def _tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from module.named_parameters()
    yield from module.named_buffers()


def assign(root: nn.Module, name: str, tensor: torch.Tensor) -> None:
    owner, _, attr = name.rpartition(".")
    module = root.get_submodule(owner) if owner else root
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
    else:
        module._buffers[attr] = tensor


def _block_list(model: nn.Module, config_file: Path) -> tuple[str, nn.ModuleList]:
    """The model's transformer blocks: its first ``nn.ModuleList`` of one repeated module class."""
    for prefix, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and len({type(b) for b in module}) == 1:
            return prefix, module
    raise ModelError(f"{config_file}: the model {type(model).__name__} has no list of blocks to quantize one by one")

"""Reading a Hugging Face folder one tensor at a time: ``config.json``, the safetensors shards, and which
tensors are the Linear weights of the transformer blocks."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ModelError

BLOCK_LINEAR = r"\.(layers|h|blocks)\.\d+\..*\.weight$"
"""Default selection: 2-D weights inside numbered transformer blocks (embeddings, ``lm_head`` and norms,
which are outside the blocks or 1-D, stay in their own dtype)."""
TRANSPOSED_WEIGHTS = {"gpt2": r"\.(c_attn|c_proj|c_fc)\.weight$"}
"""Per model type, the weights stored as ``(in, out)`` (transformers' ``Conv1D``, ``y = x W + b``)."""
ROUTER_WEIGHTS = {"mixtral": r"\.block_sparse_moe\.gate\.weight$",
                  "qwen2_moe": r"\.mlp\.(gate|shared_expert_gate)\.weight$"}
"""Per model type, the mixture-of-experts routers (expert scores, the shared expert's sigmoid gate): kept in float,
as transformers loads them (no quantized module takes their place) and as their few rows decide every token's path."""


@dataclass(frozen=True)
class HFFolder:
    """A Hugging Face model folder: its ``config`` (the parsed ``config.json``) and its shard files."""

    path: Path
    config: dict
    shards: tuple[Path, ...]

    @classmethod
    def open(cls, path: str | Path) -> "HFFolder":
        path = Path(path)
        try:
            config = json.loads((path / "config.json").read_text())
        except (OSError, ValueError) as exc:
            raise ModelError(f"{path} is not a Hugging Face model folder: cannot read config.json ({exc})") from None
        shards = tuple(sorted(path.glob("*.safetensors")))
        if not shards:
            raise ModelError(f"{path} holds no .safetensors shard (other weight formats are not read)")
        return cls(path, config, shards)

    @property
    def model_type(self) -> str | None:
        return self.config.get("model_type")

    def transposed(self, name: str) -> bool:
        """Whether the weight ``name`` is stored ``(in, out)`` (a ``Conv1D``): its Linear weight ``(out, in)`` is
        the transpose."""
        pattern = TRANSPOSED_WEIGHTS.get(self.model_type)
        return pattern is not None and re.search(pattern, name) is not None

    def router(self, name: str) -> bool:
        """Whether the stored weight ``name`` is a mixture-of-experts router (:data:`ROUTER_WEIGHTS`)."""
        pattern = ROUTER_WEIGHTS.get(self.model_type)
        return pattern is not None and re.search(pattern, name) is not None

    def infos(self, shard: Path) -> Iterator[tuple[str, tuple[int, ...], bool]]:
        """``(name, shape, floating)`` of each tensor of ``shard``, from its header alone (no data read)."""
        from safetensors import safe_open

        with safe_open(str(shard), framework="pt") as handle:
            for name in handle.keys():
                view = handle.get_slice(name)
                yield name, tuple(view.get_shape()), view.get_dtype().startswith(("F", "BF"))

    def infos_of(self, shard: Path, name: str) -> tuple[tuple[int, ...], bool]:
        """``(shape, floating)`` of the tensor ``name`` of ``shard``, from its header."""
        from safetensors import safe_open

        with safe_open(str(shard), framework="pt") as handle:
            view = handle.get_slice(name)
            return tuple(view.get_shape()), view.get_dtype().startswith(("F", "BF"))

    def tensor(self, shard: Path, name: str) -> torch.Tensor:
        """The tensor ``name`` of ``shard``, read from the memory map."""
        from safetensors import safe_open

        with safe_open(str(shard), framework="pt") as handle:
            return handle.get_tensor(name)

    def extra_files(self) -> list[Path]:
        """Files to copy beside the quantized weights (tokenizer, generation config, ...)."""
        weights = set(self.shards)
        return [p for p in sorted(self.path.iterdir()) if p.is_file() and p not in weights
                and p.name not in ("config.json", "model.safetensors.index.json") and not p.name.startswith(".")]


def selected(name: str, shape: tuple[int, ...], floating: bool, include: str, ignore: tuple[str, ...]) -> bool:
    """Whether ``name`` is taken: a floating 2-D tensor matching ``include`` and no ``ignore`` pattern."""
    return (len(shape) == 2 and floating and re.search(include, name) is not None
            and not any(re.search(p, name) for p in ignore))


@dataclass
class PretrainedResult:
    """What was written: the output path, the quantized tensor names and the ones kept as they were; with
    calibration, whether hidden states were spilled to disk, the most blocks held in memory at once, and the
    experts that received too few calibration tokens and kept round-to-nearest; the mixture-of-experts routers
    kept in float (also in ``kept``)."""

    out: Path
    format: str
    preset: str
    quantized: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    spilled: bool = False
    peak_live_blocks: int = 0
    rtn_fallback: list[str] = field(default_factory=list)
    float_routers: list[str] = field(default_factory=list)

"""squeezer's own output of a block-by-block run: one squeezer checkpoint per block, so that every preset
(activation quantization, AWQ / SmoothQuant input scales, Hadamard rotations) is kept as squeezer runs it.

Layout of ``out``: ``blocks/<i>/`` (``squeezer.save`` of block ``i`` as a :class:`.sequential.BlockStage`),
``outside.safetensors`` (the tensors outside the blocks, as stored), ``squeezer-blocks.json`` (preset, block
count) and the source folder's ``config.json``, tokenizer and other files. :func:`load_pretrained` rebuilds the
model from them, one block at a time."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn

from ..errors import ModelError
from ..io.checkpoint import load, save
from .folder import HFFolder
from .skeleton import BlockStage, Skeleton, assign
from .stream import SafetensorsStream

INDEX = "squeezer-blocks.json"


class BlockCheckpointWriter:
    """Writes the layout above into ``folder`` (a temporary directory renamed onto ``out`` by the caller)."""

    def __init__(self, folder: Path, preset: str) -> None:
        self.folder, self.preset, self.blocks = folder, preset, 0
        self._outside: SafetensorsStream | None = None

    def block(self, i: int, stage: nn.Module) -> None:
        save(stage, self.folder / "blocks" / f"{i:05d}", extra={"block": i, "preset": self.preset})
        self.blocks = i + 1

    def add_kept(self, name: str, tensor: torch.Tensor) -> None:
        if self._outside is None:
            self._outside = SafetensorsStream(self.folder / "outside.safetensors")
        self._outside.add(name, tensor)

    def finish(self, source: HFFolder, prefix: str) -> None:
        if self._outside is not None:
            self._outside.close()
        (self.folder / INDEX).write_text(json.dumps({"preset": self.preset, "blocks": self.blocks, "prefix": prefix}))
        shutil.copy2(source.path / "config.json", self.folder / "config.json")
        for extra in source.extra_files():
            shutil.copy2(extra, self.folder / extra.name)


def load_pretrained(out: str | Path) -> nn.Module:
    """The quantized model written by ``quantize_pretrained(..., format="squeezer")`` (simulated, in fp32)."""
    out = Path(out)
    try:
        index = json.loads((out / INDEX).read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{out} is not a squeezer block checkpoint: cannot read {INDEX} ({exc})") from None
    skeleton = Skeleton.build(HFFolder(out, json.loads((out / "config.json").read_text()),
                                       (out / "outside.safetensors",)))
    if len(skeleton.blocks) != index["blocks"]:
        raise ModelError(f"{out}: {index['blocks']} blocks written, the model has {len(skeleton.blocks)}")
    skeleton.load_outside(torch.float32)
    skeleton.model.tie_weights()
    for i, block in enumerate(skeleton.blocks):
        for name, param in list(block.named_parameters()):
            assign(block, name, torch.zeros(param.shape))
        load(out / "blocks" / f"{i:05d}", BlockStage(block))
    return skeleton.model.eval()

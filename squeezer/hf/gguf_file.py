"""GGUF output: Q8_0 / Q4_0 blocks that carry squeezer's codes (presets ``q8_0`` and ``q4_0``).

A block is 32 consecutive weights of a row with one fp16 scale ``d``: Q8_0 stores ``d`` and 32 int8 codes
(``x^ = d q``); Q4_0 stores ``d`` and 16 bytes of nibbles ``u = q + 8`` (element ``j`` low, ``j + 16`` high;
``x^ = d (u - 8)``). Squeezer's grid is symmetric, ``d = max|x| / qmax`` with codes in ``[-qmax, qmax]``
(``qmax`` = 127 / 7); llama.cpp's own Q4_0 quantizer picks ``d = x_max / -8`` (the extreme value on code -8),
a different grid that the same block layout also holds. Other tensors are written as F32. Tensor names
stay the Hugging Face names: the file is a GGUF container of the weights, not a llama.cpp conversion.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..config import PRESETS, QuantConfig
from ..errors import ConfigError, DataError, ModelError
from ..quant.core import QTensor
from .folder import HFFolder, PretrainedResult, selected
from .weights import groups_fit, quantize_weight

BLOCK = 32
GGUF_PRESETS = {"q8_0": "Q8_0", "q4_0": "Q4_0"}
"""Presets whose grid is a GGUF block type, and that type's name in ``gguf.GGMLQuantizationType``."""


def gguf_type(cfg: QuantConfig) -> str:
    """The GGUF block type of ``cfg``'s weight grid (that of preset ``q8_0`` / ``q4_0``, any algorithm)."""
    qtype = next((t for name, t in GGUF_PRESETS.items() if PRESETS[name].weight == cfg.weight), None)
    if qtype is None or cfg.activation is not None:
        raise ConfigError(f"preset {cfg.name!r} has no GGUF block type; supported: {', '.join(GGUF_PRESETS)} "
                          "(with any algorithm suffix, e.g. q4_0-gptq)")
    return qtype


def blocks(qt: QTensor, qtype: str) -> np.ndarray:
    """The GGUF bytes of ``qt`` (codes ``(N, K)``, scales ``(N, K / 32)``): ``(N, K / 32 * block bytes)`` uint8."""
    n, k = qt.shape
    d = qt.qparams.scale.to(torch.float16).reshape(-1, 1).view(torch.uint8).numpy()
    codes = qt.codes.reshape(-1, BLOCK).numpy()
    if qtype == "Q8_0":
        qs = codes.astype(np.int8).view(np.uint8)
    else:
        u = (codes.astype(np.int16) + 8).astype(np.uint8).reshape(-1, 2, BLOCK // 2)
        qs = u[:, 0] | (u[:, 1] << np.uint8(4))
    return np.concatenate([d, qs], axis=1).reshape(n, -1)


class GGUFOut:
    """The GGUF file ``out`` under construction: :meth:`plan` every tensor (sizes follow from the shapes), then
    :meth:`write` each tensor's data in the planned order as it comes; written to ``.<name>.partial``, renamed
    onto ``out`` on leaving the ``with`` block without error."""

    def __init__(self, source: HFFolder, cfg: QuantConfig, out: Path) -> None:
        import gguf

        self.qtype = getattr(gguf.GGMLQuantizationType, gguf_type(cfg))
        if out.is_dir():
            raise DataError(f"output path {out} is a directory; the GGUF output is one file")
        out.parent.mkdir(parents=True, exist_ok=True)
        self.out = out
        self.partial = out.with_name(f".{out.name}.partial")
        self.writer = gguf.GGUFWriter(str(self.partial), source.config.get("model_type", "llama"))
        self.writer.add_string("squeezer.preset", cfg.name)
        self.order: list[str] = []
        self._next = 0

    def plan(self, name: str, shape: tuple[int, ...], quantized: bool) -> None:
        import gguf

        if quantized:
            stored = gguf.quant_shape_to_byte_shape(shape, self.qtype)
            self.writer.add_tensor_info(name, stored, np.dtype(np.uint8), int(np.prod(stored)), raw_dtype=self.qtype)
        else:
            self.writer.add_tensor_info(name, shape, np.dtype(np.float32), 4 * int(np.prod(shape)))
        self.order.append(name)

    def __enter__(self) -> "GGUFOut":
        return self

    def start(self) -> None:
        """Write the header, metadata and tensor infos (after the last :meth:`plan`)."""
        self.writer.write_header_to_file()
        self.writer.write_kv_data_to_file()
        self.writer.write_ti_data_to_file()

    def write(self, name: str, data: torch.Tensor | QTensor) -> None:
        """The data of tensor ``name``: a float tensor (stored F32) or its codes (stored as blocks)."""
        if self.order[self._next] != name:
            raise ModelError(f"GGUF output: tensor {name!r} comes out of order (expected {self.order[self._next]!r})")
        self._next += 1
        self.writer.write_tensor_data(blocks(data, self.qtype.name) if isinstance(data, QTensor)
                                      else data.float().numpy())

    def __exit__(self, kind, *_: object) -> None:
        try:
            if kind is None:
                self.writer.close()
                os.replace(self.partial, self.out)
        finally:
            if self.partial.exists():
                self.partial.unlink()


def write_gguf(source: HFFolder, cfg: QuantConfig, out: Path, include: str, ignore: tuple[str, ...],
               result: PretrainedResult) -> None:
    """Write the GGUF file ``out`` with round-to-nearest codes, tensors in shard order."""
    with GGUFOut(source, cfg, out) as file:
        plan: list[tuple[str, Path, bool]] = []
        for shard in source.shards:
            for name, shape, floating in source.infos(shard):
                quantized = selected(name, shape, floating, include, ignore) and groups_fit(shape, cfg.weight)
                file.plan(name, shape, quantized)
                (result.quantized if quantized else result.kept).append(name)
                plan.append((name, shard, quantized))
        file.start()
        for name, shard, quantized in plan:
            tensor = source.tensor(shard, name)
            file.write(name, quantize_weight(name, tensor, cfg.weight, torch.float16) if quantized else tensor)

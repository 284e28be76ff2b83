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

from ..config import QuantConfig
from ..errors import ConfigError, DataError
from ..quant.core import QTensor
from ..quant.spec import PerGroup, QuantSpec
from .folder import HFFolder, PretrainedResult, selected
from .weights import groups_fit, quantize_weight

BLOCK = 32
GGUF_PRESETS = {"q8_0": "Q8_0", "q4_0": "Q4_0"}
"""Presets whose grid is a GGUF block type, and that type's name in ``gguf.GGMLQuantizationType``."""


def _check(cfg: QuantConfig) -> str:
    spec = cfg.weight
    qtype = GGUF_PRESETS.get(cfg.name)
    if qtype is None or spec != QuantSpec(bits=spec.bits, granularity=PerGroup(BLOCK)):
        raise ConfigError(f"preset {cfg.name!r} has no GGUF block type; supported: {', '.join(GGUF_PRESETS)}")
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


def write_gguf(source: HFFolder, cfg: QuantConfig, out: Path, include: str, ignore: tuple[str, ...],
               result: PretrainedResult) -> None:
    """Write the GGUF file ``out``: tensor infos first (sizes follow from the shapes in the shard headers),
    then each tensor's data as it is read and quantized, to ``.<name>.partial`` renamed onto ``out`` when complete."""
    import gguf

    qtype = getattr(gguf.GGMLQuantizationType, _check(cfg))
    if out.is_dir():
        raise DataError(f"output path {out} is a directory; the GGUF output is one file")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial")
    writer = gguf.GGUFWriter(str(partial), source.config.get("model_type", "llama"))
    writer.add_string("squeezer.preset", cfg.name)
    plan: list[tuple[str, Path, bool]] = []
    for shard in source.shards:
        for name, shape, floating in source.infos(shard):
            quantized = selected(name, shape, floating, include, ignore) and groups_fit(shape, cfg.weight)
            if quantized:
                stored = gguf.quant_shape_to_byte_shape(shape, qtype)
                writer.add_tensor_info(name, stored, np.dtype(np.uint8), int(np.prod(stored)), raw_dtype=qtype)
            else:
                writer.add_tensor_info(name, shape, np.dtype(np.float32), 4 * int(np.prod(shape)))
            (result.quantized if quantized else result.kept).append(name)
            plan.append((name, shard, quantized))
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for name, shard, quantized in plan:
            tensor = source.tensor(shard, name)
            data = (blocks(quantize_weight(name, tensor, cfg.weight, torch.float16), qtype.name) if quantized
                    else tensor.float().numpy())
            writer.write_tensor_data(data)
        writer.close()
        os.replace(partial, out)
    finally:
        if partial.exists():
            partial.unlink()


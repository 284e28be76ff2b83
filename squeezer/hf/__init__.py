"""Quantization of Hugging Face folders: safetensors shards in, quantized files out.

Without calibration (model-free) no model is built and no forward pass runs: each weight is read from its
memory-mapped shard, quantized with round-to-nearest (:mod:`squeezer.quant.core`) and written at once, so
memory stays bounded by the largest tensor. With calibration (token ids or texts, :mod:`.calib_text`) the
model runs one block at a time (:mod:`.sequential`, skeleton in :mod:`.skeleton`, hidden states in
:mod:`.hidden`, mixture-of-experts in :mod:`.moe`), each block quantized by :func:`squeezer.quantize`.
:func:`quantize_pretrained` writes a compressed-tensors folder (:mod:`.compressed`) or a GGUF file
(:mod:`.gguf_file`), or with calibration squeezer's own checkpoints, one per block (:mod:`.block_checkpoint`,
read back by :func:`load_pretrained`); :mod:`.testmodels` writes seeded test folders.
"""

from __future__ import annotations

from .block_checkpoint import load_pretrained
from .pretrained import FORMATS, quantize_pretrained

__all__ = ["FORMATS", "load_pretrained", "quantize_pretrained"]

"""Model-free quantization of Hugging Face folders: safetensors shards in, quantized files out.

No model is built and no forward pass runs: each weight is read from its memory-mapped shard, quantized
with round-to-nearest (:mod:`squeezer.quant.core`) and written at once, so memory stays bounded by the
largest tensor. :func:`quantize_pretrained` writes a compressed-tensors folder (:mod:`.compressed`) or a
GGUF file (:mod:`.gguf_file`).
"""

from __future__ import annotations

from .pretrained import FORMATS, quantize_pretrained

__all__ = ["FORMATS", "quantize_pretrained"]

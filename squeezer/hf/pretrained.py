"""``quantize_pretrained``: a Hugging Face folder through a data-free preset into one output format."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..config import PRESETS, QuantConfig
from ..errors import ConfigError, excerpt
from ..resolve import resolve_config
from .calib_text import token_batches
from .compressed import write_compressed
from .folder import BLOCK_LINEAR, HFFolder, PretrainedResult
from .gguf_file import write_gguf
from .sequential import quantize_sequential

FORMATS = ("compressed-tensors", "gguf", "squeezer")


def data_free_presets() -> tuple[str, ...]:
    """Presets that need no calibration: uniform weights only, no activation quantization, RTN."""
    return tuple(name for name, cfg in PRESETS.items() if _data_free(cfg))


def _data_free(cfg: QuantConfig) -> bool:
    return cfg.activation is None and cfg.weight.mapping == "uniform" and cfg.algorithm == "rtn"


def resolve_preset(preset: str) -> QuantConfig:
    """The data-free preset named ``preset``; any other name is a :class:`ConfigError` listing the choices."""
    cfg = PRESETS.get(preset) if isinstance(preset, str) else None
    if cfg is None or not _data_free(cfg):
        raise ConfigError(f"preset {excerpt(preset)} is not a data-free preset for model-free quantization; "
                          f"supported: {', '.join(data_free_presets())}")
    return cfg


def quantize_pretrained(folder: str | Path, preset: str, out: str | Path, format: str = "compressed-tensors",
                        include: str = BLOCK_LINEAR, ignore: tuple[str, ...] = (), calib: Sequence | None = None,
                        seq_len: int = 512, n_samples: int = 128, max_hidden_bytes: int = 1 << 30,
                        min_expert_tokens: int = 16, distributed: bool | Any = False) -> PretrainedResult:
    """Quantize the Linear weights of a Hugging Face folder.

    Without ``calib``: a data-free preset, one tensor at a time; ``include`` (regex) picks the 2-D weights to
    quantize, ``ignore`` patterns drop some of them; every other tensor is written in its own dtype.
    With ``calib`` (token-id arrays ``(T,)`` / ``(B, T)``, or texts tokenised by the folder's tokenizer into up
    to ``n_samples`` windows of ``seq_len`` tokens): any preset, algorithm suffixes included, one block in memory
    at a time (:mod:`squeezer.hf.sequential`; hidden states above ``max_hidden_bytes`` spilled to disk); the
    blocks' Linear layers are quantized, tensors outside the blocks are written as stored; experts of a
    mixture-of-experts block that receive fewer than ``min_expert_tokens`` calibration tokens keep
    round-to-nearest (``result.rtn_fallback``), shared experts are quantized as dense MLPs, and routers stay in
    float on both paths (``result.float_routers``). ``distributed`` (with ``calib``; ``True`` for the default group
    of an initialised ``torch.distributed``, or a process group): ``calib`` is this process's share of the
    calibration samples, each block's statistics are combined over the group before it is quantized
    (:func:`squeezer.quantize`'s ``distributed``), and process 0 alone writes ``out``.
    ``format``: ``compressed-tensors`` (a folder ``out`` that transformers and vLLM load; weight-only presets
    without input scales), ``gguf`` (a file ``out``; the grids of presets ``q8_0`` / ``q4_0`` only) or, with
    ``calib``, ``squeezer`` (a folder of squeezer checkpoints, one per block, for every preset:
    :func:`squeezer.hf.load_pretrained` reads it back)."""
    if format not in FORMATS:
        raise ConfigError(f"format {excerpt(format)} is not supported; supported: {', '.join(FORMATS)}")
    source = HFFolder.open(folder)
    result = PretrainedResult(Path(out), format, preset)
    if calib is not None:
        cfg = resolve_config(preset)
        batches = token_batches(calib, source.path, int(source.config.get("vocab_size", 1 << 62)), seq_len, n_samples)
        return quantize_sequential(source, cfg, batches, Path(out), format, result, max_hidden_bytes, min_expert_tokens,
                                   distributed)
    if distributed not in (False, None):
        raise ConfigError("distributed=... shares calibration samples between processes: pass calib=... (model-free "
                          "quantization runs in one process)", argument="distributed")
    if format == "squeezer":
        raise ConfigError("format 'squeezer' (one squeezer checkpoint per block) is written by calibrated "
                          "quantization: pass calib=...", argument="calib")
    cfg = resolve_preset(preset)
    write = write_gguf if format == "gguf" else write_compressed
    write(source, cfg, Path(out), include, tuple(ignore), result)
    result.float_routers = [name for name in result.kept if source.router(name)]
    return result

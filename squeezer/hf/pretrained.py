"""``quantize_pretrained``: a Hugging Face folder through a data-free preset into one output format."""

from __future__ import annotations

from pathlib import Path

from ..config import PRESETS, QuantConfig
from ..errors import ConfigError, excerpt
from .compressed import write_compressed
from .folder import BLOCK_LINEAR, HFFolder, PretrainedResult
from .gguf_file import write_gguf

FORMATS = ("compressed-tensors", "gguf")


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
                        include: str = BLOCK_LINEAR, ignore: tuple[str, ...] = ()) -> PretrainedResult:
    """Quantize the Linear weights of a Hugging Face folder with a data-free preset, one tensor at a time.

    ``include`` (regex) picks the 2-D weights to quantize, ``ignore`` patterns drop some of them; every other
    tensor is written in its own dtype. ``format``: ``compressed-tensors`` (a folder ``out`` that transformers
    and vLLM load) or ``gguf`` (a file ``out``; presets ``q8_0`` / ``q4_0`` only)."""
    if format not in FORMATS:
        raise ConfigError(f"format {excerpt(format)} is not supported; supported: {', '.join(FORMATS)}")
    cfg = resolve_preset(preset)
    source = HFFolder.open(folder)
    result = PretrainedResult(Path(out), format, preset)
    write = write_gguf if format == "gguf" else write_compressed
    write(source, cfg, Path(out), include, tuple(ignore), result)
    return result

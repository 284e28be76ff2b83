"""compressed-tensors output: a Hugging Face folder whose Linear weights hold squeezer's integer codes.

The scheme and the packing are the compressed-tensors library's own (``QuantizationArgs`` /
``QuantizationScheme`` / ``QuantizationConfig``; the ``int-quantized`` compressor for 8 bits, ``pack-quantized``
below). Codes use the library's signed convention: an asymmetric squeezer grid (unsigned codes ``q`` and
zero point ``Z`` in ``[0, 2^b - 1]``) is shifted to ``q - 2^(b-1)``, ``Z - 2^(b-1)``; ``(q - Z) * S`` is unchanged.

``pack-quantized`` packs an asymmetric group / channel zero point ``(N, G)`` into int32 rows ``(ceil(N b / 32), G)``,
which is what vLLM and the library's ``decompress`` read. transformers sets up such a model on meta tensors, where
compressed-tensors leaves that parameter unpacked ``(N, G)``, so its load stops on the shape. Those folders carry
the ``dequantize`` flag of transformers' ``CompressedTensorsConfig`` in ``quantization_config`` (:func:`load_flags`;
mixture-of-experts folders too, whose experts transformers fuses on load):
transformers then decompresses each weight with the library's own ``decompress`` while loading (a dense model
with ``(q - Z) * S``), and other readers ignore the key.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..config import QuantConfig
from ..errors import ConfigError
from ..io.atomic import atomic_directory
from ..quant.core import QTensor, dequantize
from ..quant.spec import PerChannel, PerGroup, PerTensor, QuantSpec
from .folder import TRANSPOSED_WEIGHTS, HFFolder, PretrainedResult, selected
from .moe import STORED_NAMES
from .stream import SafetensorsStream
from .weights import groups_fit, quantize_weight

if TYPE_CHECKING:
    from compressed_tensors.quantization import QuantizationArgs


def quantization_args(spec: QuantSpec, preset: str):
    """The compressed-tensors ``QuantizationArgs`` of a uniform weight spec."""
    from compressed_tensors.quantization import QuantizationArgs

    g = spec.granularity
    if isinstance(g, PerGroup):
        strategy = {"strategy": "group", "group_size": g.size}
    elif isinstance(g, PerChannel) and g.axis in (0, -2):
        strategy = {"strategy": "channel"}
    elif isinstance(g, PerTensor):
        strategy = {"strategy": "tensor"}
    else:
        raise ConfigError(f"preset {preset!r}: granularity {g.describe()} has no compressed-tensors strategy")
    if not 1 <= spec.bits <= 8:
        raise ConfigError(f"preset {preset!r}: {spec.bits}-bit weights have no compressed-tensors format (1..8)")
    return QuantizationArgs(num_bits=spec.bits, type="int", symmetric=spec.symmetric, **strategy)


def load_flags(fmt: str, args: QuantizationArgs, model_type: str | None) -> dict[str, bool]:
    """The transformers loading options ``quantization_config`` carries for ``fmt`` / ``args`` and the folder's
    ``model_type``: ``dequantize`` where ``pack-quantized`` packs the zero point (asymmetric, a strategy in the
    library's ``PACK_ZP_STRATS``), and for mixture-of-experts models (:data:`.moe.STORED_NAMES`: transformers fuses
    their experts on load, so it takes their weights dequantized)."""
    from compressed_tensors.compressors.pack_quantized.base import PACK_ZP_STRATS

    packed_zero_point = fmt == "pack-quantized" and not args.symmetric and args.strategy in PACK_ZP_STRATS
    return {"dequantize": True} if packed_zero_point or model_type in STORED_NAMES else {}


def _state(qt: QTensor) -> dict[str, torch.Tensor]:
    """The per-module state the compressor takes: ``weight = (q - Z) * S`` (fp32), scale ``(N, G)`` / ``(N, 1)`` /
    ``(1,)`` and signed zero point.
    The compressor's ``round(W / S) + Z`` gives back the codes exactly (``|error| << 1/2``)."""
    shape = (1,) if isinstance(qt.spec.granularity, PerTensor) else (qt.shape[0], -1)  # the library's layout
    state = {"weight": dequantize(qt), "weight_scale": qt.qparams.scale.reshape(shape)}
    if qt.qparams.zero_point is not None:
        zero = qt.qparams.zero_point.reshape(shape) - 2 ** (qt.spec.bits - 1)
        state["weight_zero_point"] = zero.to(torch.int8)
    return state


class CompressedWriter:
    """The files of a compressed-tensors folder under construction in ``folder``: shards written one tensor at a
    time (:meth:`shard`, :meth:`add_quantized`, :meth:`add_kept`), then :meth:`finish` writes config.json with
    ``quantization_config``, the index and the source folder's other files (tokenizer, ...)."""

    def __init__(self, source: HFFolder, cfg: QuantConfig, folder: Path) -> None:
        from compressed_tensors.compressors import BaseCompressor

        if source.model_type in TRANSPOSED_WEIGHTS:
            raise ConfigError(f"{source.path}: model_type {source.model_type!r} holds its Linear layers as Conv1D "
                              "modules, which compressed-tensors does not quantize (nn.Linear / nn.Embedding only), "
                              "so transformers cannot load such a folder; use format 'gguf' or, with calib, "
                              "'squeezer'")
        if cfg.activation is not None:
            raise ConfigError(f"preset {cfg.name!r} quantizes activations; the compressed-tensors output holds "
                              "weight-only presets")
        self.args = quantization_args(cfg.weight, cfg.name)
        self.fmt = "int-quantized" if cfg.weight.bits == 8 else "pack-quantized"
        self.compressor = BaseCompressor.get_value_from_registry(self.fmt)
        self.folder = folder
        self.targets: list[str] = []
        self.weight_map: dict[str, str] = {}
        self._writer: SafetensorsStream | None = None

    def shard(self, name: str) -> None:
        """Close the current shard and start the shard file ``name``."""
        self.close_shard()
        self._writer = SafetensorsStream(self.folder / name)

    def close_shard(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self.weight_map.update(dict.fromkeys(self._writer.names, self._writer.path.name))
            self._writer = None

    def add_kept(self, name: str, tensor: torch.Tensor) -> None:
        self._writer.add(name, tensor)

    def add_quantized(self, module: str, qt: QTensor, scale_dtype: torch.dtype) -> None:
        """The Linear ``module``'s weight as its codes ``qt`` (scales stored in ``scale_dtype``)."""
        from compressed_tensors.quantization import QuantizationScheme

        scheme = QuantizationScheme(targets=[module], weights=self.args, format=self.fmt)
        for key, value in self.compressor.compress(_state(qt), scheme).items():
            self._writer.add(f"{module}.{key}", value.to(scale_dtype) if key == "weight_scale" else value)
        self.targets.append(module)

    def finish(self, source: HFFolder) -> None:
        from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme

        self.close_shard()
        scheme = QuantizationScheme(targets=self.targets, weights=self.args, format=self.fmt)
        qconfig = QuantizationConfig(config_groups={"group_0": scheme}, format=self.fmt,
                                     quantization_status="compressed")
        flags = load_flags(self.fmt, self.args, source.model_type)
        config = {**source.config, "quantization_config": {**qconfig.to_dict(), **flags}}
        (self.folder / "config.json").write_text(json.dumps(config, indent=2, default=str))
        (self.folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": self.weight_map}, indent=2))
        for extra in source.extra_files():
            shutil.copy2(extra, self.folder / extra.name)


def write_compressed(source: HFFolder, cfg: QuantConfig, out: Path, include: str, ignore: tuple[str, ...],
                     result: PretrainedResult) -> None:
    """Write ``out`` with round-to-nearest codes: one output shard per input shard (routers kept as stored)."""
    with atomic_directory(out) as tmp:
        writer = CompressedWriter(source, cfg, tmp)
        for shard in source.shards:
            writer.shard(shard.name)
            for name, shape, floating in source.infos(shard):
                tensor = source.tensor(shard, name)
                if not (selected(name, shape, floating, include, ignore) and groups_fit(shape, cfg.weight)
                        and not source.router(name)):
                    writer.add_kept(name, tensor)
                    result.kept.append(name)
                    continue
                scale_dtype = tensor.dtype if tensor.dtype != torch.float64 else torch.float32
                qt = quantize_weight(name, tensor, cfg.weight, scale_dtype)
                writer.add_quantized(name.removesuffix(".weight"), qt, scale_dtype)
                del qt, tensor
                result.quantized.append(name)
        writer.finish(source)

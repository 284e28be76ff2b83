"""compressed-tensors output: a Hugging Face folder whose Linear weights hold squeezer's integer codes.

The scheme and the packing are the compressed-tensors library's own (``QuantizationArgs`` /
``QuantizationScheme`` / ``QuantizationConfig``; the ``int-quantized`` compressor for 8 bits, ``pack-quantized``
below). Codes use the library's signed convention: an asymmetric squeezer grid (unsigned codes ``q`` and
zero point ``Z`` in ``[0, 2^b - 1]``) is shifted to ``q - 2^(b-1)``, ``Z - 2^(b-1)``; ``(q - Z) * S`` is unchanged.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ..config import QuantConfig
from ..errors import ConfigError
from ..io.atomic import atomic_directory
from ..quant.core import QTensor, dequantize
from ..quant.spec import PerChannel, PerGroup, PerTensor, QuantSpec
from .folder import HFFolder, PretrainedResult, selected
from .stream import SafetensorsStream
from .weights import groups_fit, quantize_weight


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


def write_compressed(source: HFFolder, cfg: QuantConfig, out: Path, include: str, ignore: tuple[str, ...],
                     result: PretrainedResult) -> None:
    """Write ``out``: config.json with ``quantization_config``, one output shard per input shard, the index,
    and the folder's other files (tokenizer, ...)."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme

    args = quantization_args(cfg.weight, cfg.name)
    fmt = "int-quantized" if cfg.weight.bits == 8 else "pack-quantized"
    compressor = BaseCompressor.get_value_from_registry(fmt)
    targets: list[str] = []
    weight_map: dict[str, str] = {}
    with atomic_directory(out) as tmp:
        for shard in source.shards:
            writer = SafetensorsStream(tmp / shard.name)
            for name, shape, floating in source.infos(shard):
                tensor = source.tensor(shard, name)
                if not (selected(name, shape, floating, include, ignore) and groups_fit(shape, cfg.weight)):
                    writer.add(name, tensor)
                    result.kept.append(name)
                    continue
                module = name.removesuffix(".weight")
                scale_dtype = tensor.dtype if tensor.dtype != torch.float64 else torch.float32
                qt = quantize_weight(name, tensor, cfg.weight, scale_dtype)
                scheme = QuantizationScheme(targets=[module], weights=args, format=fmt)
                for key, value in compressor.compress(_state(qt), scheme).items():
                    writer.add(f"{module}.{key}", value.to(scale_dtype) if key == "weight_scale" else value)
                del qt, tensor
                targets.append(module)
                result.quantized.append(name)
            writer.close()
            weight_map.update(dict.fromkeys(writer.names, shard.name))
        scheme = QuantizationScheme(targets=targets, weights=args, format=fmt)
        qconfig = QuantizationConfig(config_groups={"group_0": scheme},
                                     format=fmt, quantization_status="compressed")
        config = {**source.config, "quantization_config": qconfig.to_dict()}
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))
        (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map},
                                                                     indent=2))
        for extra in source.extra_files():
            shutil.copy2(extra, tmp / extra.name)

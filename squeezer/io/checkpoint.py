"""Checkpoints: ``model.safetensors`` (packed codes + parameters) and ``manifest.json``.

Tensors per quantized layer ``L``: ``L.weight.codes`` (uint8, bit-packed), ``L.weight.scale``,
``L.weight.zero_point``, ``L.weight.levels`` (when present), ``L.act.scale`` / ``L.act.zero_point``
(static activations). Every other entry of the state dict is stored as is. The manifest holds
the format version, each layer's scheme (:class:`LayerScheme`) and weight shape, the versions that wrote it, the
SHA-256 of the tensor file and ``kernels``: the kernel path(s) of each packed layer
(:func:`squeezer.kernels.packed_kernels`, empty for an unpacked model), which ``load(packed=True)``
packs with again. No pickle is involved on either side.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..version import __version__
from ..errors import ModelError
from ..kernels import pack, packed_kernels
from ..modules.layers import quantized_class_for
from ..modules.swap import ensure_deployable, set_child
from ..quant.core import QParams, QTensor, code_dtype, dequantize
from ..quant.scheme import LayerScheme
from ..quant.spec import QuantSpec
from .atomic import atomic_directory
from ..quant.packing import pack_codes, unpack_codes
from ..quant.rotation import is_block_size

FORMAT = "squeezer-checkpoint"
FORMAT_VERSION = 2  # 2: per-layer "scheme" (LayerScheme) in place of the whole config
TENSORS, MANIFEST = "model.safetensors", "manifest.json"


def _qparam_tensors(prefix: str, qp: QParams, spec: QuantSpec) -> dict[str, torch.Tensor]:
    """Scales (float), zero points in the spec's code dtype (they lie in ``[qmin, qmax]``), levels."""
    out = {f"{prefix}.scale": qp.scale}
    if qp.zero_point is not None:
        out[f"{prefix}.zero_point"] = qp.zero_point.to(code_dtype(spec))
    if qp.levels is not None:
        out[f"{prefix}.levels"] = qp.levels
    return out


def _qparams_from(prefix: str, tensors: dict[str, torch.Tensor]) -> QParams:
    zero = tensors.get(f"{prefix}.zero_point")
    return QParams(tensors[f"{prefix}.scale"], None if zero is None else zero.to(torch.int32),
                   tensors.get(f"{prefix}.levels"))


def save(model: nn.Module, directory: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write a quantized ``model`` to ``directory`` atomically; returns the directory."""
    layers = ensure_deployable(model, "save")
    tensors: dict[str, torch.Tensor] = {}
    manifest_layers: dict[str, Any] = {}
    skip = {f"{name}.weight" for name in layers}
    for key, value in model.state_dict().items():
        if key not in skip:
            tensors[key] = value.detach().contiguous()
    for name, layer in layers.items():
        qt = layer.weight_qtensor()
        tensors[f"{name}.weight.codes"] = pack_codes(qt.codes, qt.spec)
        tensors.update(_qparam_tensors(f"{name}.weight", qt.qparams, qt.spec))
        if layer.act_qparams is not None:
            tensors.update(_qparam_tensors(f"{name}.act", layer.act_qparams, layer.act_spec))
        manifest_layers[name] = {
            "type": type(layer).__name__, "shape": list(qt.shape), "dtype": "float32" if layer.is_packed else str(layer.weight.dtype).removeprefix("torch."),
            "scheme": layer.scheme.to_dict(),
        }
        if layer.input_rotation > 1:
            manifest_layers[name]["input_rotation"] = layer.input_rotation
    tensors = {k: v.contiguous().clone() for k, v in tensors.items()}
    with atomic_directory(directory) as tmp:
        save_file(tensors, str(tmp / TENSORS))
        digest = hashlib.sha256((tmp / TENSORS).read_bytes()).hexdigest()
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "squeezer_version": __version__,
            "torch_version": torch.__version__, "sha256": digest, "layers": manifest_layers,
            "kernels": packed_kernels(model), **(extra or {}),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return Path(directory)


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The manifest of a checkpoint, validated (format name and version)."""
    path = Path(directory) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelError(f"{directory} is not a squeezer checkpoint: {MANIFEST} is missing") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"checkpoint manifest {path} is corrupt: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ModelError(f"{path} is not a squeezer checkpoint manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ModelError(f"{path}: format version {manifest.get('format_version')!r} is not supported "
                         f"(this squeezer reads version {FORMAT_VERSION})")
    return manifest


def _read_tensors(directory: Path, manifest: dict[str, Any]) -> dict[str, torch.Tensor]:
    path = directory / TENSORS
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelError(f"cannot read checkpoint tensors {path}: {exc}") from None
    if hashlib.sha256(data).hexdigest() != manifest.get("sha256"):
        raise ModelError(f"checkpoint tensors {path} are corrupt or truncated (SHA-256 does not match the manifest)")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise ModelError(f"checkpoint tensors {path} cannot be read: {exc}") from None


def load(directory: str | Path, model: nn.Module | Callable[[], nn.Module], packed: bool = False) -> nn.Module:
    """Restore a checkpoint into ``model`` (an fp32 skeleton of the same architecture, changed
    in place, or a factory returning one). Outputs equal the saved model's bit for bit.
    ``packed=True`` returns it packed on integer kernels (see :func:`squeezer.pack`): the kernels the
    manifest records when the saved model was packed (the same paths, so the same outputs bit for
    bit), else those of the rule."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    tensors = _read_tensors(directory, manifest)
    if not isinstance(model, nn.Module):
        model = model()
    for name, info in manifest["layers"].items():
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            raise ModelError(f"checkpoint layer {name!r} does not exist in the given model") from None
        cls = quantized_class_for(layer)
        if cls is None or cls.__name__ != info["type"]:
            raise ModelError(f"checkpoint layer {name!r} is a {info['type']}, the model has {type(layer).__name__}")
        new = cls.from_float(layer, LayerScheme.from_dict(info["scheme"]))
        shape = tuple(info["shape"])
        if tuple(new.weight.shape) != shape:
            raise ModelError(f"checkpoint layer {name!r} has weight shape {shape}, the model {tuple(new.weight.shape)}")
        qt = QTensor(unpack_codes(tensors.pop(f"{name}.weight.codes"), new.weight_spec, shape),
                     _qparams_from(f"{name}.weight", tensors), new.weight_spec)
        with torch.no_grad():
            new.weight.copy_(dequantize(qt, new.weight.dtype))
        new.calibrate_weight(qt.qparams)
        if f"{name}.bias" in tensors and new.bias is None:  # added by bias correction
            new.bias = torch.nn.Parameter(torch.zeros_like(tensors[f"{name}.bias"]))
        rotation = info.get("input_rotation", 1)
        if rotation != 1:
            if not isinstance(layer, nn.Linear) or not is_block_size(rotation) or shape[1] % rotation:
                raise ModelError(f"checkpoint layer {name!r}: input_rotation {rotation!r} is not a power-of-two block "
                                 f"of a Linear layer's {shape[1]} input features")
            new.input_rotation = rotation
        if f"{name}.input_scale" in tensors:
            new.input_scale = tensors.pop(f"{name}.input_scale")
        if f"{name}.act.scale" in tensors:
            new.act_qparams = _qparams_from(f"{name}.act", tensors)
        for key in [k for k in tensors if k.startswith(f"{name}.weight.") or k.startswith(f"{name}.act.")]:
            del tensors[key]
        set_child(model, name, new)
    try:
        missing, unexpected = model.load_state_dict(tensors, strict=False)
    except RuntimeError as exc:
        raise ModelError(f"checkpoint {directory} does not match the model: {exc}") from None
    missing = [k for k in missing if k.rsplit(".", 1)[0] not in manifest["layers"]]
    if missing or unexpected:
        raise ModelError(f"checkpoint {directory} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.eval()
    if packed:
        pack(model, kernels=manifest.get("kernels") or "rule", inplace=True)
    return model

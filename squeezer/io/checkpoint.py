"""Checkpoints: ``model.safetensors`` (packed codes + parameters) and ``manifest.json``.

Tensors per quantized layer ``L``: ``L.weight.codes`` (uint8, bit-packed), ``L.weight.scale``,
``L.weight.zero_point``, ``L.weight.levels`` (when present), ``L.act.scale`` / ``L.act.zero_point``
(static activations); a recurrent layer: ``L.<matrix>.codes`` ... per weight matrix and, static, each state grid by
name, ``L.state.<key>.<state>.scale`` / ``.zero_point`` (``key`` = ``l0``, ``l0_reverse``, ...; the manifest's
``states`` lists them). Every other entry of the state dict is stored as is. The manifest holds
the format version, each layer's scheme (:class:`LayerScheme`) and weight shape (a recurrent layer: each matrix's
shape, and ``matrix_specs``, the spec of each matrix whose spec is not the scheme's), the versions that wrote it,
``folded_norms``: ``{norm: conv}`` of the batch norms folded into convolutions (:mod:`squeezer.fold`; loading folds
the given float model the same way before any tensor goes in),
``kernels``: the kernel path(s) of each packed layer (:func:`squeezer.kernels.packed_kernels`, empty for an
unpacked model), which ``load(packed=True)`` packs with again, and ``sha256``: the digest of the manifest's
other fields and the tensor file together (:mod:`squeezer.io.manifest`). No pickle is involved on either side.

Loading trusts nothing it reads: the digest is checked by streaming the files before any tensor is
read, then every tensor is checked against the manifest (names, dtypes, shapes, codes within the
range of the bits, scales finite and > 0, zero points where the scheme is asymmetric and within range,
floats finite). Every failure is a :class:`ModelError` naming the file and the layer or tensor.
A checkpoint never names code that squeezer runs.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..version import __version__
from ..errors import ModelError, SqueezerError
from ..fold import folded_norms, refold
from ..kernels import pack, packed_kernels
from ..modules.attention import unfuse
from ..modules.layers import quantized_class_for
from ..modules.recurrent import QuantRecurrent, static_state_spec
from ..modules.swap import ensure_deployable, set_child
from ..quant.blocks import to_blocks
from ..quant.core import QParams, QTensor, code_dtype, dequantize
from ..quant.scheme import LayerScheme
from ..quant.spec import QuantSpec
from .atomic import atomic_directory, recover_directory
from .manifest import FORMAT, FORMAT_VERSION, digest, matrix_specs, parse_bounded, validate
from ..quant.packing import pack_codes, unpack_codes
from ..quant.rotation import is_block_size

TENSORS, MANIFEST = "model.safetensors", "manifest.json"


def _qparam_tensors(prefix: str, qp: QParams, spec: QuantSpec) -> dict[str, torch.Tensor]:
    """Scales (float), zero points in the spec's code dtype (they lie in ``[qmin, qmax]``), levels."""
    out = {f"{prefix}.scale": qp.scale}
    if qp.zero_point is not None:
        out[f"{prefix}.zero_point"] = qp.zero_point.to(code_dtype(spec))
    if qp.levels is not None:
        out[f"{prefix}.levels"] = qp.levels
    return out


def _state_grids(layer: QuantRecurrent) -> dict[str, tuple[QParams, QuantSpec]]:
    """``{"<key>.<state>": (grid, spec)}``: each static state grid of ``layer`` (:meth:`QuantRecurrent.state_grids`
    order) that is calibrated, its scale and zero point as single values."""
    grids = {}
    for key, state in layer.state_grids():
        qp = layer.state_qparams.get(key, {}).get(state)
        if qp is not None:
            zero = None if qp.zero_point is None else qp.zero_point.reshape(())
            grids[f"{key}.{state}"] = (QParams(qp.scale.reshape(()), zero), layer.state_spec(state))
    return grids


def save(model: nn.Module, directory: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write a quantized ``model`` to ``directory`` atomically; returns the directory."""
    layers = ensure_deployable(model, "save")
    tensors: dict[str, torch.Tensor] = {}
    manifest_layers: dict[str, Any] = {}
    codes = {name: layer.weight_qtensors() for name, layer in layers.items()}
    skip = {f"{name}.{key}" for name, qtensors in codes.items() for key in qtensors}
    for key, value in model.state_dict().items():
        if key not in skip:
            tensors[key] = value.detach().contiguous()
    for name, layer in layers.items():
        qtensors = codes[name]
        shape = [sum(qt.codes.numel() for qt in qtensors.values())] if isinstance(layer, QuantRecurrent) \
            else list(qtensors["weight"].shape)
        for key, qt in qtensors.items():
            tensors[f"{name}.{key}.codes"] = pack_codes(qt.codes, qt.spec)
            tensors.update(_qparam_tensors(f"{name}.{key}", qt.qparams, qt.spec))
        if layer.act_qparams is not None:
            tensors.update(_qparam_tensors(f"{name}.act", layer.act_qparams, layer.act_spec))
        manifest_layers[name] = {
            "type": type(layer).__name__, "shape": shape,
            "dtype": "float32" if layer.is_packed else str(layer.weight.dtype).removeprefix("torch."),
            "scheme": layer.scheme.to_dict(),
        }
        if isinstance(layer, QuantRecurrent):
            manifest_layers[name]["matrices"] = {k: list(qt.shape) for k, qt in qtensors.items()}
            own = {k: qt.spec.to_dict() for k, qt in qtensors.items() if qt.spec != layer.scheme.weight}
            if own:
                manifest_layers[name]["matrix_specs"] = own
            grids = _state_grids(layer)
            for grid, (qp, spec) in grids.items():
                tensors.update(_qparam_tensors(f"{name}.state.{grid}", qp, spec))
            if grids:
                manifest_layers[name]["states"] = list(grids)
        if layer.input_rotation > 1:
            manifest_layers[name]["input_rotation"] = layer.input_rotation
    tensors = {k: v.contiguous().clone() for k, v in tensors.items()}
    norms = folded_norms(model)
    manifest = json.loads(json.dumps({  # as load will parse it: the digest covers exactly that
        "format": FORMAT, "format_version": FORMAT_VERSION, "squeezer_version": __version__,
        "torch_version": torch.__version__, "layers": manifest_layers,
        "kernels": packed_kernels(model), **({"folded_norms": norms} if norms else {}), **(extra or {}),
    }))
    with atomic_directory(directory) as tmp:
        save_file(tensors, str(tmp / TENSORS))
        manifest["sha256"] = digest(manifest, tmp / TENSORS)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return Path(directory)


def _read_checked_manifest(directory: Path) -> tuple[dict[str, Any], dict[str, LayerScheme]]:
    path = directory / MANIFEST
    manifest = parse_bounded(path)
    return manifest, validate(manifest, path)


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The manifest of a checkpoint, validated field by field (not yet against the digest: see :func:`verify`)."""
    return _read_checked_manifest(Path(directory))[0]


def _read_tensors(directory: Path, manifest: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors, after the digest of manifest + tensor file (streamed) matched."""
    path = directory / TENSORS
    try:
        sealed = digest(manifest, path) == manifest["sha256"]
    except OSError as exc:
        raise ModelError(f"cannot read checkpoint tensors {path}: {exc}") from None
    if not sealed:
        raise ModelError(f"checkpoint {directory} is corrupt or truncated: the SHA-256 of {MANIFEST} and {TENSORS} "
                         "does not match the manifest's")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise ModelError(f"checkpoint tensors {path} cannot be read: {exc}") from None


class _Tensors:
    """The tensors of one checkpoint file, taken out one by one with checks that name the file and tensor."""

    def __init__(self, path: Path, tensors: dict[str, torch.Tensor]) -> None:
        self.path, self.left = path, tensors

    def fail(self, key: str, problem: str) -> ModelError:
        return ModelError(f"checkpoint tensors {self.path}: {key!r} {problem}")

    def take(self, key: str, dtype: torch.dtype | None = None, shape: tuple[int, ...] | None = None,
             required: bool = True) -> torch.Tensor | None:
        """Pop ``key`` (None when absent and not ``required``), checking its dtype (``None``: any float) and shape."""
        if key not in self.left:
            if required:
                raise self.fail(key, "is missing")
            return None
        t = self.left.pop(key)
        if dtype is None and not t.is_floating_point():
            raise self.fail(key, f"must be floating point, got {t.dtype}")
        if dtype is not None and t.dtype != dtype:
            raise self.fail(key, f"must be {dtype}, got {t.dtype}")
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise self.fail(key, f"must have shape {tuple(shape)}, got {tuple(t.shape)}")
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise self.fail(key, "contains NaN or Inf")
        return t

    def refuse(self, key: str) -> None:
        if key in self.left:
            raise self.fail(key, "is not expected by the manifest")

    def in_range(self, key: str, t: torch.Tensor, lo: int, hi: int) -> None:
        if t.numel() and (int(t.min()) < lo or int(t.max()) > hi):
            raise self.fail(key, f"holds values outside [{lo}, {hi}]")

    def qparams(self, prefix: str, spec: QuantSpec, param_shape: tuple[int, ...] | None) -> QParams:
        """Scale (finite, > 0), zero point (exactly when asymmetric uniform, within ``[qmin, qmax]``),
        levels (exactly when a codebook)."""
        scale = self.take(f"{prefix}.scale", torch.float32, param_shape)
        if not (scale > 0).all():
            raise self.fail(f"{prefix}.scale", "must be > 0")
        asymmetric = not spec.is_codebook and not spec.symmetric
        zero = levels = None
        if asymmetric:
            zero = self.take(f"{prefix}.zero_point", code_dtype(spec), scale.shape)
            self.in_range(f"{prefix}.zero_point", zero, spec.qmin, spec.qmax)
        self.refuse(f"{prefix}.zero_point")
        if spec.is_codebook:
            levels = self.take(f"{prefix}.levels", torch.float32)
            blocks = int(torch.Size(param_shape or scale.shape).numel())
            ok = (levels.dim() == 1 or (levels.dim() == 2 and levels.shape[0] == blocks)) and \
                0 < levels.shape[-1] <= 2 ** spec.bits
            if not ok:
                raise self.fail(f"{prefix}.levels", f"must be a table of at most {2 ** spec.bits} levels "
                                f"(one per block or shared), got shape {tuple(levels.shape)}")
        self.refuse(f"{prefix}.levels")
        return QParams(scale, None if zero is None else zero.to(torch.int32), levels)

    def weight(self, name: str, spec: QuantSpec, shape: tuple[int, ...], key: str = "weight") -> QTensor:
        """The codes (unpacked, within range of ``spec``) and parameters of the layer's ``key`` (its weight, or a
        matrix)."""
        try:
            param_shape = to_blocks(torch.empty(shape, device="meta"), spec.granularity).param_shape
        except SqueezerError as exc:
            raise ModelError(f"checkpoint layer {name!r}: {exc}") from None
        numel = int(torch.Size(shape).numel())
        packed = self.take(f"{name}.{key}.codes", torch.uint8, (-(-numel * spec.bits // 8),))
        qparams = self.qparams(f"{name}.{key}", spec, param_shape)
        codes = unpack_codes(packed, spec, shape)
        if spec.is_codebook:
            self.in_range(f"{name}.{key}.codes", codes, 0, qparams.levels.shape[-1] - 1)
        else:
            self.in_range(f"{name}.{key}.codes", codes, spec.qmin, spec.qmax)
        return QTensor(codes, qparams, spec)

    def weights(self, name: str, scheme: LayerScheme, info: dict[str, Any]) -> dict[str, QTensor]:
        """The layer's codes by key: ``weight`` of ``shape``, or each of a recurrent layer's ``matrices``, each
        checked against its own spec (:func:`squeezer.io.manifest.matrix_specs`)."""
        shapes = info.get("matrices") or {"weight": info["shape"]}
        specs = matrix_specs(info, scheme)
        return {key: self.weight(name, specs[key], tuple(shape), key) for key, shape in shapes.items()}

    def refuse_activation(self, name: str) -> None:
        """No ``<name>.act.*`` tensor may be present."""
        for part in ("scale", "zero_point", "levels"):
            self.refuse(f"{name}.act.{part}")

    def activation(self, name: str, scheme: LayerScheme) -> QParams | None:
        """Static activation parameters: present exactly when the scheme's activations are static."""
        if scheme.activation_mode != "static":
            self.refuse_activation(name)
            return None
        return self.qparams(f"{name}.act", scheme.activation, None)

    def states(self, name: str, scheme: LayerScheme, grids: list[str]) -> dict[str, dict[str, QParams]]:
        """A recurrent layer's state grids ``{key: {state: QParams}}`` from ``<name>.state.<key>.<state>``, one
        value each on its own spec (:func:`~squeezer.modules.recurrent.static_state_spec`), for each of ``grids``
        (the manifest's ``states``); such a layer has no ``act`` tensors."""
        self.refuse_activation(name)
        out: dict[str, dict[str, QParams]] = {}
        for grid in grids:
            key, state = grid.split(".")
            spec = static_state_spec(state, scheme.activation)
            out.setdefault(key, {})[state] = self.qparams(f"{name}.state.{grid}", spec, ())
        return out

    def input_scale(self, name: str, in_features: int) -> torch.Tensor | None:
        scale = self.take(f"{name}.input_scale", required=False)
        if scale is not None and (scale.dim() != 1 or scale.numel() != in_features or not (scale > 0).all()):
            raise self.fail(f"{name}.input_scale", f"must be {in_features} positive values")
        return scale


def _verified(directory: Path) -> tuple[dict[str, Any], dict[str, LayerScheme], _Tensors]:
    manifest, schemes = _read_checked_manifest(directory)
    return manifest, schemes, _Tensors(directory / TENSORS, _read_tensors(directory, manifest))


def verify(directory: str | Path) -> dict[str, Any]:
    """Check a checkpoint without a model: manifest fields, digest, every quantized layer's tensors
    and every stored float finite. Returns the manifest; :class:`ModelError` on the first problem."""
    manifest, schemes, tensors = _verified(Path(directory))
    for name, scheme in schemes.items():
        info = manifest["layers"][name]
        shape = tuple(info["shape"])
        tensors.weights(name, scheme, info)
        if "matrices" in info:
            tensors.states(name, scheme, info.get("states", []))
        else:
            tensors.activation(name, scheme)
        tensors.input_scale(name, shape[1] if len(shape) > 1 else 1)
    for key in list(tensors.left):
        tensors.take(key, tensors.left[key].dtype)
    return manifest


def _restore_layer(model: nn.Module, name: str, info: dict[str, Any], scheme: LayerScheme, tensors: _Tensors) -> None:
    """Replace the float layer ``name`` of ``model`` by its quantized form from the checkpoint."""
    try:
        layer = model.get_submodule(name)
    except AttributeError:
        raise ModelError(f"checkpoint layer {name!r} does not exist in the given model") from None
    cls = quantized_class_for(layer)
    if cls is None or cls.__name__ != info["type"]:
        raise ModelError(f"checkpoint layer {name!r} is a {info['type']}, the model has {type(layer).__name__}")
    try:
        new = cls.from_float(layer, scheme)
    except SqueezerError as exc:
        raise ModelError(f"checkpoint layer {name!r}: {exc}") from None
    shape = tuple(info["shape"])
    own = {k: list(w.shape) for k, w in new.matrices().items()} if isinstance(new, QuantRecurrent) else None
    if own != info.get("matrices") or tuple(new.weight.shape) != shape:
        theirs = info.get("matrices") or shape
        raise ModelError(f"checkpoint layer {name!r} has weight shape(s) {theirs}, the model {own or tuple(new.weight.shape)}")
    qtensors = tensors.weights(name, scheme, info)
    if isinstance(new, QuantRecurrent):
        new.matrix_specs = {k: qt.spec for k, qt in qtensors.items()}
        new.set_matrices(qtensors)
    else:
        with torch.no_grad():
            new.weight.copy_(dequantize(qtensors["weight"], new.weight.dtype))
        new.calibrate_weight(qtensors["weight"].qparams)
    tensors.refuse(f"{name}.weight")
    bias = tensors.left.get(f"{name}.bias")
    if bias is not None and new.bias is None:  # added by bias correction
        new.bias = torch.nn.Parameter(torch.zeros_like(bias))
    rotation = info.get("input_rotation", 1)
    if rotation != 1:
        if not isinstance(layer, nn.Linear) or not is_block_size(rotation) or shape[1] % rotation:
            raise ModelError(f"checkpoint layer {name!r}: input_rotation {rotation!r} is not a power-of-two block "
                             f"of a Linear layer's {shape[1]} input features")
        new.input_rotation = rotation
    input_scale = tensors.input_scale(name, shape[1] if len(shape) > 1 else 1)
    if input_scale is not None:
        new.input_scale = input_scale
    if isinstance(new, QuantRecurrent):
        own_grids = [f"{key}.{state}" for key, state in new.state_grids()]
        theirs = set(info.get("states", []))
        missing, extra = sorted(set(own_grids) - theirs), sorted(theirs - set(own_grids))
        if missing or extra:
            raise ModelError(f"checkpoint layer {name!r} does not hold the state grids of the model's layer: missing "
                             f"{missing[:5]}, unexpected {extra[:5]}")
        new.state_qparams = tensors.states(name, scheme, own_grids)
    else:
        new.act_qparams = tensors.activation(name, scheme)
    set_child(model, name, new)


def _load_rest(model: nn.Module, tensors: _Tensors, layers: dict[str, Any], directory: Path) -> None:
    """Every other tensor: exactly the model's entries, with the model's dtypes and shapes."""
    own = model.state_dict()
    unexpected = sorted(k for k in tensors.left if k not in own)
    missing = sorted(k for k in own if k not in tensors.left and k.rsplit(".", 1)[0] not in layers)
    if missing or unexpected:
        raise ModelError(f"checkpoint {directory} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    state = {key: tensors.take(key, own[key].dtype, tuple(own[key].shape)) for key in list(tensors.left)}
    model.load_state_dict(state, strict=False)


def load(directory: str | Path, model: nn.Module | Callable[[], nn.Module], packed: bool = False) -> nn.Module:
    """Restore a checkpoint into ``model`` (an fp32 skeleton of the same architecture, changed
    in place, or a factory returning one). Outputs equal the saved model's bit for bit.
    ``packed=True`` returns it packed on integer kernels (see :func:`squeezer.pack`): the kernels the
    manifest records when the saved model was packed (the same paths, so the same outputs bit for
    bit), else those of the rule. Every check of :func:`verify` runs first, after a save killed between
    its two renames is repaired (:func:`squeezer.io.atomic.recover_directory`)."""
    directory = Path(directory)
    recover_directory(directory)
    manifest, schemes, tensors = _verified(directory)
    if not isinstance(model, nn.Module):
        model = model()
    refold(model, manifest.get("folded_norms", {}))
    unfuse(model)  # attention modules over child linear layers, as swap_layers left them
    for name, info in manifest["layers"].items():
        _restore_layer(model, name, info, schemes[name], tensors)
    _load_rest(model, tensors, manifest["layers"], directory)
    model.eval()
    if packed:
        try:
            pack(model, kernels=manifest.get("kernels") or "rule", inplace=True)
        except SqueezerError as exc:
            raise ModelError(f"checkpoint {directory}: kernels: {exc}") from None
    return model

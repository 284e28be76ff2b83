"""`QuantConfig`: what to quantize in a model and how, plus the named presets.

A config holds a weight :class:`QuantSpec`, an optional activation spec with its mode
(``dynamic``: parameters computed per call; ``static``: calibrated by an observer), which
layer types to take, ``include`` / ``ignore`` regular expressions on module names, and
``overrides``: ``{regex: {field: value}}`` applied to the layers whose name matches
(the first matching pattern wins), e.g. ``{"^head$": {"weight": {"bits": 8}}}``, or
``{"type:embedding": {...}}`` for every layer of a type, and the
weight ``algorithm`` (``rtn``, ``gptq``, ``awq``, ... with ``algorithm_options``; the name is checked
where the algorithm is built, :mod:`squeezer.algorithms`). Each quantized layer gets its own
:class:`LayerScheme` (:meth:`QuantConfig.for_layer`), not the config.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .errors import ConfigError, excerpt
from .modules.layers import layer_type_names
from .quant.scheme import ActivationMode, LayerScheme
from .quant.spec import PerChannel, PerGroup, PerTensor, PerToken, QuantSpec
from .safe_yaml import load_yaml

_NAMES = (str, list, tuple)
_FIELD_KINDS: dict[str, tuple[tuple[type, ...], str]] = {
    "weight": ((dict, QuantSpec), "a quant spec mapping"),
    "activation": ((dict, QuantSpec, type(None)), "a quant spec mapping or null"),
    "activation_mode": ((str,), "a name"), "observer": ((str,), "a name"),
    "layer_types": ((*_NAMES, type(None)), "a name, a list of names or null"),
    "include": (_NAMES, "a regex or a list of regexes"), "ignore": (_NAMES, "a regex or a list of regexes"),
    "overrides": ((dict,), "a mapping {regex: {field: value}}"), "algorithm": ((str,), "a name"),
    "algorithm_options": ((dict,), "a mapping"), "name": ((str,), "a name"),
}
"""What each field of a config read from a mapping (YAML) may be, and how an error says it."""
TYPE_KEY = "type:"  # an overrides key "type:embedding" selects layers by type instead of by name


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize a model (see module docstring). Invalid fields raise :class:`ConfigError`."""

    weight: QuantSpec = field(default_factory=QuantSpec)
    activation: QuantSpec | None = None
    activation_mode: ActivationMode = "none"
    observer: str = "minmax"
    layer_types: tuple[str, ...] | None = None
    include: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    algorithm: str = "rtn"
    algorithm_options: dict[str, Any] = field(default_factory=dict)
    name: str = "custom"

    def __post_init__(self) -> None:
        scheme = self.scheme  # validates the weight / activation fields (dicts become specs)
        object.__setattr__(self, "weight", scheme.weight)
        object.__setattr__(self, "activation", scheme.activation)
        if not isinstance(self.algorithm, str) or not isinstance(self.algorithm_options, dict):
            raise ConfigError("algorithm must be a name and algorithm_options a mapping")
        for name in ("layer_types", "include", "ignore"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))
        known = layer_type_names()
        bad = [t for t in self.layer_types or () if t not in known]
        if bad:
            raise ConfigError(f"unknown layer type(s) {bad}; valid: {', '.join(known)}")
        bad_types = [p for p in self.overrides if p.startswith(TYPE_KEY) and p[len(TYPE_KEY):] not in known]
        if bad_types:
            raise ConfigError(f"unknown layer type in overrides {bad_types}; valid: "
                              f"{', '.join(TYPE_KEY + t for t in known)}")
        for pattern in (*self.include, *self.ignore, *self.overrides):
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ConfigError(f"invalid layer-name pattern {pattern!r}: {exc}") from None
        for pattern, change in self.overrides.items():
            self._apply(change, f"overrides[{pattern!r}]")

    def _apply(self, change: dict[str, Any], where: str) -> "QuantConfig":
        if not isinstance(change, dict):
            raise ConfigError(f"{where} must be a mapping of config fields, got {type(change).__name__}")
        allowed = {"weight", "activation", "activation_mode", "observer"}
        unknown = sorted(map(str, set(change) - allowed))
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {unknown}; allowed: {sorted(allowed)}")
        values = dict(change)
        if isinstance(values.get("weight"), dict):
            values["weight"] = QuantSpec.from_dict({**self.weight.to_dict(), **values["weight"]})
        return replace(self, **values, overrides={})

    @property
    def scheme(self) -> LayerScheme:
        """The scheme of a layer no override matches."""
        return LayerScheme(self.weight, self.activation, self.activation_mode, self.observer)

    def for_layer(self, name: str, kind: str | None = None) -> LayerScheme:
        """The scheme of one layer: the first override whose pattern matches ``name`` (a key
        ``"type:<layer type>"`` matches every layer of that type, e.g. ``"type:embedding"``) applied, else
        :attr:`scheme`."""
        for pattern, change in self.overrides.items():
            hit = pattern == f"type:{kind}" if pattern.startswith(TYPE_KEY) else re.search(pattern, name)
            if hit:
                return self._apply(change, f"overrides[{pattern!r}]").scheme
        return self.scheme

    def for_matrix(self, layer: str, matrix: str, kind: str | None = None) -> QuantSpec:
        """The weight spec of one matrix of a recurrent layer (``matrix``: ``weight_hh_l0``, ...): the first
        name override matching ``<layer>.<matrix>`` (e.g. ``^lstm\\.weight_hh_l0$``: mixed precision inside a
        layer) applied, else the layer's own (:meth:`for_layer`)."""
        full = f"{layer}.{matrix}"
        for pattern, change in self.overrides.items():
            if not pattern.startswith(TYPE_KEY) and re.search(pattern, full):
                return self._apply(change, f"overrides[{pattern!r}]").weight
        return self.for_layer(layer, kind).weight

    def skip_reason(self, name: str, kind: str | None) -> str | None:
        """Why the layer ``name`` of type ``kind`` (None: not quantizable) is left in float, or None when
        it is taken: its type is in ``layer_types``, its name matches ``include`` (when given) and no ``ignore``."""
        if kind is None:
            return "type not quantizable"
        if self.layer_types is not None and kind not in self.layer_types:
            return f"layer type {kind} not selected"
        if self.include and not any(re.search(p, name) for p in self.include):
            return "not matched by include patterns"
        hit = next((p for p in self.ignore if re.search(p, name)), None)
        return None if hit is None else f"ignored by pattern {hit!r}"

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["weight"] = self.weight.to_dict()
        data["activation"] = None if self.activation is None else self.activation.to_dict()
        for key in ("layer_types", "include", "ignore"):
            data[key] = None if data[key] is None else list(data[key])
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "QuantConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"a quant config must be a mapping, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(map(str, set(data) - known))
        if unknown:
            raise ConfigError(f"unknown config field(s) {excerpt(unknown)}; known: {sorted(known)}")
        for key, value in data.items():
            kinds, what = _FIELD_KINDS[key]
            names = value if isinstance(value, (list, tuple)) else value if isinstance(value, dict) and key == "overrides" else ()
            if not isinstance(value, kinds) or isinstance(value, bool) or not all(isinstance(v, str) for v in names):
                raise ConfigError(f"config field {key!r} must be {what}, got {excerpt(value)}")
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "QuantConfig":
        try:
            text = Path(path).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from None
        return cls.from_dict(load_yaml(text, f"config file {path}"))


def _w(bits: int, granularity: Any, **kw: Any) -> QuantSpec:
    return QuantSpec(bits=bits, granularity=granularity, **kw)


EMBEDDINGS_INT8 = {"type:embedding": {"weight": _w(8, PerChannel(0)).to_dict()}}
"""Sub-8-bit presets keep embedding tables at int8 per row: a lookup table is a small share of the
compute, often the most sensitive layer, and its rows are gathered, not multiplied."""

PRESETS: dict[str, QuantConfig] = {
    "w8": QuantConfig(_w(8, PerChannel(0)), name="w8"),
    "w8g128": QuantConfig(_w(8, PerGroup(128), symmetric=False), overrides=EMBEDDINGS_INT8, name="w8g128"),
    "w4g128": QuantConfig(_w(4, PerGroup(128), symmetric=False), overrides=EMBEDDINGS_INT8, name="w4g128"),
    "w8a8": QuantConfig(
        _w(8, PerChannel(0)), _w(8, PerToken()), activation_mode="dynamic", name="w8a8"
    ),
    "w8a8-asym": QuantConfig(
        _w(8, PerChannel(0)), _w(8, PerToken(), symmetric=False), activation_mode="dynamic", name="w8a8-asym"
    ),
    "w8a8-tensor": QuantConfig(
        _w(8, PerChannel(0)), _w(8, PerTensor(), symmetric=False), activation_mode="dynamic", name="w8a8-tensor"
    ),
    "w8a8-static": QuantConfig(
        _w(8, PerChannel(0)), _w(8, PerTensor(), symmetric=False), activation_mode="static", name="w8a8-static"
    ),
    "w3g128": QuantConfig(_w(3, PerGroup(128), symmetric=False), overrides=EMBEDDINGS_INT8, name="w3g128"),
    "w2g64": QuantConfig(_w(2, PerGroup(64), symmetric=False), overrides=EMBEDDINGS_INT8, name="w2g64"),
    "ternary": QuantConfig(_w(2, PerChannel(0), mapping="ternary"), name="ternary"),
    "binary": QuantConfig(_w(1, PerChannel(0), mapping="binary"), name="binary"),
    "log2-w4": QuantConfig(_w(4, PerChannel(0), mapping="log2"), name="log2-w4"),
    "kmeans-w4": QuantConfig(_w(4, PerTensor(), mapping="kmeans"), name="kmeans-w4"),
    "q8_0": QuantConfig(_w(8, PerGroup(32)), name="q8_0"),
    "q4_0": QuantConfig(_w(4, PerGroup(32)), name="q4_0"),
}
"""Named configs. Weights: per-output-channel unless a group is named (``g128``: groups of 128
inputs); ``a8``: 8-bit activations, dynamic per token (``w8a8``: symmetric, torchao's scheme;
``w8a8-asym``: a scale and zero point per token, which keeps the full 8 bits for one-sided inputs
such as GELU outputs, at the cost of one zero-point correction per output), dynamic per tensor as uint8
(``w8a8-tensor``: the scheme of torch.ao / ONNX Runtime dynamic quantization, run by fbgemm and
``DynamicQuantizeMatMul``) or static per tensor (min-max observer). ``w8g128`` is ONNX Runtime's
``MatMulNBits`` 8-bit format (uint8, a scale and zero point per group of 128): for export; PyTorch has no
integer kernel for it.
``w8g128``, ``w4g128``, ``w3g128`` and ``w2g64`` keep embeddings at int8 per row (:data:`EMBEDDINGS_INT8`).
``q8_0`` / ``q4_0``: symmetric int8 / int4 in groups of 32, ``S = max|x| / qmax``: GGUF's Q8_0 / Q4_0 block layout
(:mod:`squeezer.hf.gguf_file`; llama.cpp's own Q4_0 quantizer puts the extreme on code -8 instead)."""

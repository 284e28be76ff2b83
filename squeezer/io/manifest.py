"""A checkpoint's ``manifest.json``: bounded JSON reading, its schema, and the digest that seals it.

The digest is ``SHA-256(TAG || len(C) as 8 bytes big-endian || C || tensor file bytes)`` where ``C`` is
the canonical JSON of the manifest without its ``sha256`` field (sorted keys, no spaces, ASCII): a
change to any manifest field or any tensor byte changes it. Reading is bounded: the file size, the
nesting depth and the length of each number are capped, so a hostile manifest gives a
:class:`ModelError` (never a ``RecursionError`` or a huge integer conversion).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any

from ..errors import ModelError, SqueezerError
from ..quant.scheme import LayerScheme
from ..quant.spec import QuantSpec
from .digest import update_from_file

FORMAT = "squeezer-checkpoint"
FORMAT_VERSION = 4
# 4: a static recurrent layer's state grids as <layer>.state.<key>.<state>.* (manifest "states"), batch norms
# folded out of the state dict ("folded_norms"); 3: the digest covers the manifest; 2: per-layer "scheme" (LayerScheme)
# An optional layer field (a recurrent layer's "matrix_specs") keeps the version: validation refuses
# unknown fields, so a reader that predates one refuses such a checkpoint by name instead of misreading it.
MAX_MANIFEST_BYTES = 16 << 20
MAX_DEPTH = 32
MAX_NUMBER_CHARS = 40
_TAG = b"squeezer-checkpoint-digest\0"
_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKETS = re.compile(r"[\[\]{}]")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_WEIGHT_DTYPES = ("float32", "float16", "bfloat16", "float64")
_EXAMPLE_KINDS = ("tensor", "tuple", "dict")
_EXAMPLE_DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool")
MAX_EXAMPLE_ELEMENTS = 1 << 24
_LAYER_KEYS = {"type", "shape", "dtype", "scheme", "input_rotation", "matrices", "matrix_specs", "states"}
_MATRIX_NAME = re.compile(r"weight_(ih|hh|hr)_l[0-9]{1,4}(_reverse)?")
"""A recurrent layer's weight matrix (``matrices``: name -> 2-D shape; ``shape`` is their total size;
``matrix_specs``, optional: name -> the weight spec of a matrix whose spec is not the scheme's, mixed precision
inside the layer)."""
_STATE_GRID = re.compile(r"l[0-9]{1,4}(_reverse)?\.(x|h|m|gates|candidate|c)")
"""A recurrent layer's static state grid, ``<key>.<state>`` (``states``: the names of its stored grids)."""
_MODULE_NAME = re.compile(r"[^.]{1,200}(\.[^.]{1,200}){0,63}")
"""A module's dotted name in a model (``folded_norms``: norm -> convolution)."""


def canonical(manifest: dict[str, Any]) -> bytes:
    """The manifest without its ``sha256`` field as canonical JSON bytes."""
    body = {k: v for k, v in manifest.items() if k != "sha256"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def digest(manifest: dict[str, Any], tensors: Path) -> str:
    """Hex digest of ``manifest`` (canonical form) and the tensor file, streamed."""
    body = canonical(manifest)
    hasher = hashlib.sha256(_TAG + len(body).to_bytes(8, "big") + body)
    update_from_file(hasher, tensors)
    return hasher.hexdigest()


def _number(kind: type, path: Path) -> Any:
    def parse(text: str) -> Any:
        if len(text) > MAX_NUMBER_CHARS:
            raise ModelError(f"checkpoint manifest {path}: a number of {len(text)} characters (at most {MAX_NUMBER_CHARS})")
        return kind(text)
    return parse


def _unique_keys(path: Path):
    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out = dict(items)
        if len(out) != len(items):
            raise ModelError(f"checkpoint manifest {path}: a JSON object repeats a key")
        return out
    return pairs


def _depth(text: str) -> int:
    """Deepest nesting of ``[`` / ``{`` in JSON ``text`` (brackets inside strings ignored)."""
    depth = deepest = 0
    for bracket in _BRACKETS.findall(_STRINGS.sub("", text)):
        depth += 1 if bracket in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


def parse_bounded(path: Path) -> Any:
    """JSON from ``path`` within the size, depth and number-length bounds, else :class:`ModelError`."""
    try:
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise ModelError(f"checkpoint manifest {path} is larger than {MAX_MANIFEST_BYTES >> 20} MiB")
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ModelError(f"{path.parent} is not a squeezer checkpoint: {path.name} is missing") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelError(f"checkpoint manifest {path} is corrupt: {exc}") from None
    if _depth(text) > MAX_DEPTH:
        raise ModelError(f"checkpoint manifest {path} is corrupt: JSON nested deeper than {MAX_DEPTH} levels")
    try:
        return json.loads(text, parse_int=_number(int, path), parse_float=_number(float, path),
                          object_pairs_hook=_unique_keys(path))
    except (json.JSONDecodeError, ValueError) as exc:
        if isinstance(exc, SqueezerError):
            raise
        raise ModelError(f"checkpoint manifest {path} is corrupt: {exc}") from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _expect(ok: bool, path: Path, where: str, what: str, value: Any) -> None:
    if not ok:
        raise ModelError(f"checkpoint manifest {path}: {where} must be {what}, got {value!r:.80}")


def _check_spec_types(spec: Any, path: Path, where: str) -> None:
    """JSON types of a quant spec dict (``QuantSpec`` checks the values): no truthy strings for booleans."""
    _expect(isinstance(spec, dict), path, where, "a mapping", spec)
    for key, ok, what in (("bits", _is_int, "an integer"), ("symmetric", lambda v: isinstance(v, bool), "true or false"),
                          ("signed", lambda v: v is None or isinstance(v, bool), "true, false or null"),
                          ("granularity", lambda v: isinstance(v, str), "a string"),
                          ("mapping", lambda v: isinstance(v, str), "a string"),
                          ("base", lambda v: v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)),
                           "a number or null")):
        if key in spec:
            _expect(ok(spec[key]), path, f"{where}.{key}", what, spec[key])


def _check_matrices(matrices: Any, shape: list[int], path: Path, where: str) -> None:
    """Recurrent weight matrices: known names, 2-D positive shapes, ``shape == [sum of their sizes]``."""
    _expect(isinstance(matrices, dict) and len(matrices) > 0, path, where,
            "a mapping of weight matrix -> shape", matrices)
    for name, dims in matrices.items():
        _expect(isinstance(name, str) and _MATRIX_NAME.fullmatch(name) is not None, path, f"{where} name",
                "weight_ih_l<k>, weight_hh_l<k> or weight_hr_l<k> (optionally _reverse)", name)
        _expect(isinstance(dims, list) and len(dims) == 2 and all(_is_int(d) and 0 < d < 2**31 for d in dims),
                path, f"{where}[{name!r}]", "a list of 2 positive integers", dims)
    total = sum(d[0] * d[1] for d in matrices.values())
    _expect(shape == [total], path, f"{where}", f"sizes adding up to the layer's shape {shape}", total)


def _check_matrix_specs(info: dict[str, Any], path: Path, where: str) -> None:
    """``matrix_specs``: a non-empty mapping of matrices the layer's ``matrices`` lists to valid weight specs."""
    specs = info["matrix_specs"]
    _expect("matrices" in info, path, where, "given only with the layer's matrices", specs)
    _expect(isinstance(specs, dict) and len(specs) > 0, path, where, "a mapping of weight matrix -> spec", specs)
    for matrix, spec in specs.items():
        _expect(matrix in info["matrices"], path, f"{where} name", f"one of {sorted(info['matrices'])}", matrix)
        _check_spec_types(spec, path, f"{where}[{matrix!r}]")
        try:
            QuantSpec.from_dict(spec)
        except SqueezerError as exc:
            raise ModelError(f"checkpoint manifest {path}: {where}[{matrix!r}]: {exc}") from None


def _check_states(info: dict[str, Any], scheme: LayerScheme, path: Path, where: str) -> None:
    """``states``: distinct ``<key>.<state>`` names, given only with the layer's matrices and static activations."""
    states = info["states"]
    _expect("matrices" in info and scheme.activation_mode == "static", path, where,
            "given only with the matrices of a layer with static activations", states)
    _expect(isinstance(states, list) and len(states) > 0 and all(isinstance(s, str) for s in states)
            and len(set(states)) == len(states), path, where, "a list of distinct state grid names", states)
    for grid in states:
        _expect(_STATE_GRID.fullmatch(grid) is not None, path, f"{where} name",
                "<key>.<state> (key l<k> or l<k>_reverse; state x, h, m, gates, candidate or c)", grid)


def _check_folded_norms(norms: Any, path: Path) -> None:
    """``folded_norms``: a mapping of module names, each norm to the convolution it was folded into (at most one
    norm per convolution)."""
    _expect(isinstance(norms, dict) and len(norms) > 0, path, "folded_norms", "a mapping of norm -> convolution", norms)
    for norm, conv in norms.items():
        for name in (norm, conv):
            _expect(isinstance(name, str) and _MODULE_NAME.fullmatch(name) is not None, path,
                    f"folded_norms[{norm!r:.80}]", "module names", name)
    _expect(len(set(norms.values())) == len(norms), path, "folded_norms", "one norm per convolution", norms)


def matrix_specs(info: dict[str, Any], scheme: LayerScheme) -> dict[str, QuantSpec]:
    """The weight spec of each of a validated layer entry's keys: ``weight``, or each of its ``matrices``,
    on its own ``matrix_specs`` entry or else the scheme's weight spec."""
    own = info.get("matrix_specs", {})
    return {key: QuantSpec.from_dict(own[key]) if key in own else scheme.weight
            for key in info.get("matrices") or ("weight",)}


def _check_layer(name: str, info: Any, path: Path) -> LayerScheme:
    where = f"layer {name!r}"
    _expect(isinstance(info, dict), path, where, "a mapping", info)
    unknown = sorted(set(info) - _LAYER_KEYS)
    _expect(not unknown, path, f"{where} field(s) {unknown}", f"among {sorted(_LAYER_KEYS)}", unknown)
    _expect(isinstance(info.get("type"), str), path, f"{where}.type", "a layer class name", info.get("type"))
    shape = info.get("shape")
    _expect(isinstance(shape, list) and 1 <= len(shape) <= 5 and all(_is_int(d) and 0 < d < 2**31 for d in shape),
            path, f"{where}.shape", "a list of 1 to 5 positive integers", shape)
    _expect(info.get("dtype") in _WEIGHT_DTYPES, path, f"{where}.dtype", f"one of {_WEIGHT_DTYPES}", info.get("dtype"))
    if "matrices" in info:
        _check_matrices(info["matrices"], shape, path, f"{where}.matrices")
    if "matrix_specs" in info:
        _check_matrix_specs(info, path, f"{where}.matrix_specs")
    rotation = info.get("input_rotation", 1)
    _expect(_is_int(rotation) and 1 <= rotation <= 2**20, path, f"{where}.input_rotation", "a positive integer", rotation)
    scheme = info.get("scheme")
    _expect(isinstance(scheme, dict), path, f"{where}.scheme", "a mapping", scheme)
    for key in ("activation_mode", "observer"):
        if key in scheme:
            _expect(isinstance(scheme[key], str), path, f"{where}.scheme.{key}", "a string", scheme[key])
    _check_spec_types(scheme.get("weight"), path, f"{where}.scheme.weight")
    if scheme.get("activation") is not None:
        _check_spec_types(scheme["activation"], path, f"{where}.scheme.activation")
    try:
        parsed = LayerScheme.from_dict(scheme)
    except SqueezerError as exc:
        raise ModelError(f"checkpoint manifest {path}: {where}.scheme: {exc}") from None
    static_recurrent = "matrices" in info and parsed.activation_mode == "static"
    _expect("states" in info or not static_recurrent, path, f"{where}.states",
            "the state grids of a recurrent layer with static activations", None)
    if "states" in info:
        _check_states(info, parsed, path, f"{where}.states")
    return parsed


def _check_kernels(kernels: Any, layers: dict[str, Any], path: Path) -> None:
    _expect(isinstance(kernels, dict), path, "kernels", "a mapping of layer -> kernel path(s)", kernels)
    for name, value in kernels.items():
        _expect(name in layers, path, f"kernels[{name!r}]", "a layer of the manifest", name)
        ok = isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))
        _expect(ok, path, f"kernels[{name!r}]", "a path name or a list of them", value)


def _check_example(example: Any, path: Path) -> None:
    """``example_inputs`` as :func:`squeezer.calibration.batch_signature` writes it, of bounded size."""
    where = "example_inputs"
    _expect(isinstance(example, dict) and example.get("kind") in _EXAMPLE_KINDS, path, f"{where}.kind",
            f"one of {_EXAMPLE_KINDS}", example.get("kind") if isinstance(example, dict) else example)
    inputs = example.get("inputs")
    _expect(isinstance(inputs, list) and 0 < len(inputs) <= 64, path, f"{where}.inputs", "a list of 1 to 64 inputs", inputs)
    for i, item in enumerate(inputs):
        _expect(isinstance(item, dict) and isinstance(item.get("name"), str) and item.get("dtype") in _EXAMPLE_DTYPES,
                path, f"{where}.inputs[{i}]", f"a name and a dtype among {_EXAMPLE_DTYPES}", item)
        shape = item.get("shape")
        _expect(isinstance(shape, list) and len(shape) <= 8 and all(_is_int(d) and 0 <= d for d in shape)
                and math.prod(shape) <= MAX_EXAMPLE_ELEMENTS, path, f"{where}.inputs[{i}].shape",
                f"at most 8 dimensions and {MAX_EXAMPLE_ELEMENTS} elements", shape)


def validate(manifest: Any, path: Path) -> dict[str, LayerScheme]:
    """Check ``manifest`` (parsed from ``path``) field by field; returns each layer's scheme."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ModelError(f"{path} is not a squeezer checkpoint manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ModelError(f"{path}: format version {manifest.get('format_version')!r:.40} is not supported "
                         f"(this squeezer reads version {FORMAT_VERSION})")
    for key in ("squeezer_version", "torch_version"):
        _expect(isinstance(manifest.get(key), str), path, key, "a string", manifest.get(key))
    _expect(isinstance(manifest.get("sha256"), str) and _HEX64.fullmatch(manifest["sha256"]) is not None, path,
            "sha256", "64 lowercase hex digits", manifest.get("sha256"))
    layers = manifest.get("layers")
    _expect(isinstance(layers, dict) and len(layers) > 0, path, "layers", "a non-empty mapping", layers)
    schemes = {name: _check_layer(name, info, path) for name, info in layers.items()}
    _check_kernels(manifest.get("kernels", {}), layers, path)
    if "folded_norms" in manifest:
        _check_folded_norms(manifest["folded_norms"], path)
    if "example_inputs" in manifest:
        _check_example(manifest["example_inputs"], path)
    if "model_factory" in manifest:
        _expect(isinstance(manifest["model_factory"], str), path, "model_factory", "a string", manifest["model_factory"])
    return schemes

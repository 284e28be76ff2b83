"""An export format's options: a dataclass whose fields carry a default and ``metadata={"help": ...}``.

:func:`build_options` makes one from keyword arguments (an unknown keyword is a :class:`ConfigError`
naming it and the valid ones); :func:`options_from_text` converts ``key=value`` strings (the command
line) to those keywords by each field's type; :func:`describe_options` lists the fields for help texts.
"""

from __future__ import annotations

import types
import typing
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any, Literal

from ..errors import ConfigError

_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def _check_known(format_name: str, options_type: type, keys: Any) -> None:
    valid = [f.name for f in fields(options_type)]
    unknown = sorted(set(keys) - set(valid))
    if unknown:
        raise ConfigError(f"option(s) {unknown} are not understood by the {format_name} export; it takes: {sorted(valid)}")


def build_options(format_name: str, options_type: type, given: dict[str, Any]) -> Any:
    """``options_type(**given)``, or :class:`ConfigError` naming the keywords it has no field for."""
    _check_known(format_name, options_type, given)
    return options_type(**given)


def _from_text(text: str, kind: Any, where: str) -> Any:
    """``text`` as a value of type ``kind`` (bool, int, float, str, Path, a Literal, or one of them | None)."""
    args = typing.get_args(kind)
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        if text.lower() == "none" and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _from_text(text, arg, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: cannot read {text!r} as {kind}")
    if typing.get_origin(kind) is Literal:  # the exporter checks the choice
        return type(args[0])(text)
    if kind is bool:
        if text.lower() not in _TRUE + _FALSE:
            raise ConfigError(f"{where}: expected true or false, got {text!r}")
        return text.lower() in _TRUE
    if kind in (int, float, str, Path):
        try:
            return kind(text)
        except ValueError:
            raise ConfigError(f"{where}: expected {kind.__name__}, got {text!r}") from None
    raise ConfigError(f"{where}: a {kind} value cannot be given as text")


def options_from_text(format_name: str, options_type: type, texts: dict[str, str]) -> dict[str, Any]:
    """``{"opset": "18"}`` -> ``{"opset": 18}`` by the types of ``options_type``'s fields."""
    _check_known(format_name, options_type, texts)
    hints = typing.get_type_hints(options_type)
    return {key: _from_text(text, hints[key], f"option {key!r} of the {format_name} export") for key, text in texts.items()}


def describe_options(options_type: type) -> list[str]:
    """``name=default: help`` for each field."""
    lines = []
    for f in fields(options_type):
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        lines.append(f"{f.name}={default}: {f.metadata.get('help', '')}")
    return lines

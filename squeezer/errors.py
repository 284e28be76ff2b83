"""Errors raised by squeezer. Every message names the culprit (flag, layer, file)."""

from __future__ import annotations

import reprlib

EXCERPT_CHARS = 80
"""The most characters of a user's value an error message quotes."""


def excerpt(value: object, limit: int = EXCERPT_CHARS) -> str:
    """``repr(value)`` cut to at most ``limit`` characters (``...`` marks the cut). Nested containers are
    shortened while they are written, so a huge (or alias-expanded) structure costs no more than its excerpt."""
    shortener = reprlib.Repr()
    shortener.maxlevel, shortener.maxstring, shortener.maxother, shortener.maxlong = 3, limit, limit, limit
    text = shortener.repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def one_line(text: object, limit: int = 200) -> str:
    """``str(text)`` (e.g. an underlying library's error) on one line, cut to at most ``limit`` characters."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[:limit - 3] + "..."


class SqueezerError(Exception):
    """Base class of every error squeezer raises on bad input. ``argument``: the keyword argument of the
    API that the message asks for as ``name=...`` (the command line renders it as its flag)."""

    def __init__(self, message: str = "", *, argument: str | None = None) -> None:
        super().__init__(message)
        self.argument = argument


class ConfigError(SqueezerError, ValueError):
    """A quantization spec, config, preset or CLI flag is invalid."""


class DataError(SqueezerError, ValueError):
    """Calibration data or model weights are empty, malformed, or not finite."""


class ModelError(SqueezerError, ValueError):
    """A model cannot be built, imported, or does not match the given weights."""

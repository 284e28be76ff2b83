"""Errors raised by squeezer. Every message names the culprit (flag, layer, file)."""

from __future__ import annotations


class SqueezerError(Exception):
    """Base class of every error squeezer raises on bad input."""


class ConfigError(SqueezerError, ValueError):
    """A quantization spec, config, preset or CLI flag is invalid."""


class DataError(SqueezerError, ValueError):
    """Calibration data or model weights are empty, malformed, or not finite."""


class ModelError(SqueezerError, ValueError):
    """A model cannot be built, imported, or does not match the given weights."""

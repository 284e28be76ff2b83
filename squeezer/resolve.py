"""`resolve_config`: what a user names (a preset, optionally with an algorithm suffix, a dict, a YAML path)
as a :class:`QuantConfig`.

It sits above :mod:`squeezer.algorithms` because a suffix names registered algorithms: ``"w4g128-gptq"``
is ``w4g128`` with GPTQ, ``"w8a8-smoothquant+gptq"`` a chain; an unknown one is a :class:`ConfigError`
naming the preset.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from .algorithms.base import algorithm_names
from .config import PRESETS, QuantConfig
from .errors import ConfigError, excerpt


def resolve_config(config: QuantConfig | str | dict[str, Any]) -> QuantConfig:
    """A preset name (``"w4g128"``, ``"w4g128-gptq"``), a dict, a YAML path or a :class:`QuantConfig` -> :class:`QuantConfig`."""
    if isinstance(config, QuantConfig):
        return config
    if isinstance(config, dict):
        return QuantConfig.from_dict(config)
    if isinstance(config, str):
        if config in PRESETS:
            return PRESETS[config]
        base, _, suffix = config.rpartition("-")
        if base in PRESETS and suffix:
            algorithm_names(suffix, where=f"preset {excerpt(config)}")
            return replace(PRESETS[base], algorithm=suffix, name=config)
        if config.endswith((".yaml", ".yml")):
            return QuantConfig.from_yaml(config)
        raise ConfigError(f"unknown preset {excerpt(config)}; valid presets: {', '.join(PRESETS)}")
    raise ConfigError(f"config must be a preset name, dict, YAML path or QuantConfig, got {type(config).__name__}")

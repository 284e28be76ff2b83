"""Build a user's model from ``pkg.module:factory`` and load float weights into it."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import torch
from torch import nn

from ..errors import DataError, ModelError


def load_factory(spec: str) -> nn.Module:
    """Import ``pkg.module:factory`` (the current directory is importable) and call it."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ModelError(f"--model must look like pkg.module:factory, got {spec!r}")
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any import failure is the user's module
        raise ModelError(f"cannot import model module {module_name!r}: {type(exc).__name__}: {exc}") from None
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        raise ModelError(f"model factory {spec!r}: {module_name} has no callable {attr!r}")
    try:
        model = factory()
    except Exception as exc:  # noqa: BLE001
        raise ModelError(f"model factory {spec!r} failed: {type(exc).__name__}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise ModelError(f"model factory {spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a float ``.safetensors`` state dict; names and shapes must match exactly."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ModelError(f"weights file {path} must be .safetensors (pickled checkpoints are not loaded)")
    try:
        state = load_file(str(path))
    except (OSError, SafetensorError) as exc:
        raise ModelError(f"cannot read weights file {path}: {exc}") from None
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(state)) if state[k].shape != own[k].shape]
    problems = [f"missing {missing[:5]}" if missing else "", f"unexpected {unexpected[:5]}" if unexpected else "",
                f"shape mismatch {shapes[:5]}" if shapes else ""]
    if any(problems):
        raise ModelError(f"weights file {path} does not match the model: " + "; ".join(p for p in problems if p))
    bad = [k for k, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise DataError(f"weights file {path}: tensor(s) {bad[:5]} contain NaN or Inf")
    model.load_state_dict(state)

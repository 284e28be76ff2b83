"""A user's code named on the command line: build the model from ``pkg.module:factory``, load float
weights into it, and run a task metric ``pkg.module:fn`` on it."""

from __future__ import annotations

import importlib
import math
import sys
from numbers import Real
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import DataError, ModelError


def load_attribute(spec: str, flag: str = "--model") -> Callable[..., Any]:
    """Import the callable ``pkg.module:name`` (the current directory is importable)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ModelError(f"{flag} must look like pkg.module:function, got {spec!r}")
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any import failure is the user's module
        raise ModelError(f"{flag}: cannot import module {module_name!r}: {type(exc).__name__}: {exc}") from None
    target = getattr(module, attr, None)
    if target is None or not callable(target):
        raise ModelError(f"{flag} {spec!r}: {module_name} has no callable {attr!r}")
    return target


def load_factory(spec: str) -> nn.Module:
    """Import ``pkg.module:factory`` and call it; the result must be an ``nn.Module``."""
    factory = load_attribute(spec)
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


def evaluate_user(fn: Callable[[nn.Module], Any], model: nn.Module, spec: str,
                  flag: str = "--eval") -> dict[str, float]:
    """``fn(model)`` in eval mode (mode restored after) as ``{name: value}``: ``fn`` returns a float
    (named ``"metric"``) or a dict of str -> float; every value must be finite."""
    was_training = model.training
    model.eval()
    try:
        value = fn(model)
    except Exception as exc:  # noqa: BLE001 - the user's function: name it
        raise ModelError(f"{flag} {spec!r} raised {type(exc).__name__}: {exc}") from None
    finally:
        model.train(was_training)
    scores = value if isinstance(value, dict) else {"metric": value}
    if not all(isinstance(k, str) and _is_real(v) for k, v in scores.items()):
        raise DataError(f"{flag} {spec!r} must return a float or a dict of str -> float, got {value!r:.200}")
    bad = {k: v for k, v in scores.items() if not math.isfinite(float(v))}
    if bad:
        raise DataError(f"{flag} {spec!r} returned non-finite values {bad}")
    return {k: float(v) for k, v in scores.items()}


def _is_real(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)

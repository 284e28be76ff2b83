"""Per-layer sensitivity: how much the model's output moves when one layer alone is quantized.

For every quantizable layer ``l`` and candidate format ``f`` the model runs the calibration batches
with ``l`` in format ``f`` and every other layer in float, and compares its outputs ``y_lf`` with
the float outputs ``y``:

* ``rel_mse[l][f] = sum ||y_lf - y||^2 / sum ||y||^2`` over all output elements;
* ``kl[l][f]``: mean over rows of ``KL(p(y) || p(y_lf))``, ``p = softmax`` over the last axis
  (a sigmoid Bernoulli for single-logit outputs);
* ``metric[l][f] = evaluate(model)`` when the user gives ``evaluate`` (their own metric).

A recurrent layer is several units, one per weight matrix (``lstm.weight_ih_l0``, ``lstm.weight_hh_l0``, ...):
each is measured alone (the layer simulates that matrix only, the others float), so an allocation may give
the matrices of one layer different formats.

Layers are quantized by the given algorithm (``rtn`` by default) from the same weights for every
format, so one quantized copy per format serves all layers. The result is cached on disk
(:func:`squeezer.cache.cache_dir` ``("sensitivity")`` by default) under a
key made of the model's weights, the calibration data, the formats and the algorithm, so a
second search on the same model and data skips the measurement.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from ..api import quantize
from ..cache import CacheDir, read_entry, resolve, write_entry
from ..calibration import Batch, check_batches, run_batches
from ..config import QuantConfig
from ..errors import ConfigError, DataError
from ..modules import QuantRecurrent, quant_layers, set_mode
from ..version import __version__
from .formats import (
    DEFAULT_FORMATS,
    FLOAT,
    check_formats,
    format_bits,
    format_bytes,
    format_config,
)
from .hessian import hessian_sensitivity

SCORES = ("rel_mse", "kl", "metric", "hessian")


@dataclass
class Sensitivity:
    """Measured sensitivities plus what an allocation needs per layer (all keyed by layer name).

    ``bytes[l][f]``: packed weight bytes; ``bits[l][f]``: code width; ``macs[l]``: multiply-adds per
    calibration batch row; ``fixed_bytes``: every parameter and buffer outside the candidate weights.
    ``baseline``: ``evaluate(float model)`` when given; ``metric`` scores are drops from it.
    """

    layers: list[str]
    formats: list[str]
    algorithm: str
    params: dict[str, int]
    bytes: dict[str, dict[str, int]]
    bits: dict[str, dict[str, int]]
    macs: dict[str, float]
    fixed_bytes: int
    rel_mse: dict[str, dict[str, float]]
    kl: dict[str, dict[str, float]]
    metric: dict[str, dict[str, float]] | None = None
    hessian: dict[str, dict[str, float]] | None = None
    baseline: float | None = None
    key: str = ""
    seconds: float = 0.0
    from_cache: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def scores(self, kind: str = "rel_mse") -> dict[str, dict[str, float]]:
        """``{layer: {format: score}}`` of one kind (``rel_mse``, ``kl``, ``metric``, ``hessian``)."""
        if kind not in SCORES:
            raise ConfigError(f"unknown sensitivity score {kind!r}; valid: {', '.join(SCORES)}")
        table = getattr(self, kind)
        if table is None:
            raise ConfigError(f"sensitivity score {kind!r} was not measured "
                              f"({'pass evaluate=...' if kind == 'metric' else 'pass hessian=True'})")
        return table

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Sensitivity:
        return cls(**data)


def _fingerprint(model: nn.Module, batches: list[Batch], parts: dict[str, Any]) -> str:
    """SHA-256 over the state dict (names, dtypes, shapes, bytes), the batches and ``parts``."""
    h = hashlib.sha256(json.dumps({**parts, "version": __version__}, sort_keys=True).encode())

    def feed(t: Tensor) -> None:
        t = t.detach().contiguous().cpu()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")

    for name, value in model.state_dict().items():
        h.update(name.encode())
        feed(value)
    for batch in batches:
        items = batch.items() if isinstance(batch, dict) else enumerate(batch if isinstance(batch, (tuple, list)) else [batch])
        for key, t in items:
            h.update(str(key).encode())
            feed(t)
    return h.hexdigest()[:32]


def _divergence(ref: Tensor, out: Tensor) -> tuple[float, float]:
    """Summed ``||out - ref||^2`` and summed row KL of the output distributions."""
    ref, out = ref.float(), out.float()
    sq = float((out - ref).pow(2).sum())
    if ref.dim() == 0 or ref.shape[-1] == 1 or ref.dim() == 1:
        p, q = torch.sigmoid(ref).clamp(1e-7, 1 - 1e-7), torch.sigmoid(out).clamp(1e-7, 1 - 1e-7)
        kl = p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()
    else:
        kl = F.kl_div(F.log_softmax(out, -1), F.log_softmax(ref, -1), log_target=True, reduction="none").sum(-1)
    return sq, float(kl.sum())


def _compare(reference: list[list[Tensor]], outputs: list[list[Tensor]]) -> tuple[float, float]:
    sq = norm = kl = rows = 0.0
    for ref_batch, out_batch in zip(reference, outputs):
        for ref, out in zip(ref_batch, out_batch):
            s, k = _divergence(ref, out)
            sq, kl = sq + s, kl + k
            norm += float(ref.float().pow(2).sum())
            rows += ref.numel() / max(ref.shape[-1], 1) if ref.dim() > 1 else ref.numel()
    return sq / max(norm, 1e-30), kl / max(rows, 1)


MATRIX_UNIT = re.compile(r"^(.+)\.(weight_(?:ih|hh|hr)_l\d+(?:_reverse)?)$")
"""The name of a recurrent matrix unit, ``<layer>.<matrix>``."""


def split_unit(unit: str) -> tuple[str, str | None]:
    """``(layer, matrix)`` of a unit name: ``("lstm", "weight_hh_l0")``, or ``(unit, None)`` for a whole layer."""
    hit = MATRIX_UNIT.match(unit)
    return (hit.group(1), hit.group(2)) if hit else (unit, None)


def units(probe: nn.Module) -> dict[str, tuple[str, str | None]]:
    """The search's units of a quantized model: unit name -> ``(layer, matrix)``; a layer is one unit
    (``matrix`` None), a recurrent layer one unit per weight matrix, named ``<layer>.<matrix>``."""
    out: dict[str, tuple[str, str | None]] = {}
    for name, layer in quant_layers(probe).items():
        if isinstance(layer, QuantRecurrent):
            out.update({f"{name}.{m}": (name, m) for m in layer.matrix_names})
        else:
            out[name] = (name, None)
    return out


def _unit_weight(modules: dict[str, nn.Module], unit: tuple[str, str | None]) -> Tensor:
    layer, matrix = unit
    return getattr(modules[layer], matrix or "weight")


def _recurrent_steps(args: tuple) -> tuple[float, int]:
    """``(steps, rows)`` of a recurrent layer's input: time steps of all sequences, and sequences."""
    x = args[0]
    if isinstance(x, PackedSequence):
        return float(x.data.shape[0]), int(x.batch_sizes[0])
    return float(x.numel() // x.shape[-1]), 1 if x.dim() == 2 else x.shape[0]


def _macs_per_row(model: nn.Module, names: dict[str, tuple[str, str | None]], batch: Batch) -> dict[str, float]:
    """Multiply-adds of each unit per batch row, from the output shapes of one float pass:
    Linear ``numel(y) * in``, Conv ``numel(y) * in / groups * prod(kernel)``, Embedding 0, a recurrent matrix
    ``numel(W)`` per time step."""
    macs: dict[str, float] = {}
    hooks = []

    def hook(name: str):
        def record(module: nn.Module, args: tuple, out: Tensor) -> None:
            rows = args[0].shape[0] if args and isinstance(args[0], Tensor) and args[0].dim() else 1
            if isinstance(module, nn.Embedding):
                macs[name] = 0.0
                return
            if isinstance(module, nn.RNNBase):
                steps, rows = _recurrent_steps(args)
                for unit, (layer, matrix) in names.items():
                    if layer == name:
                        macs[unit] = steps * getattr(module, matrix).numel() / max(rows, 1)
                return
            w = module.weight
            per_out = w[0].numel()
            macs[name] = out.numel() * per_out / max(rows, 1)
        return record

    modules = dict(model.named_modules())
    for name in dict.fromkeys(layer for layer, _ in names.values()):
        hooks.append(modules[name].register_forward_hook(hook(name)))
    try:
        run_batches(model, [batch], "measuring shapes", progress=False)
    finally:
        for h in hooks:
            h.remove()
    return {name: macs.get(name, 0.0) for name in names}


def _evaluate(evaluate: Callable[[nn.Module], float], model: nn.Module, what: str) -> float:
    """``evaluate(model)`` with the model in eval mode (restored after); errors name ``what``."""
    was_training = model.training
    model.eval()
    try:
        value = float(evaluate(model))
    except Exception as exc:  # the user's function: name it and what it was doing
        raise DataError(f"the evaluate function raised {type(exc).__name__} on {what}: {exc}") from exc
    finally:
        model.train(was_training)
    if not math.isfinite(value):
        raise DataError(f"the evaluate function returned {value} on {what}: it must return a finite number")
    return value


def measure_sensitivity(
    model: nn.Module,
    calib: Iterable[Batch],
    formats: tuple[str, ...] | list[str] = DEFAULT_FORMATS,
    *,
    config: QuantConfig | None = None,
    algorithm: str = "rtn",
    evaluate: Callable[[nn.Module], float] | None = None,
    hessian: bool = False,
    cache_dir: CacheDir = True,
    progress: bool = True,
) -> Sensitivity:
    """Measure (or load from ``cache_dir``) each layer's sensitivity to each format.

    ``config`` selects the candidate layers (its layer types / include / ignore; default: every
    supported layer); ``cache_dir``: ``True`` = :func:`squeezer.cache.cache_dir` ``("sensitivity")``
    (``$SQUEEZER_CACHE_DIR``, read at this call), a path = that directory, ``None`` = no cache. ``hessian=True`` adds the
    Hutchinson proxy of :mod:`squeezer.search.hessian`.
    """
    formats = check_formats(formats)
    batches = check_batches(calib)
    selector = config or QuantConfig()
    started = time.perf_counter()
    key = _fingerprint(model, batches, {"formats": formats, "algorithm": algorithm, "select": selector.to_dict(),
                                         "evaluate": evaluate is not None, "hessian": hessian})
    directory = resolve("sensitivity", cache_dir)
    stored = None if directory is None else read_entry(directory, key)
    if stored is not None:
        try:
            sens = Sensitivity.from_dict(stored)
            sens.from_cache, sens.seconds = True, time.perf_counter() - started
            return sens
        except TypeError:
            pass  # a damaged cache entry is measured again and overwritten

    was_training = model.training
    model.eval()
    probe = quantize(model, selector, progress=False)
    set_mode(probe, "float")  # the float function, on the layers as quantize names them (attention unfused)
    unit_of = units(probe)
    names = list(unit_of)
    if not names:
        raise ConfigError("no quantizable layer selected: nothing to allocate")
    modules = dict(probe.named_modules())
    weights = {n: _unit_weight(modules, unit) for n, unit in unit_of.items()}
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    total += sum(b.numel() * b.element_size() for b in model.buffers())
    fixed = total - sum(w.numel() * w.element_size() for w in weights.values())
    reference = run_batches(model, batches, "float reference", progress)
    baseline = None if evaluate is None else _evaluate(evaluate, model, "the float model")
    table: dict[str, dict[str, dict[str, float]]] = {k: {n: {} for n in names} for k in ("rel_mse", "kl", "metric")}
    for fmt in formats:
        if fmt == FLOAT:
            for n in names:
                table["rel_mse"][n][fmt] = table["kl"][n][fmt] = table["metric"][n][fmt] = 0.0
            continue
        base = format_config(fmt)
        cfg = replace(selector, weight=base.weight, activation=base.activation, activation_mode=base.activation_mode,
                      observer=base.observer, algorithm=algorithm, name=fmt)
        needs = cfg.activation_mode == "static" or algorithm != "rtn"
        q = quantize(model, cfg, batches if needs else None, progress=False)
        layers = quant_layers(q)
        for n in names:
            set_mode(q, "float")
            layer, matrix = unit_of[n]
            layers[layer].mode = "simulate"
            if matrix is not None:
                layers[layer].simulated_matrices = frozenset({matrix})
            outputs = run_batches(q, batches, f"{fmt}: {n}", progress)
            if matrix is not None:
                layers[layer].simulated_matrices = None
            table["rel_mse"][n][fmt], table["kl"][n][fmt] = _compare(reference, outputs)
            if evaluate is not None:
                table["metric"][n][fmt] = baseline - _evaluate(evaluate, q, f"layer {n!r} in {fmt}")
        del q
    model.train(was_training)
    sens = Sensitivity(
        layers=names, formats=list(formats), algorithm=algorithm,
        params={n: w.numel() for n, w in weights.items()},
        bytes={n: {f: format_bytes(f, w) for f in formats} for n, w in weights.items()},
        bits={n: {f: format_bits(f, w) for f in formats} for n, w in weights.items()},
        macs=_macs_per_row(probe, unit_of, batches[0]), fixed_bytes=fixed,
        rel_mse=table["rel_mse"], kl=table["kl"], metric=table["metric"] if evaluate is not None else None,
        baseline=baseline, key=key,
    )
    if hessian:
        sens.hessian = hessian_sensitivity(probe, batches, names, formats)
    sens.seconds = time.perf_counter() - started
    if directory is not None:
        write_entry(directory, key, _finite_table(sens.to_dict()))
    return sens


def _finite_table(data: Any) -> Any:
    """Non-finite floats (a diverged layer) become a large number: JSON has no inf."""
    if isinstance(data, float) and not math.isfinite(data):
        return 1e30
    if isinstance(data, dict):
        return {k: _finite_table(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_finite_table(v) for v in data]
    return data

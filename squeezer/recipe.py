"""Recipes: an ordered list of compression steps, and `squeezer.compress` that runs them.

A recipe is a list of one-key mappings (YAML or Python), each ``{step: options}``:

* ``prune``: ``kind`` = ``unstructured`` (per layer) | ``global`` | ``nm`` (``n``, ``m``) |
  ``structured`` (whole output channels, ``sparsity`` = fraction removed, ``norm``) |
  ``features`` (input columns, ``sparsity`` = fraction dropped; the model keeps taking full rows) |
  ``heads`` (whole attention heads, ``sparsity`` = fraction removed, ``norm`` (default l2),
  ``scope`` = layer | global, ``min_heads``; see :mod:`squeezer.prune.heads`);
  ``steps`` > 1 with ``finetune_epochs``: gradual cubic schedule with fine-tuning in between.
* ``lowrank``: SVD factorisation, ``energy`` or ``budget`` (+ ``min_params``, include / ignore).
* ``quantize``: ``preset`` or ``config`` (a :class:`QuantConfig` dict); calibration = the inputs of
  the data batches.
* ``qat``: ``preset`` / ``config``, ``epochs``, ``lr``, ``lam`` (``L = L_task + lam E_quant``),
  ``learnable_scales``.
* ``distill``: from the model as it was before the recipe (the teacher), ``epochs``, ``alpha``,
  ``temperature``, ``lr``, ``cache_teacher`` (true: the teacher runs once per batch; data a list).
* ``finetune``: ``epochs``, ``lr`` (pruning masks keep pruned weights at zero).

``include`` / ``ignore`` regexes restrict prune / lowrank / quantize steps to layers by name.
Every step appends a row (params, non-zero params, bytes, metric, seconds) to the report.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from .errors import ConfigError, DataError
from .modules import quant_layers

Step = tuple[str, dict[str, Any]]

OPTIONS: dict[str, set[str]] = {
    "prune": {"kind", "sparsity", "n", "m", "norm", "scope", "min_heads", "steps", "finetune_epochs", "lr", "include",
              "ignore"},
    "lowrank": {"energy", "budget", "min_params", "include", "ignore"},
    "quantize": {"preset", "config", "include", "ignore"},
    "qat": {"preset", "config", "epochs", "lr", "lam", "learnable_scales"},
    "distill": {"epochs", "alpha", "temperature", "lr", "cache_teacher"},
    "finetune": {"epochs", "lr"},
}
TRAINING_STEPS = {"qat", "distill", "finetune"}


def bundled_recipes() -> list[str]:
    """Names of the recipes shipped in ``squeezer/recipes`` (``squeezer.compress(model, name)``)."""
    return sorted(p.name.removesuffix(".yaml") for p in resources.files("squeezer.recipes").iterdir()
                  if p.name.endswith(".yaml"))


def load_recipe(recipe: str | Path | list[dict[str, Any]]) -> list[Step]:
    """Parse a bundled recipe name, a YAML file or a list of one-key mappings; errors name the step."""
    if isinstance(recipe, (str, Path)):
        name = str(recipe)
        if name in bundled_recipes():
            text = resources.files("squeezer.recipes").joinpath(f"{name}.yaml").read_text()
        else:
            try:
                text = Path(recipe).read_text()
            except OSError as exc:
                raise ConfigError(f"recipe {name!r} is neither a bundled recipe ({', '.join(bundled_recipes())}) "
                                  f"nor a readable file: {exc.strerror or exc}") from None
        try:
            recipe = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"recipe {name}: invalid YAML: {exc}") from None
    if not isinstance(recipe, list) or not recipe:
        raise ConfigError("a recipe must be a non-empty list of steps such as [{prune: {...}}, {quantize: {...}}]")
    steps: list[Step] = []
    for i, item in enumerate(recipe):
        if not isinstance(item, dict) or len(item) != 1:
            raise ConfigError(f"recipe step {i}: must be a mapping with one key (the step name), got {item!r}")
        (kind, options), = item.items()
        if kind not in OPTIONS:
            raise ConfigError(f"recipe step {i}: unknown step {kind!r}; valid steps: {', '.join(OPTIONS)}")
        options = {} if options is None else options
        if not isinstance(options, dict):
            raise ConfigError(f"recipe step {i} ({kind}): options must be a mapping, got {type(options).__name__}")
        unknown = sorted(set(options) - OPTIONS[kind])
        if unknown:
            raise ConfigError(f"recipe step {i} ({kind}): unknown option(s) {unknown}; valid: {sorted(OPTIONS[kind])}")
        steps.append((kind, dict(options)))
    return steps


@dataclass
class StepRow:
    """The model after one step."""

    step: str
    options: dict[str, Any]
    params: int
    nonzero_params: int
    bytes: int
    metric: float | None
    seconds: float
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class CompressionReport:
    rows: list[StepRow] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"rows": [asdict(r) for r in self.rows]}


def model_size(model: nn.Module) -> tuple[int, int, int]:
    """``(params, non-zero params, bytes)``: quantized layers count their packed weights; pruning
    masks count in non-zero params (dense storage: bytes do not shrink with unstructured sparsity)."""
    qlayers = quant_layers(model)
    packed = {f"{name}.weight": layer.weight_qtensor() for name, layer in qlayers.items()}
    params = nonzero = size = 0
    masked = ".parametrizations.weight.original"
    for name, p in model.named_parameters():
        key = name.replace(masked, ".weight")
        effective = model.get_submodule(name.removesuffix(masked)).weight if name.endswith(masked) else p
        params += p.numel()
        nonzero += int((effective != 0).sum())
        size += packed[key].nbytes() if key in packed else p.numel() * p.element_size()
    for name, qt in packed.items():
        if name not in dict(model.named_parameters()):  # packed layers: float weight freed
            params += qt.codes.numel()
            nonzero += int((qt.dequantize() != 0).sum())
            size += qt.nbytes()
    return params, nonzero, size


def _select(options: dict[str, Any]) -> dict[str, Any]:
    return {k: options[k] for k in ("include", "ignore") if k in options}


def _calib(data: list[Any]) -> list[Any]:
    from .training import split_batch

    return [split_batch(b, i)[0] for i, b in enumerate(data[:16])]


class _Runner:
    """Runs the steps of one recipe on one model, keeping the original as the teacher."""

    def __init__(self, data: list[Any] | None, loss_fn: Callable | None, teacher: nn.Module) -> None:
        self.data, self.loss_fn, self.teacher = data, loss_fn, teacher

    def _fit(self, model: nn.Module, epochs: int, lr: float) -> dict[str, Any]:
        from .training import fit

        history = fit(model, self.data, epochs=epochs, lr=lr, loss_fn=self.loss_fn)
        return {"final_loss": history[-1]["loss"]}

    def prune(self, model: nn.Module, o: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
        from . import prune as P

        kind, sparsity = o.get("kind", "unstructured"), o.get("sparsity", 0.5)
        steps = int(o.get("steps", 1))
        if steps > 1:
            if kind not in ("unstructured", "global"):
                raise ConfigError(f"prune: gradual steps apply to unstructured / global pruning, not {kind!r}")
            self._need_data("prune (gradual)")
            report = P.gradual_prune(model, sparsity, steps, lambda m: self._fit(m, int(o.get("finetune_epochs", 1)),
                                                                                    float(o.get("lr", 1e-3))),
                                     scope="global" if kind == "global" else "layer", **_select(o))
            return model, report.to_dict()
        if kind in ("unstructured", "global"):
            report = P.magnitude_prune(model, sparsity, scope="layer" if kind == "unstructured" else "global", **_select(o))
        elif kind == "nm":
            report = P.nm_prune(model, int(o.get("n", 2)), int(o.get("m", 4)), **_select(o))
        elif kind == "structured":
            report = P.prune_channels(model, sparsity, norm=o.get("norm", "l1"), **_select(o))
        elif kind == "features":
            report = P.prune_features(model, sparsity, norm=o.get("norm", "l2"))
            return P.SelectColumns(model, report.kept), asdict(report)
        elif kind == "heads":
            report = P.prune_heads(model, sparsity, norm=o.get("norm", "l2"), scope=o.get("scope", "layer"),
                                   min_heads=o.get("min_heads", 1), **_select(o))
        else:
            raise ConfigError(f"prune: unknown kind {kind!r}; valid: unstructured, global, nm, structured, features, "
                              "heads")
        return model, report.to_dict()

    def lowrank(self, model: nn.Module, o: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
        from .lowrank import low_rank

        report = low_rank(model, energy=o.get("energy"), budget=o.get("budget"),
                          min_params=int(o.get("min_params", 0)), **_select(o))
        return model, report.to_dict()

    def _config(self, o: dict[str, Any], step: str) -> Any:
        from .config import QuantConfig, resolve_config

        if ("preset" in o) == ("config" in o):
            raise ConfigError(f"{step}: give exactly one of 'preset' and 'config'")
        cfg = resolve_config(o["preset"] if "preset" in o else QuantConfig.from_dict(o["config"]))
        return replace(cfg, **_select(o)) if _select(o) else cfg

    def quantize(self, model: nn.Module, o: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
        from .api import quantize
        from .prune import remove_masks

        remove_masks(model)
        q = quantize(model, self._config(o, "quantize"), calib=_calib(self.data) if self.data else None, progress=False)
        summary = q.squeezer_report.to_dict()["summary"]
        return q, {k: summary[k] for k in ("quantized_layers", "weight_compression", "bits_per_weight")}

    def qat(self, model: nn.Module, o: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
        from .prune import remove_masks
        from .qat import convert, prepare_qat, qat_loss
        from .training import fit, infer_loss

        self._need_data("qat")
        remove_masks(model)
        q = prepare_qat(model, self._config(o, "qat"), calib=_calib(self.data),
                        learnable_scales=bool(o.get("learnable_scales", False)))
        lam, task = float(o.get("lam", 0.0)), self.loss_fn

        def loss(outputs: Any, targets: Any) -> dict[str, Any]:
            nonlocal task
            task = task or infer_loss(outputs, targets)
            return qat_loss(task(outputs, targets), q, lam)._asdict()

        history = fit(q, self.data, epochs=int(o.get("epochs", 1)), lr=float(o.get("lr", 1e-4)), loss_fn=loss)
        return convert(q), {"final_loss": history[-1]["loss"], "final_quant_error": history[-1].get("quant")}

    def distill(self, model: nn.Module, o: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
        from .distill import distill

        self._need_data("distill")
        cache = o.get("cache_teacher", False)
        if not isinstance(cache, bool):
            raise ConfigError(f"recipe step distill: cache_teacher must be true or false, got {cache!r}")
        history = distill(model, self.teacher, self.data, epochs=int(o.get("epochs", 1)), alpha=float(o.get("alpha", 0.5)),
                          temperature=float(o.get("temperature", 4.0)), lr=float(o.get("lr", 1e-3)), loss_fn=self.loss_fn,
                          cache_teacher=cache)
        return model, {"final_loss": history[-1]["loss"]}

    def finetune(self, model: nn.Module, o: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
        self._need_data("finetune")
        return model, self._fit(model, int(o.get("epochs", 1)), float(o.get("lr", 1e-3)))

    def _need_data(self, step: str) -> None:
        if not self.data:
            raise DataError(f"recipe step {step} trains the model: pass data=[(inputs, targets), ...]")


def compress(
    model: nn.Module,
    recipe: str | Path | list[dict[str, Any]],
    data: Iterable[Any] | None = None,
    evaluate: Callable[[nn.Module], float] | None = None,
    *,
    loss_fn: Callable | None = None,
    inplace: bool = False,
) -> nn.Module:
    """Run ``recipe`` on ``model`` (a copy unless ``inplace``); returns the compressed model with
    ``.squeezer_compression`` (a :class:`CompressionReport`, a row per step after the baseline).

    ``data``: re-iterable ``(inputs, targets)`` batches (training steps and calibration);
    ``evaluate(model) -> float``: the metric recorded after every step; ``loss_fn`` is inferred
    from the targets when None (classification / regression).
    """
    steps = load_recipe(recipe)
    batches = None if data is None else list(data)
    missing = [kind for kind, _ in steps if kind in TRAINING_STEPS] if not batches else []
    if missing:
        raise DataError(f"recipe step(s) {missing} train the model: pass data=[(inputs, targets), ...]")
    teacher = copy.deepcopy(model).eval()
    if not inplace:
        model = copy.deepcopy(model)
    runner = _Runner(batches, loss_fn, teacher)
    report = CompressionReport()

    def record(step: str, options: dict[str, Any], seconds: float, details: dict[str, Any]) -> None:
        model.eval()
        params, nonzero, size = model_size(model)
        metric = None if evaluate is None else float(evaluate(model))
        report.rows.append(StepRow(step, options, params, nonzero, size, metric, seconds, details))

    record("baseline", {}, 0.0, {})
    for i, (kind, options) in enumerate(steps):
        start = time.perf_counter()
        model, details = getattr(runner, kind)(model, options)
        record(kind, options, time.perf_counter() - start, details)
    model.squeezer_compression = report
    return model

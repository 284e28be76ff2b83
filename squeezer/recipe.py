"""Recipes: a versioned list of typed steps (:mod:`squeezer.steps`), and `squeezer.compress`.

A recipe is written in YAML (or Python) as ``{version: 1, steps: [{step: options}, ...]}``; a
bare list of steps is read as version 1 (the format before recipes carried a version), and a
version newer than :data:`RECIPE_VERSION` is refused. :meth:`Recipe.to_yaml` writes the
versioned form, with each step's options that differ from the defaults. Every step of
:func:`compress` appends a row (params, non-zero params, bytes, metric, seconds) to its
:class:`CompressionReport`; the compressed model follows the rules of :mod:`squeezer.transform`
(a copy unless ``inplace=True``; ``squeezer.report_of(model)`` is the report).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from .errors import ConfigError, DataError, excerpt
from .modules import quant_layers
from .safe_yaml import load_yaml
from .steps import Context, Step, parse_step
from .transform import attach_report, working_copy

RECIPE_VERSION = 1
"""The recipe format this squeezer reads and writes."""
_NOT_A_LIST = "a recipe must be a non-empty list of steps such as [{prune: {...}}, {quantize: {...}}]"


@dataclass
class Recipe:
    """The ordered typed steps of a recipe and the format version it was written in."""

    steps: list[Step]
    version: int = RECIPE_VERSION

    def __post_init__(self) -> None:
        if isinstance(self.version, bool) or not isinstance(self.version, int) or not 1 <= self.version <= RECIPE_VERSION:
            raise ConfigError(f"recipe version must be an integer from 1 to {RECIPE_VERSION} (this squeezer's), "
                              f"got {excerpt(self.version)}")
        if not self.steps:
            raise ConfigError(_NOT_A_LIST)

    def __len__(self) -> int:
        return len(self.steps)

    @classmethod
    def from_list(cls, items: Any, version: Any = RECIPE_VERSION) -> Recipe:
        """Steps from a list of one-key mappings ``{step: options}`` (or typed steps)."""
        if not isinstance(items, list):
            raise ConfigError(_NOT_A_LIST)
        return cls([parse_step(item, i) for i, item in enumerate(items)], version)

    @classmethod
    def from_yaml(cls, text: str, source: str = "recipe") -> Recipe:
        """Parse YAML text: ``{version, steps}`` or a bare list of steps (version 1)."""
        doc = load_yaml(text, source)
        if isinstance(doc, dict):
            if set(doc) - {"version", "steps"} or "version" not in doc:
                raise ConfigError(f"{source}: a recipe mapping has the keys version and steps, "
                                  f"got {excerpt(sorted(map(str, doc)))}")
            return cls.from_list(doc.get("steps"), doc["version"])
        return cls.from_list(doc)

    def to_list(self) -> list[dict[str, dict[str, Any]]]:
        return [s.to_dict() for s in self.steps]

    def to_yaml(self) -> str:
        return yaml.safe_dump({"version": self.version, "steps": self.to_list()}, sort_keys=False)


def bundled_recipes() -> list[str]:
    """Names of the recipes shipped in ``squeezer/recipes`` (``squeezer.compress(model, name)``)."""
    return sorted(p.name.removesuffix(".yaml") for p in resources.files("squeezer.recipes").iterdir()
                  if p.name.endswith(".yaml"))


def load_recipe(recipe: str | Path | list[Any] | Recipe) -> Recipe:
    """A bundled recipe name, a YAML file, a list of steps or a :class:`Recipe` -> :class:`Recipe`."""
    if isinstance(recipe, Recipe):
        return recipe
    if not isinstance(recipe, (str, Path)):
        return Recipe.from_list(recipe)
    name = str(recipe)
    if name in bundled_recipes():
        return Recipe.from_yaml(resources.files("squeezer.recipes").joinpath(f"{name}.yaml").read_text(), name)
    try:
        text = Path(recipe).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"recipe {name!r} is neither a bundled recipe ({', '.join(bundled_recipes())}) "
                          f"nor a readable file: {getattr(exc, 'strerror', None) or exc}") from None
    return Recipe.from_yaml(text, f"recipe {name}")


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
    packed = {f"{name}.{key}": qt for name, layer in qlayers.items() for key, qt in layer.weight_qtensors().items()}
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


def compress(
    model: nn.Module,
    recipe: str | Path | list[Any] | Recipe,
    data: Iterable[Any] | None = None,
    evaluate: Callable[[nn.Module], float] | None = None,
    *,
    loss_fn: Callable | None = None,
    inplace: bool = False,
) -> nn.Module:
    """Run ``recipe`` on ``model`` (a copy unless ``inplace``); returns the compressed model carrying
    its :class:`CompressionReport` (a row per step after the baseline) and the reports of the steps.

    ``data``: re-iterable ``(inputs, targets)`` batches (training steps and calibration);
    ``evaluate(model) -> float``: the metric recorded after every step; ``loss_fn`` is inferred
    from the targets when None (classification / regression).
    """
    plan = load_recipe(recipe)
    batches = None if data is None else list(data)
    missing = [s.name for s in plan.steps if s.trains] if not batches else []
    if missing:
        raise DataError(f"recipe step(s) {missing} train the model: pass data=[(inputs, targets), ...]")
    context = Context(batches, loss_fn, copy.deepcopy(model).eval())
    model = working_copy(model, inplace)
    report = CompressionReport()

    def record(step: str, options: dict[str, Any], seconds: float, details: dict[str, Any]) -> None:
        model.eval()
        params, nonzero, size = model_size(model)
        metric = None if evaluate is None else float(evaluate(model))
        report.rows.append(StepRow(step, options, params, nonzero, size, metric, seconds, details))

    record("baseline", {}, 0.0, {})
    for step in plan.steps:
        start = time.perf_counter()
        model, details = step.run(model, context)
        record(step.name, step.options(), time.perf_counter() - start, details)
    return attach_report(model, report)

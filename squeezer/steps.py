"""Typed recipe steps: one frozen dataclass per kind of step, validated on construction.

=============  ==========================================================================
step           fields (defaults)
=============  ==========================================================================
``prune``      ``kind``: unstructured (per layer) | global | nm (``n``:``m``) | structured (whole
               output channels, ``norm`` l1) | features (input columns; the model keeps taking
               full rows) | heads (attention heads, ``scope``, ``min_heads``, ``norm`` l2);
               ``sparsity`` (0.5) = fraction removed; ``steps`` > 1: gradual cubic schedule with
               ``finetune_epochs`` at ``lr`` in between (unstructured / global)
``lowrank``    SVD factorisation: exactly one of ``energy`` and ``budget``; ``min_params``
``quantize``   exactly one of ``preset`` and ``config`` (a :class:`QuantConfig` dict); ``algorithm``:
               the same spelling as a preset suffix (``"smoothquant+gptq"``) or a list of
               algorithm steps (``[smoothquant, {gptq: {act_order: true}}]``)
``qat``        as ``quantize``, plus ``epochs``, ``lr``, ``lam`` (``L = L_task + lam E_quant``),
               ``learnable_scales``
``distill``    from the model as it was before the recipe (the teacher): ``epochs``, ``alpha``,
               ``temperature``, ``lr``, ``cache_teacher`` (the teacher runs once per batch)
``finetune``   ``epochs``, ``lr`` (pruning masks keep pruned weights at zero)
=============  ==========================================================================

``include`` / ``ignore`` regexes restrict prune / lowrank / quantize steps to layers by name.
Errors name the step and the field (``"distill: cache_teacher must be true or false"``).
``step.run(model, context)`` changes ``model`` in place (``compress`` works on its own copy) and
returns the model and the step's figures for the report.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, dataclass, fields, replace
from typing import Any, ClassVar

from torch import nn

from . import prune as P
from .algorithms.base import algorithm_spelling, make_algorithm, split_algorithms
from .api import quantize
from .config import QuantConfig
from .distill import distill
from .errors import ConfigError, DataError, excerpt
from .lowrank import low_rank
from .prune.magnitude import check_sparsity
from .qat import convert, prepare_qat, qat_loss
from .resolve import resolve_config
from .training import fit, infer_loss, split_batch
from .transform import report_of

Patterns = str | tuple[str, ...]


@dataclass(frozen=True)
class Context:
    """What the steps of one recipe share: training batches, the task loss, the teacher."""

    data: list[Any] | None
    loss_fn: Callable | None
    teacher: nn.Module

    def calib(self) -> list[Any] | None:
        """The inputs of the first 16 batches."""
        return None if not self.data else [split_batch(b, i)[0] for i, b in enumerate(self.data[:16])]

    def need_data(self, step: str) -> list[Any]:
        if not self.data:
            raise DataError(f"recipe step {step} trains the model: pass data=[(inputs, targets), ...]")
        return self.data

    def fit(self, model: nn.Module, epochs: int, lr: float) -> dict[str, Any]:
        history = fit(model, self.need_data("finetune"), epochs=epochs, lr=lr, loss_fn=self.loss_fn)
        return {"final_loss": history[-1]["loss"]}


class Step:
    """A recipe step: a frozen dataclass whose fields are the step's options."""

    name: ClassVar[str]
    trains: ClassVar[bool] = False

    def run(self, model: nn.Module, context: Context) -> tuple[nn.Module, dict[str, Any]]:
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        """The fields that differ from their defaults (tuples as lists): the step as written."""
        out = {}
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            default = f.default_factory() if f.default_factory is not MISSING else f.default
            if value != default:
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """``{name: options}``, the recipe-list form."""
        return {self.name: self.options()}

    def _fail(self, field_name: str, message: str) -> ConfigError:
        return ConfigError(f"{self.name}: {field_name} {message}")

    def _check_int(self, field_name: str, low: int) -> None:
        value = getattr(self, field_name)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise self._fail(field_name, f"must be an integer >= {low}, got {excerpt(value)}")

    def _check_number(self, field_name: str, low: float = 0.0, high: float | None = None) -> None:
        value = getattr(self, field_name)
        if (isinstance(value, bool) or not isinstance(value, (int, float)) or value < low
                or (high is not None and value > high)):
            bounds = f"in [{low:g}, {high:g}]" if high is not None else f">= {low:g}"
            raise self._fail(field_name, f"must be a number {bounds}, got {excerpt(value)}")

    def _check_bool(self, field_name: str) -> None:
        value = getattr(self, field_name)
        if not isinstance(value, bool):
            raise self._fail(field_name, f"must be true or false, got {excerpt(value)}")

    def _patterns(self) -> None:
        for name in ("include", "ignore"):
            value = getattr(self, name)
            if isinstance(value, Sequence) and not isinstance(value, str):
                object.__setattr__(self, name, tuple(value))
            if not isinstance(getattr(self, name), (str, tuple)):
                raise self._fail(name, f"must be a regex or a list of regexes, got {excerpt(value)}")

    def _select(self) -> dict[str, Patterns]:
        return {k: getattr(self, k) for k in ("include", "ignore") if getattr(self, k, ())}


STEPS: dict[str, type[Step]] = {}


def step(cls: type[Step]) -> type[Step]:
    """Class decorator: make ``cls`` a recipe step under its ``name``."""
    STEPS[cls.name] = cls
    return cls


PRUNE_KINDS = ("unstructured", "global", "nm", "structured", "features", "heads")


@step
@dataclass(frozen=True)
class Prune(Step):
    """Zero or remove weights: ``kind`` unstructured / global / nm / structured / features / heads, to ``sparsity``
    (``n`` of every ``m`` for N:M); ``steps`` > 1 prunes on a cubic schedule with ``finetune_epochs`` in between."""

    name: ClassVar[str] = "prune"

    kind: str = "unstructured"
    sparsity: float = 0.5
    n: int = 2
    m: int = 4
    norm: str | None = None
    scope: str = "layer"
    min_heads: int = 1
    steps: int = 1
    finetune_epochs: int = 1
    lr: float = 1e-3
    include: Patterns = ()
    ignore: Patterns = ()

    def __post_init__(self) -> None:
        if self.kind not in PRUNE_KINDS:
            raise ConfigError(f"prune: unknown kind {excerpt(self.kind)}; valid: {', '.join(PRUNE_KINDS)}")
        try:
            check_sparsity(self.sparsity)
        except ConfigError as exc:
            raise ConfigError(f"prune: {exc}") from None
        for name in ("n", "m", "min_heads", "steps", "finetune_epochs"):
            self._check_int(name, 1)
        self._check_number("lr")
        self._patterns()
        if self.steps > 1 and self.kind not in ("unstructured", "global"):
            raise self._fail("steps", f"(gradual pruning) applies to unstructured / global pruning, not {self.kind!r}")

    def run(self, model: nn.Module, context: Context) -> tuple[nn.Module, dict[str, Any]]:
        kind, sparsity, select = self.kind, self.sparsity, self._select()
        if self.steps > 1:
            context.need_data("prune (gradual)")
            scope = "global" if kind == "global" else "layer"
            model = P.gradual_prune(model, sparsity, self.steps,
                                    lambda m: context.fit(m, self.finetune_epochs, self.lr),
                                    scope=scope, inplace=True, **select)
        elif kind in ("unstructured", "global"):
            scope = "layer" if kind == "unstructured" else "global"
            model = P.magnitude_prune(model, sparsity, scope=scope, inplace=True, **select)
        elif kind == "nm":
            model = P.nm_prune(model, self.n, self.m, inplace=True, **select)
        elif kind == "structured":
            model = P.prune_channels(model, sparsity, norm=self.norm or "l1", inplace=True, **select)
        elif kind == "features":
            model = P.prune_features(model, sparsity, norm=self.norm or "l2", inplace=True)
            report = report_of(model, P.FeaturePruneReport)
            return P.SelectColumns(model, report.kept), report.to_dict()
        else:
            model = P.prune_heads(model, sparsity, norm=self.norm or "l2", scope=self.scope,
                                  min_heads=self.min_heads, inplace=True, **select)
        return model, report_of(model).to_dict()


@step
@dataclass(frozen=True)
class LowRank(Step):
    """Factorise ``W (out, in) ~ U_r V_r`` by truncated SVD: rank from the kept ``energy`` share of ``sum s_i^2``
    or from a parameter ``budget``."""

    name: ClassVar[str] = "lowrank"

    energy: float | None = None
    budget: float | None = None
    min_params: int = 0
    include: Patterns = ()
    ignore: Patterns = ()

    def __post_init__(self) -> None:
        if (self.energy is None) == (self.budget is None):
            raise ConfigError("lowrank: give exactly one of 'energy' and 'budget'")
        self._check_number("energy" if self.budget is None else "budget", 0.0, 1.0)
        self._check_int("min_params", 0)
        self._patterns()

    def run(self, model: nn.Module, context: Context) -> tuple[nn.Module, dict[str, Any]]:
        model = low_rank(model, energy=self.energy, budget=self.budget, min_params=self.min_params, inplace=True,
                         **self._select())
        return model, report_of(model).to_dict()


class _QuantConfigStep(Step):
    """A step that quantizes: exactly one of ``preset`` and ``config``, an optional ``algorithm``."""

    def _check_config(self) -> None:
        if (self.preset is None) == (self.config is None):
            raise ConfigError(f"{self.name}: give exactly one of 'preset' and 'config'")
        if self.algorithm is not None:
            name, options = algorithm_spelling(split_algorithms(self.algorithm, where=f"{self.name}: algorithm"))
            make_algorithm(name, options)  # builds the typed algorithm steps: their fields are checked here
        self.quant_config()

    def quant_config(self) -> QuantConfig:
        """The :class:`QuantConfig` of the step (preset or config, then algorithm and include / ignore)."""
        cfg = resolve_config(self.preset if self.preset is not None else QuantConfig.from_dict(self.config))
        if self.algorithm is not None:
            if cfg.algorithm != "rtn":
                raise self._fail("algorithm", f"is given twice: {self.preset or 'config'} already names {cfg.algorithm!r}")
            name, options = algorithm_spelling(split_algorithms(self.algorithm))
            cfg = replace(cfg, algorithm=name, algorithm_options=options, name=f"{cfg.name}-{name}")
        return replace(cfg, **self._select()) if self._select() else cfg


@step
@dataclass(frozen=True)
class Quantize(_QuantConfigStep):
    """Post-training quantization (:func:`squeezer.quantize`), calibrated on the inputs of the data batches."""

    name: ClassVar[str] = "quantize"

    preset: str | None = None
    config: dict[str, Any] | None = None
    algorithm: str | list[Any] | None = None
    include: Patterns = ()
    ignore: Patterns = ()

    def __post_init__(self) -> None:
        self._patterns()
        self._check_config()

    def run(self, model: nn.Module, context: Context) -> tuple[nn.Module, dict[str, Any]]:
        P.remove_masks(model)
        model = quantize(model, self.quant_config(), calib=context.calib(), inplace=True, progress=False)
        summary = report_of(model).to_dict()["summary"]
        return model, {k: summary[k] for k in ("quantized_layers", "weight_compression", "bits_per_weight")}


@step
@dataclass(frozen=True)
class QAT(_QuantConfigStep):
    """Quantization-aware training for ``epochs``: ``L = L_task + lam E_quant``, then folded into fixed qparams."""

    name: ClassVar[str] = "qat"
    trains: ClassVar[bool] = True

    preset: str | None = None
    config: dict[str, Any] | None = None
    algorithm: str | list[Any] | None = None
    epochs: int = 1
    lr: float = 1e-4
    lam: float = 0.0
    learnable_scales: bool = False

    def __post_init__(self) -> None:
        self._check_int("epochs", 1)
        self._check_number("lr")
        self._check_number("lam")
        self._check_bool("learnable_scales")
        self._check_config()

    def run(self, model: nn.Module, context: Context) -> tuple[nn.Module, dict[str, Any]]:
        data = context.need_data("qat")
        P.remove_masks(model)
        q = prepare_qat(model, self.quant_config(), calib=context.calib(), learnable_scales=self.learnable_scales,
                        inplace=True)
        task = context.loss_fn

        def loss(outputs: Any, targets: Any) -> dict[str, Any]:
            nonlocal task
            task = task or infer_loss(outputs, targets)
            return qat_loss(task(outputs, targets), q, self.lam)._asdict()

        history = fit(q, data, epochs=self.epochs, lr=self.lr, loss_fn=loss)
        return convert(q, inplace=True), {"final_loss": history[-1]["loss"],
                                          "final_quant_error": history[-1].get("quant")}


@step
@dataclass(frozen=True)
class Distill(Step):
    """Train the model against the recipe's input model (the teacher ``t``), temperature ``T``:
    ``L = alpha L_task + (1 - alpha) T^2 KL(softmax(t / T) || softmax(s / T))``."""

    name: ClassVar[str] = "distill"
    trains: ClassVar[bool] = True

    epochs: int = 1
    alpha: float = 0.5
    temperature: float = 4.0
    lr: float = 1e-3
    cache_teacher: bool = False

    def __post_init__(self) -> None:
        self._check_int("epochs", 1)
        self._check_number("alpha", 0.0, 1.0)
        self._check_number("temperature")
        self._check_number("lr")
        self._check_bool("cache_teacher")

    def run(self, model: nn.Module, context: Context) -> tuple[nn.Module, dict[str, Any]]:
        model = distill(model, context.teacher, context.need_data("distill"), epochs=self.epochs, alpha=self.alpha,
                        temperature=self.temperature, lr=self.lr, loss_fn=context.loss_fn,
                        cache_teacher=self.cache_teacher, inplace=True)
        return model, {"final_loss": report_of(model).history[-1]["loss"]}


@step
@dataclass(frozen=True)
class Finetune(Step):
    """Train on the task loss for ``epochs`` (pruning masks keep pruned weights at zero)."""

    name: ClassVar[str] = "finetune"
    trains: ClassVar[bool] = True

    epochs: int = 1
    lr: float = 1e-3

    def __post_init__(self) -> None:
        self._check_int("epochs", 1)
        self._check_number("lr")

    def run(self, model: nn.Module, context: Context) -> tuple[nn.Module, dict[str, Any]]:
        return model, context.fit(model, self.epochs, self.lr)


def parse_step(item: Any, index: int) -> Step:
    """One recipe-list item ``{name: options}`` -> its typed step; errors name the index, step and field."""
    if isinstance(item, Step):
        return item
    if not isinstance(item, Mapping) or len(item) != 1:
        raise ConfigError(f"recipe step {index}: must be a mapping with one key (the step name), got {excerpt(item)}")
    (name, options), = item.items()
    if name not in STEPS:
        raise ConfigError(f"recipe step {index}: unknown step {excerpt(name)}; valid steps: {', '.join(STEPS)}")
    options = {} if options is None else options
    if not isinstance(options, Mapping):
        raise ConfigError(f"recipe step {index} ({name}): options must be a mapping, got {type(options).__name__}")
    valid = [f.name for f in fields(STEPS[name])]  # type: ignore[arg-type]
    unknown = sorted(map(str, set(options) - set(valid)))
    if unknown:
        raise ConfigError(f"recipe step {index} ({name}): unknown option(s) {excerpt(unknown)}; valid: {sorted(valid)}")
    try:
        return STEPS[name](**options)
    except ConfigError as exc:
        raise ConfigError(f"recipe step {index}: {exc}") from None

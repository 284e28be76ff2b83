"""Joint multi-objective search over techniques: the Pareto front of size (or latency) vs metric.

A trial samples ``theta = (bits, algorithm, sparsity, rank)`` from a :class:`SearchSpace` and builds

    model --prune(sparsity)--> --SVD(rank)--> measure_sensitivity --allocate(Budget(bits))--> build(algorithm)

(the per-layer formats come from the integer programme of :func:`allocate` under a mean-bits budget,
so "bits per layer" is searched through one number). It scores the two objectives

    minimise  size(theta)   = fixed_bytes + sum_l bytes[l][f_l]            (objective="bytes": exact, packed)
                              or median batch-1 ms of the packed model     (objective="latency")
    maximise  metric(theta) = evaluate(model_theta)                        (minimise when not higher_is_better)

and returns the trials no other trial dominates (no worse in both, better in one): the Pareto front.
``drop = m0 - metric`` (``metric - m0`` when lower is better), ``m0 = evaluate(float model)``.

Optuna's multi-objective TPE sampler (seeded) proposes the trials, asked and told in batches of
``parallel``: the proposals depend only on the seed, the batch size and the results, never on where the
trials ran, so in-process and Ray runs of the byte objective give the same front (latency is timed, so
its values and the proposals that follow them vary from run to run). An SQLite study keeps
every finished trial (its parameters, size, metric and per-layer formats as user attributes), so an
interrupted search resumes with ``resume=True`` and runs only the missing trials.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from torch import nn

from ..algorithms.base import algorithm_names
from ..cache import CacheDir, resolve
from ..calibration import Batch, call_model, check_batches
from ..errors import ConfigError
from ..kernels import pack
from ..lowrank import low_rank
from ..modules import quant_layers
from ..prune import magnitude_prune, prune_channels, remove_masks
from ..prune.magnitude import check_sparsity
from .allocate import Budget, allocate
from .formats import DEFAULT_FORMATS, FLOAT, check_formats, format_config
from .latency import first_row, median_ms
from .sensitivity import _evaluate, measure_sensitivity
from .tune import build, check_tolerance

BITS_STEP = 0.25
OBJECTIVES = {"bytes": "bytes", "latency": "latency_ms"}  # objective -> the trial key it minimises


@dataclass(frozen=True)
class SearchSpace:
    """What a trial may choose.

    ``bits``: range of the mean code bits per weight given to :func:`allocate` (step 0.25);
    ``formats``: the per-layer candidates; ``algorithms``: PTQ algorithms; ``sparsity``: fractions
    pruned before quantization, by ``pruning`` = ``"channels"`` (whole output channels removed, the
    model shrinks: :func:`squeezer.prune.prune_channels`) or ``"magnitude"`` (unstructured masks,
    weights stay dense so bytes do not drop); ``rank``: SVD factorisation keeping this fraction of each
    layer's parameters (:func:`squeezer.lowrank.low_rank`, layers without a saving are left), ``None`` = off.
    """

    bits: tuple[float, float] = (2.0, 8.0)
    formats: tuple[str, ...] = DEFAULT_FORMATS
    algorithms: tuple[str, ...] = ("rtn",)
    sparsity: tuple[float, ...] = (0.0,)
    rank: tuple[float | None, ...] = (None,)
    pruning: Literal["channels", "magnitude"] = "channels"

    def __post_init__(self) -> None:
        object.__setattr__(self, "formats", check_formats(self.formats))
        for name in ("bits", "algorithms", "sparsity", "rank"):
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or not isinstance(value, Iterable) or not tuple(value):
                raise ConfigError(f"space.{name} must be a non-empty sequence, got {value!r}")
            value = tuple(value)
            if len(set(value)) != len(value):
                raise ConfigError(f"space.{name} contains duplicates: {list(value)}")
            object.__setattr__(self, name, value)
        bits = self.bits
        if (len(bits) != 2 or not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in bits)
                or not 1 <= bits[0] <= bits[1] <= 32):
            raise ConfigError(f"space.bits must be (low, high) with 1 <= low <= high <= 32, got {bits!r}")
        narrowest = min(32 if f == FLOAT else format_config(f).weight.bits for f in self.formats)
        if bits[0] < narrowest:
            raise ConfigError(f"space.bits low={bits[0]:g} is below the narrowest format ({narrowest} bits "
                              f"among {list(self.formats)}): no allocation can meet it")
        for algorithm in self.algorithms:
            algorithm_names(algorithm, where="space.algorithms")
        for s in self.sparsity:
            check_sparsity(s, "space.sparsity")
        for r in self.rank:
            if r is not None and (isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r <= 1):
                raise ConfigError(f"space.rank entries must be None or a fraction in (0, 1], got {r!r}")
        if self.pruning not in ("channels", "magnitude"):
            raise ConfigError(f"space.pruning must be 'channels' or 'magnitude', got {self.pruning!r}")

    def distributions(self) -> dict[str, Any]:
        """Optuna distributions of the trial parameters."""
        from optuna.distributions import CategoricalDistribution, FloatDistribution

        return {"bits": FloatDistribution(*map(float, self.bits), step=BITS_STEP),
                "algorithm": CategoricalDistribution(self.algorithms),
                "sparsity": CategoricalDistribution(self.sparsity),
                "rank": CategoricalDistribution(self.rank)}

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def transform(model: nn.Module, params: dict[str, Any], pruning: str = "channels") -> nn.Module:
    """A copy of ``model`` pruned to ``params["sparsity"]`` and factorised to ``params["rank"]``."""
    model = copy.deepcopy(model).eval()
    if params["sparsity"] > 0:
        if pruning == "channels":
            prune_channels(model, params["sparsity"], inplace=True)
        else:
            remove_masks(magnitude_prune(model, params["sparsity"], inplace=True))
    if params["rank"] is not None:
        low_rank(model, budget=params["rank"], inplace=True)
    return model


@dataclass(frozen=True)
class _Job:
    """What one trial needs besides the model, the batches and ``evaluate``."""

    number: int
    params: dict[str, Any]
    space: SearchSpace
    objective: str
    cache_dir: Path | None

    @property
    def what(self) -> str:
        return f"trial {self.number} ({', '.join(f'{k}={v}' for k, v in self.params.items())})"


def _run_trial(model: nn.Module, batches: list[Batch], evaluate: Callable[[nn.Module], float],
               job: _Job) -> dict[str, Any]:
    """One trial's pipeline (module docstring); module level so that Ray can run it as a task."""
    m = transform(model, job.params, job.space.pruning)
    sens = measure_sensitivity(m, batches, job.space.formats, algorithm=job.params["algorithm"],
                               cache_dir=job.cache_dir, progress=False)
    alloc = allocate(sens, Budget(bits=job.params["bits"]))
    q = build(m, alloc.choice, batches, job.params["algorithm"])
    result = {"bytes": alloc.bytes, "bits": alloc.bits, "choice": alloc.choice,
              "metric": _evaluate(evaluate, q, job.what)}
    if job.objective == "latency":
        if quant_layers(q):
            pack(q, inplace=True)
        example = first_row(batches[0])
        result["latency_ms"] = median_ms(lambda: call_model(q, example))
    return result


@dataclass
class SearchResult:
    """Every finished trial (``number, params, bytes, bits, metric, drop, choice`` and ``latency_ms``
    for the latency objective), the Pareto ``front`` (sorted by size) and the ``chosen`` trial:
    the smallest on the front with ``drop <= max_drop`` (``None`` without ``max_drop`` or when none meets it)."""

    trials: list[dict[str, Any]]
    front: list[dict[str, Any]]
    chosen: dict[str, Any] | None
    baseline: float
    objective: str
    metric_name: str
    space: SearchSpace
    study_name: str
    storage: str | None
    executor: str
    max_drop: float | None = None

    @property
    def x(self) -> str:
        """The size key of a trial: ``bytes`` or ``latency_ms``."""
        return OBJECTIVES[self.objective]

    def to_dict(self) -> dict[str, Any]:
        return {"study_name": self.study_name, "storage": self.storage, "objective": self.objective,
                "executor": self.executor, "metric_name": self.metric_name, "baseline": self.baseline,
                "max_drop": self.max_drop, "space": self.space.to_dict(), "front": self.front, "chosen": self.chosen,
                "trials": self.trials}

    def pareto_data(self) -> dict[str, Any]:
        """The scatter of the HTML report: every trial's size and metric, front and chosen marked."""
        front = {t["number"] for t in self.front}
        chosen = None if self.chosen is None else self.chosen["number"]
        return {"x": self.x, "y": self.metric_name,
                "trials": [{"x": t[self.x], "y": t["metric"], "front": t["number"] in front,
                            "chosen": t["number"] == chosen, "params": t["params"]} for t in self.trials]}

    def build(self, model: nn.Module, calib: Iterable[Batch], trial: dict[str, Any] | None = None) -> nn.Module:
        """The model of ``trial`` (default: ``chosen``), rebuilt from its parameters and per-layer formats."""
        trial = trial or self.chosen
        if trial is None:
            raise ConfigError("no chosen trial (no max_drop given, or no trial met it): pass one of result.front")
        m = transform(model, trial["params"], self.space.pruning)
        return build(m, trial["choice"], check_batches(calib), trial["params"]["algorithm"])


def _storage(storage: str | Path | None) -> str | None:
    """An Optuna storage URL: a path becomes ``sqlite:///<absolute path>`` (its folder is created)."""
    if storage is None or "://" in str(storage):
        return None if storage is None else str(storage)
    path = Path(storage).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def _executor(executor: str) -> bool:
    """Whether trials run on Ray: ``"ray"``, or ``"auto"`` with Ray installed and initialised."""
    if executor not in ("auto", "local", "ray"):
        raise ConfigError(f"executor must be 'auto', 'local' or 'ray', got {executor!r}")
    if executor == "local":
        return False
    try:
        import ray
    except ImportError:
        if executor == "ray":
            raise ConfigError("executor='ray' needs Ray: pip install 'squeezer[ray]'") from None
        return False
    if executor == "ray" and not ray.is_initialized():
        ray.init()
    return ray.is_initialized()


def _open_study(name: str, url: str | None, resume: bool, directions: list[str], attrs: dict[str, Any], seed: int):
    """Create the study, or load it with ``resume`` (its stale running trials become failed)."""
    import optuna
    from optuna.trial import TrialState

    storage = None if url is None else optuna.storages.RDBStorage(url)
    exists = storage is not None and name in optuna.get_all_study_names(storage)
    if exists and not resume:
        raise ConfigError(f"study {name!r} already exists in {url}: pass resume=True to continue it "
                          "or a new study_name")
    study = optuna.create_study(study_name=name, storage=storage, directions=directions, load_if_exists=True)
    if exists:
        for key, value in attrs.items():
            if study.user_attrs.get(key) != value:
                raise ConfigError(f"study {name!r} was run with another {key} ({study.user_attrs.get(key)!r}, "
                                  f"now {value!r}): pass a new study_name")
        for stale in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            study.tell(stale.number, state=TrialState.FAIL)
    else:
        for key, value in attrs.items():
            study.set_user_attr(key, value)
    # seeded by the study's length, so a resumed search proposes new trials, reproducibly
    study.sampler = optuna.samplers.TPESampler(seed=seed + len(study.trials))
    return study


def pareto_search(
    model: nn.Module,
    calib: Iterable[Batch],
    evaluate: Callable[[nn.Module], float],
    *,
    space: SearchSpace | None = None,
    trials: int = 50,
    seed: int = 0,
    objective: Literal["bytes", "latency"] = "bytes",
    storage: str | Path | None = None,
    study_name: str = "squeezer",
    resume: bool = False,
    executor: Literal["auto", "local", "ray"] = "auto",
    parallel: int = 2,
    max_drop: float | None = None,
    higher_is_better: bool = True,
    metric_name: str = "metric",
    cache_dir: CacheDir = True,
    progress: bool = True,
) -> SearchResult:
    """Search ``space`` for ``trials`` finished trials and return the Pareto front (module docstring).

    ``storage``: an SQLite file (or an Optuna storage URL) holding the study; an existing study of
    ``study_name`` is continued with ``resume=True`` (only ``trials - finished`` more run) and refused
    otherwise. ``executor``: ``"ray"`` runs each trial as a Ray task (``"auto"``: when Ray is
    installed and ``ray.init`` was called), ``parallel`` at a time; ``model`` and ``evaluate`` must
    then be picklable (``evaluate``: a module-level function of an importable module, or a closure).
    ``cache_dir`` keeps the measured sensitivities (``None``: measure every trial). An ``evaluate``
    that raises stops the search with a :class:`DataError` naming the trial; the finished trials stay
    in the study. ``metric_name`` labels the metric in :meth:`SearchResult.pareto_data`.
    """
    from optuna.trial import TrialState

    space = space or SearchSpace()
    if objective not in OBJECTIVES:
        raise ConfigError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    for name, value in (("trials", trials), ("parallel", parallel)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
    max_drop = None if max_drop is None else check_tolerance(max_drop)
    batches = check_batches(calib)
    on_ray = _executor(executor)
    url = _storage(storage)
    baseline = _evaluate(evaluate, model, "the float model")
    directions = ["minimize", "maximize" if higher_is_better else "minimize"]
    attrs = {"space": space.to_dict(), "objective": objective, "higher_is_better": higher_is_better}
    study = _open_study(study_name, url, resume, directions, attrs, seed)
    cache = resolve("sensitivity", cache_dir)  # resolved here: Ray workers may not share the environment
    x = OBJECTIVES[objective]
    console = None
    if progress:
        from rich.console import Console

        console = Console(stderr=True)
    if on_ray:
        import ray

        task = ray.remote(num_cpus=1)(_run_trial)
        refs = [ray.put(model), ray.put(batches), ray.put(evaluate)]

    finished = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    distributions = space.distributions()
    while finished < trials:
        batch = [study.ask(distributions) for _ in range(min(parallel, trials - finished))]
        jobs = [_Job(t.number, t.params, space, objective, cache) for t in batch]
        results: Iterator[dict[str, Any]]
        if on_ray:
            pending = [task.remote(*refs, job) for job in jobs]
            results = (ray.get(ref) for ref in pending)
        else:
            results = (_run_trial(model, batches, evaluate, job) for job in jobs)
        for i, (trial, job) in enumerate(zip(batch, jobs)):
            try:
                result = next(results)
            except Exception as exc:  # noqa: BLE001 - any failure: mark the batch's unfinished trials, re-raise
                for unfinished in batch[i:]:
                    study.tell(unfinished, state=TrialState.FAIL)
                raise getattr(exc, "cause", None) or exc  # a Ray task error carries the trial's own error
            drop = baseline - result["metric"] if higher_is_better else result["metric"] - baseline
            for key, value in {**result, "drop": drop, "params": job.params}.items():
                trial.set_user_attr(key, value)
            study.tell(trial, [result[x], result["metric"]])
            finished += 1
            if console is not None:
                console.print(f"{job.what}: {x}={result[x]:.6g}, {metric_name}={result['metric']:.6g} "
                              f"[{finished}/{trials}]", soft_wrap=True)

    def entry(t: Any) -> dict[str, Any]:
        return {"number": t.number, **t.user_attrs}

    done = [entry(t) for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    front = sorted((entry(t) for t in study.best_trials), key=lambda t: (t[x], t["drop"], t["number"]))
    meets = [t for t in front if max_drop is not None and t["drop"] <= max_drop]
    return SearchResult(done, front, meets[0] if meets else None, baseline, objective, metric_name, space,
                        study_name, url, "ray" if on_ray else "local", max_drop)

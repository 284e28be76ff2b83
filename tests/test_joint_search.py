"""Joint Pareto search: front, determinism, resume from SQLite, Ray vs in-process, errors."""

from __future__ import annotations

import optuna
import pytest
import torch
from optuna.trial import TrialState
from torch import nn

from squeezer.errors import ConfigError, DataError
from squeezer.search.joint import SearchSpace, pareto_search

SPACE = SearchSpace(bits=(2.0, 8.0), formats=("w8", "w4g128", "w2g64", "fp32"), sparsity=(0.0, 0.25),
                    rank=(None, 0.5))


def make_model() -> nn.Module:
    """torch classes only, so Ray workers can unpickle it without importing the tests."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4)).eval()


def make_evaluate(model: nn.Module, fail_on: int | None = None, fail_quantized: bool = False,
                  error: type[BaseException] = RuntimeError):
    """``-MSE`` to the float model's outputs on held-out inputs (higher is better); a closure, so
    cloudpickle ships it by value. It raises on call number ``fail_on`` (0 = the baseline; counted
    in-process only) or, with ``fail_quantized``, on every quantized model."""
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        target = model(x)
    calls = []

    def evaluate(m: nn.Module) -> float:
        calls.append(1)
        if (fail_on is not None and len(calls) - 1 == fail_on) or (fail_quantized and hasattr(m, "squeezer_reports")):
            raise error("metric server down")
        with torch.no_grad():
            return -float((m(x) - target).pow(2).mean())

    evaluate.calls = calls
    return evaluate


@pytest.fixture
def setup(tmp_path):
    model = make_model()
    g = torch.Generator().manual_seed(1)
    calib = [torch.randn(32, 16, generator=g) for _ in range(2)]
    return model, calib, tmp_path


def search(model, calib, tmp_path, evaluate=None, **kw):
    kw = {"space": SPACE, "trials": 6, "seed": 0, "executor": "local", "cache_dir": tmp_path / "cache",
          "progress": False, **kw}
    return pareto_search(model, calib, evaluate or make_evaluate(model), **kw)


def dominates(a: dict, b: dict) -> bool:
    return (a["bytes"] <= b["bytes"] and a["metric"] >= b["metric"]
            and (a["bytes"] < b["bytes"] or a["metric"] > b["metric"]))


def key(trials: list[dict]) -> list[tuple]:
    return [(t["params"], t["bytes"], t["choice"]) for t in trials]


def test_front_is_pareto_and_chosen_rebuilds(setup):
    model, calib, tmp = setup
    result = search(model, calib, tmp, trials=8, max_drop=0.05)
    assert len(result.trials) == 8 and result.front
    front = {t["number"] for t in result.front}
    for t in result.front:
        assert not any(dominates(o, t) for o in result.trials)
    for t in result.trials:
        if t["number"] not in front:
            assert any(dominates(f, t) or (f["bytes"], f["metric"]) == (t["bytes"], t["metric"])
                       for f in result.front)
    assert [t["bytes"] for t in result.front] == sorted(t["bytes"] for t in result.front)
    assert result.baseline == pytest.approx(0.0)
    meets = [t for t in result.front if t["drop"] <= 0.05]
    assert result.chosen == (min(meets, key=lambda t: t["bytes"]) if meets else None)
    data = result.pareto_data()
    assert data["x"] == "bytes" and data["y"] == "metric" and len(data["trials"]) == 8
    assert sum(p["front"] for p in data["trials"]) == len(result.front)
    assert sum(p["chosen"] for p in data["trials"]) == (result.chosen is not None)
    target = result.chosen or result.front[0]
    rebuilt = result.build(model, calib, target)
    assert make_evaluate(model)(rebuilt) == pytest.approx(target["metric"], rel=1e-6, abs=1e-9)
    assert result.to_dict()["front"] == result.front and result.executor == "local"


def test_same_seed_same_front(setup):
    model, calib, tmp = setup
    first = search(model, calib, tmp, study_name="a")
    second = search(model, calib, tmp, study_name="b", cache_dir=tmp / "other-cache")
    assert key(first.trials) == key(second.trials)
    assert key(first.front) == key(second.front)
    assert [t["metric"] for t in first.front] == pytest.approx([t["metric"] for t in second.front])


def test_resume_runs_only_the_missing_trials(setup):
    model, calib, tmp = setup
    db = tmp / "study.db"
    first = search(model, calib, tmp, trials=4, storage=db)
    with pytest.raises(ConfigError, match="resume=True"):
        search(model, calib, tmp, trials=8, storage=db)
    with pytest.raises(ConfigError, match="space"):
        search(model, calib, tmp, trials=8, storage=db, resume=True, space=SearchSpace(bits=(3.0, 8.0)))
    evaluate = make_evaluate(model)
    second = search(model, calib, tmp, evaluate, trials=8, storage=db, resume=True)
    assert len(evaluate.calls) == 1 + 4  # the baseline and the 4 missing trials
    assert len(second.trials) == 8
    assert key(second.trials[:4]) == key(first.trials)
    study = optuna.load_study(study_name="squeezer", storage=f"sqlite:///{db}")
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 8
    assert {"bytes", "metric", "drop", "choice", "params"} <= set(study.trials[-1].user_attrs)


def test_killed_search_resumes(setup):
    model, calib, tmp = setup
    db = tmp / "study.db"
    with pytest.raises(KeyboardInterrupt):  # killed while trial 2 runs: trials 2 and 3 stay "running"
        search(model, calib, tmp, make_evaluate(model, fail_on=3, error=KeyboardInterrupt), storage=db)
    study = optuna.load_study(study_name="squeezer", storage=f"sqlite:///{db}")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2 + [TrialState.RUNNING] * 2
    assert len(search(model, calib, tmp, storage=db, resume=True).trials) == 6
    states = [t.state for t in optuna.load_study(study_name="squeezer", storage=f"sqlite:///{db}").trials]
    assert states == [TrialState.COMPLETE] * 2 + [TrialState.FAIL] * 2 + [TrialState.COMPLETE] * 4


def test_evaluate_error_names_the_trial_and_resume_continues(setup):
    model, calib, tmp = setup
    db = tmp / "study.db"
    with pytest.raises(DataError, match=r"evaluate function raised RuntimeError on trial 3 \(bits=.*metric server"):
        search(model, calib, tmp, make_evaluate(model, fail_on=4), trials=6, storage=db)
    study = optuna.load_study(study_name="squeezer", storage=f"sqlite:///{db}")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3 + [TrialState.FAIL]
    result = search(model, calib, tmp, trials=6, storage=db, resume=True)
    assert len(result.trials) == 6


def test_baseline_error_is_a_data_error(setup):
    model, calib, tmp = setup
    with pytest.raises(DataError, match="the float model"):
        search(model, calib, tmp, make_evaluate(model, fail_on=0))


def test_latency_objective(setup, monkeypatch):
    model, calib, tmp = setup
    monkeypatch.setenv("SQUEEZER_CACHE_DIR", str(tmp / "kernels"))
    result = search(model, calib, tmp, trials=2, objective="latency", space=SearchSpace(bits=(4.0, 8.0)))
    assert all(t["latency_ms"] > 0 for t in result.trials)
    assert result.pareto_data()["x"] == "latency_ms"


@pytest.mark.parametrize(("space", "match"), [
    ({"algorithms": ()}, "space.algorithms"),
    ({"algorithms": ("nope",)}, "space.algorithms: unknown algorithm 'nope'"),
    ({"algorithms": ("smoothquant+nope",)}, "space.algorithms: unknown algorithm 'nope' in 'smoothquant\\+nope'"),
    ({"algorithms": (3,)}, "space.algorithms: an algorithm is named by a string"),
    ({"bits": (8.0, 2.0)}, "space.bits"),
    ({"bits": (0.5, 4.0)}, "space.bits"),
    ({"bits": (2.0, 33.0)}, "space.bits"),
    ({"bits": (2.0, 8.0), "formats": ("w8", "w4g128")}, "space.bits low=2"),
    ({"sparsity": (1.0,)}, "space.sparsity"),
    ({"rank": (0.0,)}, "space.rank"),
    ({"pruning": "random"}, "space.pruning"),
])
def test_bad_space(space, match):
    with pytest.raises(ConfigError, match=match):
        SearchSpace(**space)


@pytest.mark.parametrize(("kw", "match"), [
    ({"max_drop": -0.1}, "max_drop"),
    ({"trials": 0}, "trials"),
    ({"parallel": 0}, "parallel"),
    ({"objective": "flops"}, "objective"),
    ({"executor": "dask"}, "executor"),
])
def test_bad_arguments(setup, kw, match):
    model, calib, tmp = setup
    with pytest.raises(ConfigError, match=match):
        search(model, calib, tmp, **kw)


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


def test_ray_and_in_process_agree(setup, ray_cluster):
    model, calib, tmp = setup
    local = search(model, calib, tmp, study_name="local", cache_dir=tmp / "local")
    on_ray = search(model, calib, tmp, study_name="ray", executor="auto", cache_dir=tmp / "ray")
    assert key(on_ray.trials) == key(local.trials)
    assert key(on_ray.front) == key(local.front)
    assert [t["metric"] for t in on_ray.trials] == pytest.approx([t["metric"] for t in local.trials])
    assert (local.executor, on_ray.executor) == ("local", "ray")
    with pytest.raises(DataError, match=r"evaluate function raised RuntimeError on trial 0 \(bits=.*server down"):
        search(model, calib, tmp, make_evaluate(model, fail_quantized=True), executor="ray", cache_dir=tmp / "ray")

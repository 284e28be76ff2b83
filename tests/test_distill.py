"""Knowledge distillation (squeezer.distill): the KD loss, feature matching and the distill loop."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from squeezer.transform import report_of
import squeezer
from squeezer import ConfigError, DataError
from squeezer.distill import FeatureMatcher, distill, distillation_loss
from squeezer.examples.digits import DigitsCNN, make_digits_task
from squeezer.qat import convert, prepare_qat
from squeezer.training import KeepBest, fit

from .conftest import SmallCNN


def _mlp(width: int, seed: int, d: int = 16, classes: int = 4) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, width), nn.ReLU(), nn.Linear(width, classes))


def _data(n: int = 256, d: int = 16, classes: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g)
    y = (torch.tanh(x @ torch.randn(d, 8, generator=g)) @ torch.randn(8, classes, generator=g)).argmax(1)
    return [(x[i : i + 32], y[i : i + 32]) for i in range(0, n, 32)]


@pytest.fixture(scope="module")
def teacher() -> nn.Module:
    model = _mlp(64, seed=0)
    torch.manual_seed(0)
    fit(model, _data(), 15, lr=1e-2)
    return model.eval()


# ----------------------------------------------------------------------------- the KD loss
@pytest.mark.parametrize("shape", [(8, 5), (2, 3, 5), (8,), (8, 1)])
def test_kd_loss_zero_iff_equal_and_gradient_to_student_only(shape):
    g = torch.Generator().manual_seed(0)
    teacher_logits = torch.randn(shape, generator=g).requires_grad_(True)
    same = teacher_logits.detach().clone().requires_grad_(True)
    assert distillation_loss(same, teacher_logits).item() == 0.0
    student = torch.randn(shape, generator=g).requires_grad_(True)
    loss = distillation_loss(student, teacher_logits, temperature=2.0)
    assert loss.item() > 0
    loss.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher_logits.grad is None


def test_kd_loss_formulas():
    g = torch.Generator().manual_seed(1)
    s, t, temp = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g), 3.0
    p, q = F.softmax(t / temp, -1), F.softmax(s / temp, -1)
    expected = temp**2 * (p * (p.log() - q.log())).sum(-1).mean()
    assert torch.allclose(distillation_loss(s, t, temp), expected, rtol=1e-5)
    s, t = s[:, 0], t[:, 0]
    p, q = torch.sigmoid(t / temp), torch.sigmoid(s / temp)
    bernoulli = p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()
    assert torch.allclose(distillation_loss(s, t, temp), temp**2 * bernoulli.mean(), rtol=1e-5)


def test_kd_loss_errors():
    with pytest.raises(ConfigError, match="temperature"):
        distillation_loss(torch.zeros(2, 3), torch.zeros(2, 3), temperature=0)
    with pytest.raises(DataError, match="shape"):
        distillation_loss(torch.zeros(2, 3), torch.zeros(2, 4))


# ----------------------------------------------------------------------------- feature matching
def test_feature_matcher_captures_and_projects(teacher):
    student = _mlp(16, seed=1)
    x = _data()[0][0]
    teacher.zero_grad(set_to_none=True)
    matcher = FeatureMatcher(student, teacher, {"0": "0", "1": "1"}, example=x)
    assert len(matcher.projections) == 2 and matcher.projections["0"].linear.weight.shape == (64, 16)
    student(x)
    with torch.no_grad():
        teacher(x)
    assert matcher.student_features["0"].shape == (32, 16) and matcher.teacher_features["0"].shape == (32, 64)
    loss = matcher.loss()
    assert loss.item() > 0
    loss.backward()
    assert student[0].weight.grad is not None and matcher.projections["0"].linear.weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())
    matcher.remove()
    captured = matcher.student_features["0"]
    student(x * 2)
    assert matcher.student_features["0"] is captured and not student[0]._forward_hooks


def test_feature_matcher_projects_conv_channels():
    class Wide(SmallCNN):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(1, 12, 3, padding=1)
            self.bn = nn.BatchNorm2d(12)
            self.conv2 = nn.Conv2d(12, 16, 3, stride=2, padding=1, groups=2)

    torch.manual_seed(0)
    student, teacher = SmallCNN(), Wide().eval()
    x = torch.randn(2, 1, 8, 8)
    matcher = FeatureMatcher(student, teacher, {"conv1": "conv1", "conv2": "conv2"}, example=x)
    assert list(matcher.projections) == ["0"] and matcher.projections["0"].axis == 1
    student(x), teacher(x)
    assert matcher.student_features["conv1"].shape == (2, 8, 8, 8) and matcher.teacher_features["conv1"].shape == (2, 12, 8, 8)
    assert matcher.loss().item() > 0


def test_feature_matcher_errors(teacher):
    student = _mlp(16, seed=1)
    with pytest.raises(ConfigError, match="student has no submodule 'nope'"):
        FeatureMatcher(student, teacher, {"nope": "0"})
    with pytest.raises(ConfigError, match="non-empty"):
        FeatureMatcher(student, teacher, {})
    x = _data()[0][0]
    lazy = FeatureMatcher(student, teacher, {"0": "0"})
    with pytest.raises(DataError, match="not captured"):
        lazy.loss()
    student(x), teacher(x)
    with pytest.raises(DataError, match="example"):
        lazy.loss()
    lazy.remove()
    with pytest.raises(DataError, match="enable projections"):
        FeatureMatcher(student, teacher, {"0": "0"}, projections=False, example=x)
    with pytest.raises(ConfigError, match="teacher has no submodule"):
        FeatureMatcher(student, teacher, {"0": "9"})
    assert not student[0]._forward_hooks and not teacher[0]._forward_hooks, "failed matchers leave no hooks"


# ----------------------------------------------------------------------------- the loop
def _agreement(student: nn.Module, teacher: nn.Module) -> float:
    x = torch.cat([b[0] for b in _data()])
    with torch.no_grad():
        return float((student(x).argmax(1) == teacher(x).argmax(1)).float().mean())


def test_distill_small_student(teacher):
    before = copy.deepcopy(teacher.state_dict())
    student = _mlp(8, seed=2)
    assert sum(p.numel() for p in student.parameters()) * 4 <= sum(p.numel() for p in teacher.parameters())
    start = _agreement(student, teacher)
    logs = report_of(distill(student, teacher, _data(), 10, alpha=0.5, temperature=2.0, lr=1e-2, inplace=True)).history
    assert {"loss", "task", "kd"} <= set(logs[0]) and logs[-1]["kd"] < logs[0]["kd"]
    assert _agreement(student, teacher) > max(start, 0.8)
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())
    assert not teacher.training


def test_distill_with_features_and_kd_only(teacher):
    student = _mlp(16, seed=3)
    logs = report_of(distill(student, teacher, _data(), 5, alpha=0.0, features={"1": "1"}, beta=0.1, lr=1e-2, inplace=True)).history
    assert logs[-1]["feature"] < logs[0]["feature"] and logs[-1]["kd"] < logs[0]["kd"]
    assert not student[1]._forward_hooks and not teacher[1]._forward_hooks, "hooks removed at the end"


def test_distill_binary_single_logit():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(128, 6, generator=g)
    y = (x[:, 0] * x[:, 1] > 0).float()
    data = [(x[i : i + 32], y[i : i + 32]) for i in range(0, 128, 32)]
    teacher = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 1), nn.Flatten(0))
    fit(teacher, data, 20, lr=1e-2)
    student = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 1), nn.Flatten(0))
    logs = report_of(distill(student, teacher.eval(), data, 10, lr=1e-2, inplace=True)).history
    assert logs[-1]["kd"] < logs[0]["kd"] and logs[-1]["task"] < logs[0]["task"]


def test_distill_into_a_qat_student(tmp_path, teacher):
    student = prepare_qat(_mlp(16, seed=4), "w4g128", learnable_scales=True)
    logs = report_of(distill(student, teacher, _data(), 4, lr=1e-2, inplace=True)).history
    assert logs[-1]["loss"] < logs[0]["loss"] and student.squeezer_qat.steps == 4 * len(_data())
    convert(student, inplace=True)
    squeezer.save(student, tmp_path / "s")
    x = _data()[0][0]
    with torch.no_grad():
        assert torch.equal(squeezer.load(tmp_path / "s", lambda: _mlp(16, seed=0))(x), student(x))


def test_distill_errors(teacher):
    student = _mlp(8, seed=2)
    with pytest.raises(ConfigError, match="alpha"):
        distill(student, teacher, _data(), 1, alpha=1.5, inplace=True)
    with pytest.raises(ConfigError, match="beta"):
        distill(student, teacher, _data(), 1, beta=-1.0, inplace=True)
    with pytest.raises(DataError, match="re-iterable"):
        distill(student, teacher, iter(_data()), 1, inplace=True)
    with pytest.raises(DataError, match="shape"):
        distill(_mlp(8, seed=2, classes=3), teacher, _data(), 1, inplace=True)


class _Counting(nn.Module):
    """Wraps a teacher and counts its forward calls."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.inner(x)


@pytest.mark.parametrize("features", [None, {"1": "inner.1"}])
def test_cache_teacher_runs_it_once_per_batch_and_trains_the_same(teacher, features):
    data = _data()
    trained = []
    for cache in (False, True):
        counting = _Counting(teacher)
        student = _mlp(16, seed=6)
        torch.manual_seed(0)  # the projection of the feature matcher
        logs = report_of(distill(student, counting, data, 3, lr=1e-2, features=features, beta=0.1, cache_teacher=cache, inplace=True)).history
        assert counting.calls == len(data) * (1 if cache else 3) + (features is not None)  # + the sizing pass
        trained.append((student.state_dict(), logs))
    (plain, plain_logs), (cached, cached_logs) = trained
    assert all(torch.equal(plain[k], cached[k]) for k in plain), "cached teacher outputs train the same student"
    assert plain_logs == cached_logs


def test_cache_teacher_needs_the_same_batches_every_epoch(teacher):
    class Fresh(list):
        def __iter__(self):  # new tensors each epoch, as a loader with transforms gives
            return ((x.clone(), y) for x, y in list.__iter__(self))

    with pytest.raises(DataError, match="batch 0 is not the batch of the first epoch"):
        distill(_mlp(8, seed=2), teacher, Fresh(_data()), 2, cache_teacher=True, inplace=True)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 16), torch.zeros(8, dtype=torch.long)))
    with pytest.raises(ConfigError, match="cache_teacher needs data as a sequence"):
        distill(_mlp(8, seed=2), teacher, loader, 1, cache_teacher=True, inplace=True)


def test_keep_best_restores_the_best_epoch():
    model, data = _mlp(8, seed=7), _data()
    snapshots = []
    scores = iter([0.1, 0.7, 0.3, 0.5])
    keep = KeepBest(lambda m: next(scores))
    fit(model, data, 4, lr=1e-2, callbacks=[lambda e, m, logs: snapshots.append(copy.deepcopy(m.state_dict())), keep])
    assert keep.best_epoch == 1 and keep.best_score == 0.7 and keep.scores == [0.1, 0.7, 0.3, 0.5]
    assert not all(torch.equal(v, snapshots[1][k]) for k, v in model.state_dict().items())
    keep.restore(model)
    assert all(torch.equal(v, snapshots[1][k]) for k, v in model.state_dict().items())
    with pytest.raises(DataError, match="no epoch was scored"):
        KeepBest(lambda m: 0.0).restore(model)
    with pytest.raises(DataError, match="score of epoch 0 is NaN"):
        fit(model, data, 1, callbacks=[KeepBest(lambda m: float("nan"))])


def test_kd_on_bundled_digits_cnn_teacher_mlp_student():
    task = make_digits_task(0)
    x, y = task.x_train[:320], task.y_train[:320]
    data = [(x[i : i + 64], y[i : i + 64]) for i in range(0, 320, 64)]
    torch.manual_seed(0)
    teacher = DigitsCNN()
    fit(teacher, data, 10, lr=1e-2)
    student = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    assert 4 * sum(p.numel() for p in student.parameters()) <= sum(p.numel() for p in teacher.parameters())
    logs = report_of(distill(student, teacher.eval(), data, 10, lr=1e-2, inplace=True)).history
    assert logs[-1]["task"] < 0.5 * logs[0]["task"] and logs[-1]["kd"] < logs[0]["kd"]

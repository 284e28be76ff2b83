"""`squeezer.robustness`: noise, feature shift and attacks on a float model and its compressed versions."""

from __future__ import annotations

import json

import pytest
import torch
from torch import Tensor, nn

import squeezer
from squeezer.errors import ConfigError, DataError
from squeezer.robustness import robustness

N, D = 256, 8
NAMES = [f"f{j}" for j in range(D)]


def accuracy(outputs: Tensor, targets: Tensor) -> float:
    return float((outputs.argmax(-1) == targets).float().mean())


@pytest.fixture(scope="module")
def task() -> tuple[nn.Module, list[tuple[Tensor, Tensor]]]:
    """Linearly separable data (label = ``x . w > 0``, one dominant feature, f2, so the feature shift
    has a clear winner) and the best possible model of it: a linear classifier on the true separator,
    logits ``(-x . w, x . w)``, 100% accurate."""
    g = torch.Generator().manual_seed(123)
    x = torch.randn(N, D, generator=g)
    w = torch.tensor([0.3, -0.2, 3.0, 0.1, 0.0, 0.2, -0.1, 0.05])
    y = (x @ w > 0).long()
    model = nn.Sequential(nn.Linear(D, 2)).eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.stack([-w, w]))
        model[0].bias.zero_()
    return model, [(x[i:i + 64], y[i:i + 64]) for i in range(0, N, 64)]


def test_clean_points_and_attack_strength(task) -> None:
    model, batches = task
    out = robustness({"fp32": model}, batches, accuracy, noise_sigmas=(0.0, 0.3), eps=(0.0, 0.3), feature_shift=None)
    clean = out["clean"]["fp32"]
    assert clean == 1.0
    assert out["metric_name"] == "accuracy" and out["n_samples"] == N
    assert out["noise"]["models"]["fp32"][0] == clean
    adv = out["adversarial"]
    assert adv["fgsm"]["fp32"][0] == adv["pgd"]["fp32"][0] == adv["transfer"]["fp32"][0] == clean
    noise, pgd, fgsm = out["noise"]["models"]["fp32"][1], adv["pgd"]["fp32"][1], adv["fgsm"]["fp32"][1]
    assert pgd <= noise and pgd < clean - 0.1, (clean, noise, fgsm, pgd)
    assert pgd <= fgsm + 1e-9
    assert adv["transfer"]["fp32"] == adv["pgd"]["fp32"]  # the source's own transfer is its white-box PGD
    json.dumps(out)


@pytest.mark.parametrize("preset", ["w4g128", "w8a8"])  # fake-quantized weights; and inputs too (STE)
def test_quantized_model_is_attacked_through_ste_and_state_is_restored(task, preset: str) -> None:
    model, batches = task
    model.train()
    q = squeezer.quantize(model, preset)
    out = robustness({"fp32": model, preset: q}, batches, accuracy, noise_sigmas=(0.0,), eps=(0.0, 0.3),
                     feature_shift=None)
    assert out["skipped"] == {}
    assert out["adversarial"]["pgd"][preset][1] < out["clean"][preset] - 0.1
    assert set(out["adversarial"]["transfer"]) == {"fp32", preset}
    assert model.training and all(m.training for m in model.modules())
    model.eval()
    for m in (model, q):
        assert all(p.requires_grad and p.grad is None for p in m.parameters())


def test_packed_model_is_skipped_for_white_box_but_gets_transfer(task) -> None:
    model, batches = task
    packed = squeezer.quantize(model, "w8")
    squeezer.pack(packed, inplace=True)
    out = robustness({"fp32": model, "packed": packed}, batches, accuracy, noise_sigmas=(0.0, 0.1), eps=(0.0, 0.1),
                     feature_shift=None)
    assert "packed" in out["skipped"]["packed"] and "transfer" in out["skipped"]["packed"]
    assert "packed" not in out["adversarial"]["fgsm"] and "packed" not in out["adversarial"]["pgd"]
    assert len(out["adversarial"]["transfer"]["packed"]) == 2
    assert len(out["noise"]["models"]["packed"]) == 2


def test_no_transfer_when_the_source_is_skipped(task) -> None:
    model, batches = task
    packed = squeezer.quantize(model, "w8")
    squeezer.pack(packed, inplace=True)
    out = robustness({"fp32": model, "packed": packed}, batches, accuracy, noise_sigmas=(), eps=(0.1,),
                     feature_shift=None, source="packed")
    assert out["adversarial"]["source"] == "packed" and out["adversarial"]["transfer"] == {}
    assert len(out["adversarial"]["pgd"]["fp32"]) == 1


def test_feature_shift_names_the_features_from_a_generator(task) -> None:
    model, batches = task
    out = robustness({"fp32": model}, (b for b in batches), accuracy, noise_sigmas=(0.0,), eps=(),
                     feature_shift=2.0, feature_names=NAMES)
    shift = out["feature_shift"]
    assert shift["features"] == NAMES and shift["shift_std"] == 2.0
    assert len(shift["models"]["fp32"]) == D
    assert shift["largest_drop"][0]["feature"] == "f2" and shift["largest_drop"][0]["drop"]["fp32"] > 0.2
    assert len(shift["largest_drop"]) == 5
    assert out["noise"]["models"]["fp32"] == [out["clean"]["fp32"]]  # the generator was consumed once, fully


def test_feature_shift_only_for_tabular_inputs() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 2)).eval()
    x, y = torch.randn(8, 3, 4), torch.randint(0, 2, (8,))
    out = robustness({"m": model}, [(x, y)], accuracy, noise_sigmas=(0.1,), eps=(0.1,))
    assert out["feature_shift"] is None and len(out["adversarial"]["fgsm"]["m"]) == 1


def test_bad_inputs_raise_named_errors(task) -> None:
    model, batches = task
    ids = [(torch.randint(0, 10, (4, D)), torch.zeros(4, dtype=torch.long))]
    with pytest.raises(DataError, match="int64 inputs.*floating-point"):
        robustness({"fp32": model}, ids, accuracy)
    with pytest.raises(DataError, match="empty"):
        robustness({"fp32": model}, [], accuracy)
    with pytest.raises(ConfigError, match="feature_names has 2 names"):
        robustness({"fp32": model}, batches, accuracy, feature_names=["a", "b"])
    with pytest.raises(ConfigError, match="source 'w4'"):
        robustness({"fp32": model}, batches, accuracy, source="w4")
    with pytest.raises(ConfigError, match="eps"):
        robustness({"fp32": model}, batches, accuracy, eps=(-0.1,))

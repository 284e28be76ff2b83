"""Quantization-aware training through the recurrence: every matrix of an LSTM / GRU trained on its grid."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import squeezer
from squeezer.config import QuantConfig
from squeezer.qat import convert, prepare_qat, qat_loss, quant_error
from squeezer.quant.core import fake_quantize
from squeezer.quant.spec import PerChannel, QuantSpec

from .recurrent_task import batch, held_out, mse, trained

W3 = QuantConfig(weight=QuantSpec(bits=3, granularity=PerChannel(0)), name="w3")


def _qat(model: nn.Module, learnable_scales: bool, steps: int, lam: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    q = prepare_qat(model, W3, learnable_scales=learnable_scales)
    optimizer = torch.optim.Adam(q.parameters(), 2e-3)
    generator = torch.Generator().manual_seed(2)
    for _ in range(steps):
        x, y = batch(32, generator)
        terms = qat_loss(((q(x) - y) ** 2).mean(), q, lam=lam)
        optimizer.zero_grad()
        terms.loss.backward()
        optimizer.step()
    return convert(q)


@pytest.mark.parametrize("learnable_scales", [False, True], ids=["fixed-grids", "lsq"])
def test_qat_recovers_most_of_the_post_training_loss(learnable_scales: bool) -> None:
    model = trained(nn.LSTM)
    _, test = held_out()
    fp32, ptq = mse(model, test), mse(squeezer.quantize(model, W3, progress=False), test)
    assert ptq > 1.5 * fp32  # 3 bits hurt this model
    q = _qat(model, learnable_scales, steps=60, lam=1e-2)
    recovered = (ptq - mse(q, test)) / (ptq - fp32)
    assert recovered >= 0.5, recovered


def test_every_matrix_trains_and_counts_in_the_penalty() -> None:
    model = trained(nn.GRU)
    q = prepare_qat(model, W3, learnable_scales=True)
    layer = q.rnn
    assert set(layer.matrix_fake_quant) == set(layer.matrix_names)
    assert all(w.requires_grad for w in layer.matrices().values())
    assert set(q.squeezer_qat.learned) == {f"rnn.{n}" for n in layer.matrix_names} | {"head.weight"}
    x, y = batch(8, torch.Generator().manual_seed(3))
    terms = qat_loss(((q(x) - y) ** 2).mean(), q, lam=1.0)
    terms.loss.backward()
    for name, w in layer.matrices().items():
        assert w.grad is not None and w.grad.abs().sum() > 0, name
        assert layer.matrix_fake_quant[name].rel_scale.grad is not None, name
    expected = sum(torch.mean((w - layer.matrix_fake_quant[n](w.detach())) ** 2) for n, w in layer.matrices().items())
    expected = expected + torch.mean((q.head.weight - q.head.weight_fake_quant(q.head.weight.detach())) ** 2)
    torch.testing.assert_close(quant_error(q), expected)


def test_convert_fixes_each_matrix_grid() -> None:
    model = trained(nn.LSTM)
    q = _qat(model, learnable_scales=True, steps=3)
    layer = q.rnn
    assert "matrix_fake_quant" not in layer._modules and not hasattr(q, "squeezer_qat")
    x = batch(4, torch.Generator().manual_seed(4))[0]
    qps = layer.ensured_matrix_qparams()
    for name, w in layer.matrices().items():  # the learned step sizes became the fixed grids
        torch.testing.assert_close(layer.quantized_matrices()[name], fake_quantize(w.detach(), layer.matrix_spec(name), qps[name]))
    with torch.no_grad():
        assert torch.isfinite(q(x)).all()

"""Quantization-aware training (squeezer.qat) and the training loop (squeezer.training)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import squeezer
from squeezer import ConfigError, DataError, ModelError, QuantConfig, QuantSpec
from squeezer.modules import quant_layers
from squeezer.qat import LearnedScaleQuantizer, QATLoss, convert, prepare_qat, qat_loss, quant_error
from squeezer.quant.core import compute_qparams, fake_quantize
from squeezer.training import fit, infer_loss

from .conftest import MLP


def _task(n: int = 256, d: int = 12, classes: int = 3, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A linearly separable-ish classification task in batches of 32."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = (x @ torch.randn(d, classes, generator=g)).argmax(1)
    return [(x[i : i + 32], y[i : i + 32]) for i in range(0, n, 32)]


def _net(seed: int = 1, d: int = 12, classes: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, 32), nn.ReLU(), nn.Linear(32, classes))


def _train(model: nn.Module, data, epochs: int, **kw) -> list[dict[str, float]]:
    torch.manual_seed(2)
    return fit(model, data, epochs, lr=1e-2, **kw)


# ----------------------------------------------------------------------------- LSQ quantizer
@pytest.mark.parametrize("spec", [QuantSpec(bits=4), QuantSpec(bits=3, symmetric=False, granularity="group:5")])
def test_lsq_forward_equals_fake_quantize_and_gradients_follow_the_paper(spec):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 10, generator=g)
    qp = compute_qparams(w, spec)
    qp.scale = qp.scale * 0.8  # some weights clip
    lsq = LearnedScaleQuantizer(spec, qp)
    x = w.clone().requires_grad_(True)
    out = lsq(x)
    assert torch.equal(out.detach(), fake_quantize(w, spec, qp))
    upstream = torch.randn(out.shape, generator=g)
    (out * upstream).sum().backward()

    # the LSQ rules, per block: v = x / s, codes q = round(v) + Z
    from squeezer.quant.blocks import from_blocks, to_blocks

    b = to_blocks(w, spec.granularity)
    s = qp.scale.reshape(-1, 1)
    z = 0 if qp.zero_point is None else qp.zero_point.reshape(-1, 1).float()
    v = b.data / s
    q = torch.round(v) + z
    inside = (q >= spec.qmin) & (q <= spec.qmax)
    d_s = torch.where(inside, torch.round(v) - v, torch.where(q < spec.qmin, spec.qmin - z, spec.qmax - z) * 1.0)
    up = to_blocks(upstream, spec.granularity)
    mask = torch.ones_like(v) if up.mask is None else up.mask.float()
    grad_s = (up.data * d_s * mask).sum(1)
    n = b.data.shape[1]
    g_lsq = 1 / math.sqrt(n * spec.qmax)
    assert torch.allclose(x.grad, from_blocks(inside.float(), w.shape, spec.granularity) * upstream)
    # rel_scale r: s = s0 r, gradient g / s0^2 * dL/dr = g / s0 * dL/ds (plain SGD on r == LSQ on s)
    expected = g_lsq * grad_s / s.reshape(-1)
    assert torch.allclose(lsq.rel_scale.grad.reshape(-1), expected, rtol=1e-4, atol=1e-6)
    assert inside.sum() < inside.numel(), "the test should exercise clipping"


def test_lsq_rejects_codebook_mappings():
    spec = QuantSpec(bits=2, mapping="ternary")
    with pytest.raises(ConfigError, match="uniform"):
        LearnedScaleQuantizer(spec, compute_qparams(torch.randn(4, 4), spec))


# ----------------------------------------------------------------------------- prepare / train
def test_prepare_qat_returns_a_trainable_copy(mlp):
    q = prepare_qat(mlp, "w4g128")
    assert q.training and not any(p.requires_grad is False for p in q.parameters())
    assert all(layer.mode == "simulate" for layer in quant_layers(q).values())
    assert not quant_layers(mlp), "the original model stays float"
    assert q.squeezer_qat.steps == 0 and squeezer.report_of(q).layers


def test_qat_8bit_matches_fp32_training():
    data = _task()
    fp32 = _train(_net(), data, 6)
    qat = _train(prepare_qat(_net(), "w8"), data, 6)
    assert fp32[-1]["loss"] < 0.5 * fp32[0]["loss"], "the task must be learnable"
    assert abs(qat[-1]["loss"] - fp32[-1]["loss"]) < 0.05 * fp32[-1]["loss"] + 2e-3


def test_uniform_weight_ranges_follow_the_weights_until_frozen():
    data = _task()
    q = prepare_qat(_net(), "w4g128", freeze_observers_after=3)
    layer = q[0]
    seen = []
    _train(q, data, 1, step_callbacks=[lambda step, m, logs: seen.append(layer.weight_qparams.scale.clone())])
    assert not torch.equal(seen[0], seen[1]) and not torch.equal(seen[1], seen[2])
    assert all(torch.equal(seen[2], later) for later in seen[3:]), "frozen after 3 steps"
    convert(q, inplace=True)
    assert torch.equal(layer.weight_qparams.scale, seen[2])
    fixed = prepare_qat(_net(), "w4g128", freeze_observers_after=0)
    before = fixed[0].weight_qparams.scale.clone()
    _train(fixed, data, 1)
    assert torch.equal(fixed[0].weight_qparams.scale, before)


def test_static_activation_ranges_move_then_freeze():
    data = _task()
    calib = [x for x, _ in data[:2]]
    q = prepare_qat(_net(), "w8a8-static", calib=calib, freeze_observers_after=2)
    scales = []
    _train(q, data, 1, step_callbacks=[lambda step, m, logs: scales.append(m[2].act_qparams.scale.item())])
    assert scales[0] != scales[1]
    assert len(set(scales[1:])) == 1


def test_lsq_scales_receive_gradients_and_change():
    data = _task()
    cfg = QuantConfig(
        weight=QuantSpec(bits=4, granularity="channel"), activation=QuantSpec(bits=8, symmetric=False, granularity="tensor"),
        activation_mode="static", overrides={r"^2$": {"weight": {"bits": 2, "mapping": "ternary"}}},
    )
    q = prepare_qat(_net(), cfg, calib=[x for x, _ in data[:2]], learnable_scales=True)
    assert q.squeezer_qat.learned == ["0.weight", "0.act", "2.act"], "codebook mappings keep fixed parameters"
    learners = [q[0].weight_fake_quant, q[0].act_fake_quant, q[2].act_fake_quant]
    start = [m.scale.detach().clone() for m in learners]
    x, y = data[0]
    F.cross_entropy(q(x), y).backward()
    for m in learners:
        assert m.rel_scale.grad is not None and m.rel_scale.grad.abs().sum() > 0
    _train(q, data, 2)
    for m, s0 in zip(learners, start):
        assert not torch.allclose(m.scale, s0)


def test_learned_activation_scales_stop_after_freeze():
    data = _task()
    q = prepare_qat(_net(), "w8a8-static", calib=[data[0][0]], learnable_scales=True, freeze_observers_after=2)
    _train(q, data, 1)
    assert not q[0].act_fake_quant.rel_scale.requires_grad and q[0].weight_fake_quant.rel_scale.requires_grad


def test_quant_error_and_its_gradient():
    q = prepare_qat(_net(), "w4g128", freeze_observers_after=0)
    e = quant_error(q)
    e.backward()
    expected = 0.0
    for layer in (q[0], q[2]):
        w = layer.weight.detach()
        fq = fake_quantize(w, layer.weight_spec, layer.weight_qparams)
        expected += float(((w - fq) ** 2).mean())
        assert torch.allclose(layer.weight.grad, 2 * (w - fq) / w.numel())
    assert math.isclose(e.item(), expected, rel_tol=1e-5)


def test_qat_loss_terms_and_lambda_lowers_quant_error():
    data = _task()
    finals = {}
    for lam in (0.0, 5.0):
        q = prepare_qat(_net(), "w2g64", learnable_scales=True)
        logs = _train(q, data, 4, loss_fn=lambda out, y, q=q, lam=lam: qat_loss(F.cross_entropy(out, y), q, lam))
        finals[lam] = quant_error(q).item()
        assert {"loss", "task", "quant"} <= set(logs[-1])
    assert finals[5.0] < 0.8 * finals[0.0]
    x, y = data[0]
    task = F.cross_entropy(q(x), y)
    terms = qat_loss(task, q, 0.5)
    assert isinstance(terms, QATLoss) and torch.allclose(terms.loss, terms.task + 0.5 * terms.quant)
    assert qat_loss(task, q, 0).quant.grad_fn is None


def test_freeze_bn_after_puts_batchnorm_in_eval(cnn):
    g = torch.Generator().manual_seed(3)
    data = [(torch.randn(4, 1, 8, 8, generator=g), torch.randint(0, 10, (4,), generator=g)) for _ in range(5)]
    q = prepare_qat(cnn, "w8", freeze_bn_after=2)
    modes = []
    q.bn.register_forward_pre_hook(lambda m, a: modes.append(m.training))
    fit(q, data, 1)
    assert modes == [True, True, False, False, False] and q.squeezer_qat.bn_frozen
    stats = q.bn.running_mean.clone()
    q.train()
    q(data[0][0])
    assert not q.bn.training and torch.equal(q.bn.running_mean, stats)


def test_step_counter_ignores_eval_and_no_grad(mlp, mlp_batches):
    q = prepare_qat(mlp, "w8")
    q(mlp_batches[0]).sum().backward()
    with torch.no_grad():
        q(mlp_batches[0])
    q.eval()(mlp_batches[0])
    assert q.squeezer_qat.steps == 1


# ----------------------------------------------------------------------------- convert / deploy
@pytest.mark.parametrize(("preset", "learnable"), [("w8a8-static", True), ("w2g64", True), ("w4g128", False), ("ternary", False)])
def test_convert_save_load_pack_after_qat(tmp_path, preset, learnable):
    data = _task(d=40, classes=5)
    q = prepare_qat(MLP(), preset, calib=[x for x, _ in data[:2]], learnable_scales=learnable)
    _train(q, data, 1)
    x = data[0][0]
    q.eval()
    with torch.no_grad():
        trained = q(x)
    convert(q, inplace=True)
    assert not q.training and not hasattr(q, "squeezer_qat")
    assert not any("fake_quant" in name for name, _ in q.named_modules())
    with torch.no_grad():
        converted = q(x)
    assert torch.equal(trained, converted)
    squeezer.save(q, tmp_path / "ckpt")
    again = squeezer.load(tmp_path / "ckpt", MLP)
    with torch.no_grad():
        assert torch.equal(again(x), converted)
    squeezer.pack(again, inplace=True)
    with torch.no_grad():
        assert torch.allclose(again(x), converted, rtol=1e-4, atol=1e-4)
    with pytest.raises(ModelError, match="prepare_qat"):
        convert(q, inplace=True)


def test_convert_refits_tracked_ranges_to_the_final_weights():
    q = prepare_qat(_net(), "w4g128")
    _train(q, _task(), 1)  # the last optimizer step moved the weights after the last forward
    convert(q, inplace=True)
    expected = compute_qparams(q[0].weight, q[0].weight_spec)
    assert torch.equal(q[0].weight_qparams.scale, expected.scale)


def test_conv_qat_exports_to_onnx(tmp_path, cnn):
    g = torch.Generator().manual_seed(4)
    data = [(torch.randn(4, 1, 8, 8, generator=g), torch.randint(0, 10, (4,), generator=g)) for _ in range(3)]
    q = prepare_qat(cnn, "w8", learnable_scales=True)
    fit(q, data, 1)
    convert(q, inplace=True)
    squeezer.export_onnx(q, data[0][0], tmp_path / "m.onnx")
    run = squeezer.runtime.load(tmp_path / "m.onnx")
    with torch.no_grad():
        ref = q(data[0][0])
    assert (run(data[0][0]) - ref).norm() / ref.norm() < 0.02


def test_user_written_loop():
    data = _task()
    qmodel = prepare_qat(_net(), "w4g128", learnable_scales=True)
    optimizer = torch.optim.Adam(qmodel.parameters(), lr=1e-2)
    losses = []
    for _ in range(3):
        for x, y in data:
            terms = qat_loss(F.cross_entropy(qmodel(x), y), qmodel, lam=1e-2)
            optimizer.zero_grad(); terms.loss.backward(); optimizer.step()
            losses.append(terms.task.item())
    convert(qmodel, inplace=True)
    assert sum(losses[-8:]) < 0.6 * sum(losses[:8])
    assert squeezer.report_of(qmodel).layers and squeezer.pack(qmodel, inplace=True)


def test_qat_argument_errors(mlp, mlp_batches):
    with pytest.raises(ConfigError, match="freeze_bn_after"):
        prepare_qat(mlp, "w8", freeze_bn_after=3)
    with pytest.raises(ConfigError, match="freeze_observers_after"):
        prepare_qat(mlp, "w8", freeze_observers_after=-1)
    with pytest.raises(ConfigError, match="freeze_observers_after"):
        prepare_qat(mlp, "kmeans-w4", freeze_observers_after=5)
    with pytest.raises(DataError, match="calib"):
        prepare_qat(mlp, "w8a8-static")
    with pytest.raises(ConfigError, match="lam"):
        qat_loss(torch.tensor(1.0), prepare_qat(mlp, "w8"), -1.0)
    with pytest.raises(ModelError, match="no quantized layers"):
        quant_error(mlp)
    packed = squeezer.quantize(mlp, "w8")
    squeezer.pack(packed, inplace=True)
    with pytest.raises(ModelError, match="packed"):
        quant_error(packed)


# ----------------------------------------------------------------------------- training loop
def test_infer_loss_picks_the_task_loss():
    logits = torch.randn(8, 4)
    labels = torch.randint(0, 4, (8,))
    assert torch.equal(infer_loss(logits, labels)(logits, labels), F.cross_entropy(logits, labels))
    seq = torch.randn(2, 5, 4)
    tokens = torch.randint(0, 4, (2, 5))
    assert torch.allclose(infer_loss(seq, tokens)(seq, tokens), F.cross_entropy(seq.reshape(10, 4), tokens.reshape(10)))
    one = torch.randn(8, 1)
    binary = torch.randint(0, 2, (8,)).float()
    assert torch.allclose(infer_loss(one, binary)(one, binary), F.binary_cross_entropy_with_logits(one[:, 0], binary))
    assert torch.allclose(infer_loss(one[:, 0], binary.long())(one[:, 0], binary.long()),
                          F.binary_cross_entropy_with_logits(one[:, 0], binary))
    values = torch.randn(8, 1)
    assert torch.allclose(infer_loss(one, values)(one, values), F.mse_loss(one, values))


@pytest.mark.parametrize(("outputs", "targets"), [
    (torch.randn(8, 3), torch.randn(8, 3)),            # regression, soft labels or multi-label?
    (torch.randn(8, 3), torch.randn(8)),
    (torch.randn(8), torch.randint(0, 5, (8,))),       # class ids but one logit
    ((torch.randn(8, 3), torch.randn(8, 3)), torch.randint(0, 3, (8,))),
])
def test_infer_loss_refuses_ambiguous_cases(outputs, targets):
    with pytest.raises(ConfigError, match="loss_fn"):
        infer_loss(outputs, targets)


def test_fit_trains_logs_and_calls_back():
    data = _task()
    model = _net().eval()
    epochs, steps = [], []
    history = fit(model, data, 3, lr=1e-2, callbacks=[lambda e, m, logs: epochs.append((e, logs["loss"]))],
                  step_callbacks=[lambda s, m, logs: steps.append(s)])
    assert [h["epoch"] for h in history] == [0, 1, 2] and history[-1]["steps"] == 3 * len(data)
    assert history[-1]["loss"] < history[0]["loss"]
    assert epochs == [(h["epoch"], h["loss"]) for h in history] and steps == list(range(1, 3 * len(data) + 1))
    assert not model.training, "the model's mode is restored"


def test_fit_inputs_as_tuples_and_dicts():
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(3, 1), nn.Linear(2, 1)

        def forward(self, x, z):
            return (self.a(x) + self.b(z)).squeeze(-1)

    g = torch.Generator().manual_seed(0)
    x, z = torch.randn(16, 3, generator=g), torch.randn(16, 2, generator=g)
    y = x.sum(1) - z[:, 0]
    for batch in ([((x, z), y)], [({"x": x, "z": z}, y)]):
        assert fit(Two(), batch, 2)[-1]["loss"] >= 0


def test_fit_errors():
    model = _net()
    with pytest.raises(ConfigError, match="epochs"):
        fit(model, _task(), 0)
    with pytest.raises(DataError, match="re-iterable"):
        fit(model, iter(_task()), 1)
    with pytest.raises(DataError, match="pair"):
        fit(model, [torch.randn(4, 12)], 1)
    with pytest.raises(DataError, match="empty"):
        fit(model, [], 1)
    with pytest.raises(ConfigError, match="loss_fn"):
        fit(model, [(torch.randn(4, 12), torch.randn(4, 3))], 1)
    with pytest.raises(ConfigError, match="'loss'"):
        fit(model, _task(), 1, loss_fn=lambda out, y: {"task": out.sum()})


def test_unconverted_qat_model_cannot_be_deployed(tmp_path):
    import pytest as _pytest

    import squeezer
    from squeezer.qat import prepare_qat

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2)).eval()
    q = prepare_qat(model, "w4g128", learnable_scales=True)
    for action, call in (("save", lambda: squeezer.save(q, tmp_path / "c")), ("pack", lambda: squeezer.pack(q, inplace=True)),
                         ("export_onnx", lambda: squeezer.export_onnx(q, torch.randn(1, 16), tmp_path / "m.onnx"))):
        with _pytest.raises(squeezer.ModelError, match=f"{action}: .*convert"):
            call()
    assert not (tmp_path / "c").exists()

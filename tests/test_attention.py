"""Attention modules: ``nn.MultiheadAttention`` and torch's transformer layers quantized through their projections.

``swap_layers`` rewrites each attention module over child linear layers (``squeezer.modules.attention``): the
same function as torch's (checked option by option), whose projections are then ordinary quantized layers that
run in simulation, packed, after save / load and in the exported files.
"""

from __future__ import annotations

import contextlib
import copy
import re
from collections.abc import Iterator
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import squeezer
from squeezer.modules.attention import UnfusedEncoderLayer, UnfusedMultiheadAttention, unfuse

E, H, L, S, N = 32, 4, 6, 7, 3


def _inputs(shape_first: bool, batched: bool, length: int, dim: int) -> torch.Tensor:
    if not batched:
        return torch.randn(length, dim)
    return torch.randn(N, length, dim) if shape_first else torch.randn(length, N, dim)


PADDING = torch.zeros(N, S, dtype=torch.bool)
PADDING[:, -2:] = True
CAUSAL = nn.Transformer.generate_square_subsequent_mask(L)
OPTIONS = {  # id: (constructor keywords, call: "self" or "cross", forward keywords, batched)
    "plain": ({}, "cross", {}, True),
    "self": ({}, "self", {}, True),
    "batch_first": ({"batch_first": True}, "cross", {}, True),
    "batch_first_self": ({"batch_first": True}, "self", {}, True),
    "kdim_vdim": ({"kdim": 12, "vdim": 20}, "cross", {}, True),
    "no_bias": ({"bias": False}, "cross", {}, True),
    "add_bias_kv": ({"add_bias_kv": True}, "cross", {"key_padding_mask": PADDING}, True),
    "add_zero_attn": ({"add_zero_attn": True}, "cross", {"attn_mask": torch.randn(L, S)}, True),
    "key_padding_mask_bool": ({}, "cross", {"key_padding_mask": PADDING}, True),
    "key_padding_mask_float": ({}, "cross", {"key_padding_mask": torch.zeros(N, S).masked_fill(PADDING, -1e4)}, True),
    "attn_mask_bool": ({}, "cross", {"attn_mask": torch.rand(L, S) > 0.7, "need_weights": False}, True),
    "attn_mask_float_3d": ({}, "cross", {"attn_mask": torch.randn(N * H, L, S), "average_attn_weights": False}, True),
    "both_masks": ({"add_bias_kv": True, "add_zero_attn": True}, "cross",
                   {"attn_mask": torch.randn(L, S), "key_padding_mask": PADDING.float() * -1e4}, True),
    "is_causal": ({}, "self", {"attn_mask": CAUSAL, "is_causal": True, "need_weights": False}, True),
    "is_causal_weights": ({}, "self", {"attn_mask": CAUSAL, "is_causal": True}, True),
    "per_head_weights": ({"batch_first": True}, "cross", {"average_attn_weights": False}, True),
    "unbatched": ({}, "cross", {"key_padding_mask": PADDING[0]}, False),
    "unbatched_batch_first": ({"batch_first": True}, "self", {"average_attn_weights": False}, False),
}


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("state", ["train", "eval", "inference"])
def test_unfused_attention_equals_torch(option, state):
    """Output and attention weights equal ``nn.MultiheadAttention``'s, in training (no dropout), in eval with
    gradients and under ``no_grad`` (where torch takes its native fused path when it can)."""
    torch.manual_seed(0)
    kwargs, call, forward_kwargs, batched = OPTIONS[option]
    mha = nn.MultiheadAttention(E, H, **kwargs).train(state == "train")
    unfused = UnfusedMultiheadAttention.from_float(copy.deepcopy(mha)).train(state == "train")
    first = kwargs.get("batch_first", False)
    q = _inputs(first, batched, L, E)
    k, v = (q, q) if call == "self" else (_inputs(first, batched, S, kwargs.get("kdim", E)),
                                          _inputs(first, batched, S, kwargs.get("vdim", E)))
    with torch.set_grad_enabled(state != "inference"):
        want, want_weights = mha(q, k, v, **forward_kwargs)
        got, got_weights = unfused(q, k, v, **forward_kwargs)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
    assert (got_weights is None) == (want_weights is None)
    if want_weights is not None:
        torch.testing.assert_close(got_weights, want_weights, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("need_weights", [True, False])
def test_unfused_attention_dropout_equals_torch(need_weights):
    """In training, attention dropout draws the same random numbers as torch's (weights returned after dropout)."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, dropout=0.3)
    unfused = UnfusedMultiheadAttention.from_float(copy.deepcopy(mha))
    q, k = torch.randn(L, N, E), torch.randn(S, N, E)
    outs = []
    for module in (mha, unfused):
        torch.manual_seed(1)
        outs.append(module(q, k, k, need_weights=need_weights))
    torch.testing.assert_close(outs[1][0], outs[0][0])
    if need_weights:
        torch.testing.assert_close(outs[1][1], outs[0][1])
    assert not torch.equal(outs[0][0], mha.eval()(q, k, k, need_weights=need_weights)[0])  # dropout did act


def test_unfused_attention_holds_the_same_parameters():
    mha = nn.MultiheadAttention(E, H)
    unfused = UnfusedMultiheadAttention.from_float(mha)
    assert unfused.in_proj.weight is mha.in_proj_weight and unfused.out_proj is mha.out_proj
    separate = UnfusedMultiheadAttention.from_float(nn.MultiheadAttention(E, H, kdim=12, vdim=20))
    shapes = [tuple(p.weight.shape) for p in (separate.q_proj, separate.k_proj, separate.v_proj)]
    assert shapes == [(E, E), (E, 12), (E, 20)]


def _transformers() -> dict[str, tuple[nn.Module, tuple, dict]]:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, H, 64, dropout=0.0, batch_first=True)
    pre_norm = nn.TransformerEncoderLayer(E, H, 64, dropout=0.0, batch_first=True, norm_first=True, activation="gelu")
    x, memory = torch.randn(N, L, E), torch.randn(N, S, E)
    padding = torch.zeros(N, L, dtype=torch.bool)
    padding[1:, -2:] = True
    return {
        "encoder_layer": (layer, (x,), {"src_key_padding_mask": padding}),
        "encoder_layer_norm_first": (pre_norm, (x,), {"src_mask": CAUSAL, "is_causal": True}),
        "encoder_stack": (nn.TransformerEncoder(copy.deepcopy(layer), 2), (x,), {"src_key_padding_mask": padding}),
        "decoder_layer": (nn.TransformerDecoderLayer(E, H, 64, dropout=0.0, batch_first=True), (x, memory),
                          {"tgt_mask": CAUSAL, "tgt_is_causal": True}),
        "transformer": (nn.Transformer(E, H, 1, 1, 64, dropout=0.0, batch_first=True), (memory, x),
                        {"tgt_mask": CAUSAL, "src_key_padding_mask": torch.zeros(N, S, dtype=torch.bool)}),
    }


@pytest.mark.parametrize("name", list(_transformers()))
def test_unfuse_keeps_transformer_function(name):
    """``unfuse`` inside a model: no ``nn.MultiheadAttention`` is left, every encoder layer takes the standard
    path, and outputs equal torch's fast path (under ``no_grad``, padded positions aside: torch's nested-tensor
    path returns zeros there)."""
    model, args, kwargs = _transformers()[name]
    wrapped = nn.ModuleDict({"m": model}).eval()
    unfused = unfuse(copy.deepcopy(wrapped)).eval()
    assert not any(isinstance(m, nn.MultiheadAttention) for m in unfused.modules())
    layers = [m for m in unfused.modules() if isinstance(m, nn.TransformerEncoderLayer)]
    assert all(isinstance(m, UnfusedEncoderLayer) for m in layers)
    with torch.no_grad():
        want, got = wrapped["m"](*args, **kwargs), unfused["m"](*args, **kwargs)
    keep = ~kwargs["src_key_padding_mask"] if name == "encoder_stack" else torch.ones(want.shape[:2], dtype=torch.bool)
    torch.testing.assert_close(got[keep], want[keep], atol=1e-5, rtol=1e-5)
    before = [type(m) for m in unfused.modules()]
    assert unfuse(unfused) is unfused and [type(m) for m in unfused.modules()] == before  # a second call: no change


def test_subclass_of_encoder_layer_keeps_its_forward():
    class Scaled(nn.TransformerEncoderLayer):
        def forward(self, src, *args, **kwargs):
            return 2 * super().forward(src, *args, **kwargs)

    torch.manual_seed(0)
    model = nn.Sequential(Scaled(E, H, 64, dropout=0.0, batch_first=True)).eval()
    x = torch.randn(N, L, E)
    unfused = unfuse(copy.deepcopy(model))
    assert isinstance(unfused[0], Scaled) and isinstance(unfused[0], UnfusedEncoderLayer)
    with torch.no_grad():
        torch.testing.assert_close(unfused(x), model(x), atol=1e-5, rtol=1e-5)


class AttentionModel(nn.Module):
    """Self-attention (packed ``in_proj``), then cross-attention with other key / value sizes (``q/k/v_proj``)."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(E, H, batch_first=True)
        self.to_k, self.to_v = nn.Linear(E, 24), nn.Linear(E, 16)
        self.cross = nn.MultiheadAttention(E, H, kdim=24, vdim=16, batch_first=True)
        self.head = nn.Linear(E, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.attn(x, x, x, need_weights=False)[0]
        return self.head(self.cross(y, self.to_k(x), self.to_v(x))[0])


class EncoderModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(E, H, 64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2)
        self.head = nn.Linear(E, 8)

    def forward(self, x: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.encoder(x, src_key_padding_mask=padding))


class DecoderModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.decoder = nn.TransformerDecoder(nn.TransformerDecoderLayer(E, H, 64, dropout=0.0, batch_first=True), 1)
        self.head = nn.Linear(E, 8)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        return self.head(self.decoder(x, memory))


def _layer_names(prefix: str, parts: tuple[str, ...]) -> list[str]:
    return [f"{prefix}.{p}" for p in parts]


MODELS = {  # name: (class, inputs, reported layers)
    "attention": (AttentionModel, lambda: (torch.randn(N, L, E),),
                  ["attn.in_proj", "attn.out_proj", "to_k", "to_v", "cross.q_proj", "cross.k_proj", "cross.v_proj",
                   "cross.out_proj", "head"]),
    "encoder": (EncoderModel, lambda: (torch.randn(N, L, E),),
                [*(n for i in range(2) for n in _layer_names(f"encoder.layers.{i}", (
                    "self_attn.in_proj", "self_attn.out_proj", "linear1", "linear2"))), "head"]),
    "decoder": (DecoderModel, lambda: (torch.randn(N, L, E), torch.randn(N, S, E)),
                [*_layer_names("decoder.layers.0", ("self_attn.in_proj", "self_attn.out_proj", "multihead_attn.in_proj",
                                                    "multihead_attn.out_proj", "linear1", "linear2")), "head"]),
}
PRESETS = ["w8", "w8a8", "w4g128"]


def _model(name: str) -> tuple[nn.Module, tuple]:
    cls, inputs, _ = MODELS[name]
    torch.manual_seed(0)
    return cls().eval(), inputs()


def _quantized(model: nn.Module, preset: str, args: tuple, layer: str | None = None) -> nn.Module:
    """``model`` quantized with ``preset``; ``layer`` (when given) at 2 bits instead."""
    config = squeezer.PRESETS[preset]
    if layer is not None:
        config = replace(config, overrides={f"^{re.escape(layer)}$": {"weight": {"bits": 2}}, **config.overrides})
    return squeezer.quantize(model, config, calib=[args], progress=False)


def _run(model: nn.Module, args: tuple) -> torch.Tensor:
    with torch.no_grad():
        return model(*args)


@contextlib.contextmanager
def _fused_attention_refused() -> Iterator[None]:
    """torch's fused attention kernels raise while inside: a model that reaches one fails."""
    def refuse(*args, **kwargs):
        raise AssertionError("a fused attention kernel was called")

    with pytest.MonkeyPatch.context() as patch:
        for op in ("_native_multi_head_attention", "_transformer_encoder_layer_fwd", "_nested_tensor_from_mask"):
            patch.setattr(torch, op, refuse)
        yield


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("name", list(MODELS))
def test_each_reported_attention_layer_runs(name, preset):
    """Every projection is reported quantized, and changing one layer's quantization (2-bit weights) changes the
    output of the simulated and of the packed model (under ``no_grad`` in eval, where torch's fused paths would
    read float weights; they are refused here): a reported layer is a running layer."""
    model, args = _model(name)
    q = _quantized(model, preset, args)
    report = squeezer.report_of(q)
    assert [layer.name for layer in report.layers] == MODELS[name][2]
    assert all(s.kind in ("LayerNorm", "UnfusedMultiheadAttention") for s in report.skipped), report.skipped
    others = {layer.name: _quantized(model, preset, args, layer.name) for layer in report.layers}
    ref = _run(model, args)
    with _fused_attention_refused():
        base, base_packed = _run(q, args), _run(squeezer.pack(q), args)
        assert (base_packed - ref).norm() / ref.norm() < 0.1
        for layer, other in others.items():
            assert not torch.equal(_run(other, args), base), layer
            assert not torch.equal(_run(squeezer.pack(other), args), base_packed), layer


def test_padded_batch_runs_quantized_weights():
    """A padding mask in eval under ``no_grad`` (torch's nested-tensor and fused encoder path) runs the
    quantized layers too."""
    model, (x,) = _model("encoder")
    padding = torch.zeros(N, L, dtype=torch.bool)
    padding[1:, -2:] = True
    q = _quantized(model, "w4g128", (x,))
    ref = _run(model, (x, padding))
    with _fused_attention_refused():
        sim, out = _run(q, (x, padding)), _run(squeezer.pack(q), (x, padding))
    keep = ~padding
    assert 0 < (sim[keep] - ref[keep]).norm() / ref[keep].norm() < 0.1
    torch.testing.assert_close(out[keep], sim[keep], atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("name", list(MODELS))
def test_save_load_rebuilds_attention_models(tmp_path, name):
    """``squeezer.load`` from the user's factory (plain torch modules) rebuilds the same model, bit for bit."""
    model, args = _model(name)
    packed = squeezer.pack(_quantized(model, "w8a8", args))
    squeezer.save(packed, tmp_path / "ckpt")
    loaded = squeezer.load(tmp_path / "ckpt", MODELS[name][0], packed=True)
    assert torch.equal(_run(loaded, args), _run(packed, args))
    simulated = squeezer.load(tmp_path / "ckpt", MODELS[name][0])
    assert (_run(simulated, args) - _run(packed, args)).norm() / _run(packed, args).norm() < 0.01


ONNX_TOLERANCE = {"w8": 0.02, "w4g128": 0.03, "w8a8": 1e-4}  # as tests/test_onnx.py: ORT's MatMulNBits quantizes inputs


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("name", list(MODELS))
def test_onnx_export_runs_in_onnxruntime(tmp_path, name, preset):
    model, args = _model(name)
    q = _quantized(model, preset, args)
    path = tmp_path / "m.onnx"
    report = squeezer.export(q, args, path)
    assert set(report.layers) == set(MODELS[name][2]) and not report.warnings
    run = squeezer.runtime.load(path)
    for batch in (args, tuple(torch.cat([a, a[:1]]) for a in args)):  # another batch size
        ref = _run(q, batch)
        assert (run(*batch) - ref).norm() / ref.norm() < ONNX_TOLERANCE[preset]


@pytest.mark.slow
@pytest.mark.parametrize("suffix", ["tflite", "pte"])
def test_attention_exports_to_edge_runtimes(tmp_path, suffix):
    """TFLite (LiteRT) and ExecuTorch (XNNPACK) take the w8a8 attention model; their outputs follow squeezer's."""
    model, args = _model("attention")
    q = _quantized(model, "w8a8", args)
    path = tmp_path / f"m.{suffix}"
    report = squeezer.export(q, args, path)
    assert set(report.layers) == set(MODELS["attention"][2])
    ref = _run(q, args)
    assert (squeezer.runtime.load(path)(*args) - ref).norm() / ref.norm() < 0.02


class LinearAttentionModel(nn.Module):
    """``AttentionModel``'s self-attention built from ``nn.Linear`` layers and ``scaled_dot_product_attention``."""

    def __init__(self, source: AttentionModel) -> None:
        super().__init__()
        self.qkv, self.out = nn.Linear(E, 3 * E), copy.deepcopy(source.attn.out_proj)
        self.head = copy.deepcopy(source.head)
        with torch.no_grad():
            self.qkv.weight.copy_(source.attn.in_proj_weight)
            self.qkv.bias.copy_(source.attn.in_proj_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, _ = x.shape
        heads = self.qkv(x).reshape(n, length, 3, H, E // H).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(heads[0], heads[1], heads[2])
        return self.head(self.out(y.transpose(1, 2).reshape(n, length, E)))


class SelfAttentionModel(nn.Module):
    def __init__(self, source: AttentionModel) -> None:
        super().__init__()
        self.attn, self.head = copy.deepcopy(source.attn), copy.deepcopy(source.head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attn(x, x, x, need_weights=False)[0])


@pytest.mark.parametrize("preset", ["w8a8", "w4g128"])
def test_attention_error_in_the_band_of_linear_layers(preset):
    """Goal: a ``nn.MultiheadAttention`` model's error is that of the same function built from ``nn.Linear``."""
    source, _ = _model("attention")
    calib = [torch.randn(8, 16, E) for _ in range(2)]
    test = torch.randn(16, 16, E)
    errors = {}
    for kind, model in (("mha", SelfAttentionModel(source).eval()), ("linear", LinearAttentionModel(source).eval())):
        ref = _run(model, (test,))
        packed = squeezer.pack(squeezer.quantize(model, preset, calib=calib, progress=False))
        errors[kind] = ((_run(packed, (test,)) - ref).norm() / ref.norm()).item()
    assert errors["mha"] > 0 and errors["mha"] == pytest.approx(errors["linear"], rel=0.05), errors

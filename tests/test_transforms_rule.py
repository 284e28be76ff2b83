"""One rule for every public transform: a new model unless ``inplace=True`` (then the same object),
and the report goes with the returned model (``squeezer.report_of``)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

import squeezer
from squeezer.distill import distill
from squeezer.kernels import PackReport
from squeezer.lowrank import low_rank
from squeezer.prune import PruneReport, gradual_prune, magnitude_prune, nm_prune, prune_channels, prune_features, prune_heads
from squeezer.qat import convert, prepare_qat
from squeezer.search import auto_quantize

transformers = pytest.importorskip("transformers")


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2)).eval()


def _bert() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=1,
                                     vocab_size=50)
    return transformers.BertModel(config).eval()


X = torch.randn(64, 16, generator=torch.Generator().manual_seed(1))
DATA = list(zip(X.split(16), torch.randint(0, 2, (64,), generator=torch.Generator().manual_seed(2)).split(16)))
CALIB = [x for x, _ in DATA]

# name -> (model factory, transform(model, **kwargs))
TRANSFORMS: dict[str, tuple[Callable[[], nn.Module], Callable[..., nn.Module]]] = {
    "quantize": (_mlp, lambda m, **kw: squeezer.quantize(m, "w8", CALIB, progress=False, **kw)),
    "compress": (_mlp, lambda m, **kw: squeezer.compress(m, [{"prune": {"kind": "nm"}}, {"quantize": {"preset": "w8"}}],
                                                         DATA, **kw)),
    "pack": (lambda: squeezer.quantize(_mlp(), "w8", progress=False), lambda m, **kw: squeezer.pack(m, **kw)),
    "search.auto_quantize": (_mlp, lambda m, **kw: auto_quantize(m, CALIB, 6.0, formats=("w8", "w4g128"),
                                                                 progress=False, **kw)),
    "qat.prepare_qat": (_mlp, lambda m, **kw: prepare_qat(m, "w8", **kw)),
    "qat.convert": (lambda: prepare_qat(_mlp(), "w8", learnable_scales=True), lambda m, **kw: convert(m, **kw)),
    "prune.magnitude_prune": (_mlp, lambda m, **kw: magnitude_prune(m, 0.5, **kw)),
    "prune.nm_prune": (_mlp, lambda m, **kw: nm_prune(m, 2, 4, **kw)),
    "prune.prune_channels": (_mlp, lambda m, **kw: prune_channels(m, 0.5, **kw)),
    "prune.prune_features": (_mlp, lambda m, **kw: prune_features(m, 0.25, **kw)),
    "prune.prune_heads": (_bert, lambda m, **kw: prune_heads(m, 0.5, **kw)),
    "prune.gradual_prune": (_mlp, lambda m, **kw: gradual_prune(m, 0.5, 2, lambda model: None, **kw)),
    "lowrank.low_rank": (_mlp, lambda m, **kw: low_rank(m, budget=0.5, **kw)),
    "distill.distill": (_mlp, lambda m, **kw: distill(m, _mlp(), DATA, 1, lr=1e-2, **kw)),
}


def _snapshot(model: nn.Module) -> tuple[list[type], dict[str, torch.Tensor]]:
    return [type(m) for m in model.modules()], {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_transform_copies_by_default(name):
    make, transform = TRANSFORMS[name]
    model = make()
    types, state = _snapshot(model)
    out = transform(model)
    assert out is not model
    after_types, after_state = _snapshot(model)
    assert after_types == types, f"{name} changed the input's modules"
    assert after_state.keys() == state.keys() and all(torch.equal(after_state[k], v) for k, v in state.items()), \
        f"{name} changed the input's tensors"
    squeezer.report_of(out)  # every transform's model carries a report (its own or its input's)


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_transform_inplace_returns_the_same_object(name):
    make, transform = TRANSFORMS[name]
    model = make()
    assert transform(model, inplace=True) is model


def test_reports_accumulate_and_are_found_by_type():
    pruned = magnitude_prune(_mlp(), 0.5)
    packed = squeezer.pack(squeezer.quantize(pruned, "w8", progress=False))
    assert isinstance(squeezer.report_of(packed), PackReport)
    assert squeezer.report_of(packed, squeezer.QuantReport).layers
    assert squeezer.report_of(packed, PruneReport).method == "magnitude-layer"
    with pytest.raises(squeezer.ModelError, match="carries no report"):
        squeezer.report_of(_mlp())

"""The algorithm framework: presets with suffixes, stages, statistics, clipping search."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import squeezer
from squeezer import ConfigError, DataError
from squeezer.algorithms import ALGORITHMS, LayerStats, stages
from squeezer.algorithms.clip_search import best_clip_qparams, block_output_error
from squeezer.algorithms.pipeline import collect_stats
from squeezer.algorithms.stats import input_rows
from squeezer.resolve import resolve_config
from squeezer.modules import quant_layers
from squeezer.quant.core import compute_qparams, fake_quantize
from squeezer.quant.metrics import sqnr_db
from squeezer.quant.spec import QuantSpec


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.up = nn.Linear(d, 2 * d)
        self.down = nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


class Stacked(nn.Module):
    def __init__(self, d: int = 64, n: int = 3) -> None:
        super().__init__()
        self.inp = nn.Linear(32, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(n))
        self.out = nn.Linear(d, 8)

    def forward(self, x):
        h = self.inp(x)
        for block in self.blocks:
            h = block(h)
        return self.out(h)


def test_stages_group_blocks_in_order():
    model = Stacked()
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert stages(model, names) == [["inp"], ["blocks.0.up", "blocks.0.down"], ["blocks.1.up", "blocks.1.down"],
                                     ["blocks.2.up", "blocks.2.down"], ["out"]]
    flat = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    assert stages(flat, ["0", "1"]) == [["0"], ["1"]]


def test_collect_stats_stops_early_and_matches_inputs():
    torch.manual_seed(0)
    model = Stacked().eval()
    q = squeezer.quantize(model, "w8")
    layers = quant_layers(q)
    calls = []
    q.out.register_forward_hook(lambda *a: calls.append(1))
    x = torch.randn(5, 32)
    stats = collect_stats(q, {"blocks.0.up": layers["blocks.0.up"]}, [x, x])
    assert not calls, "the forward stopped before the last layer"
    with torch.no_grad():
        h = q.inp(x)
    s = stats["blocks.0.up"]
    assert s.count == 10
    assert torch.allclose(s.xtx, 2 * (h.double().T @ h.double()), rtol=1e-5)
    assert torch.allclose(s.mean(), h.mean(0), atol=1e-5)


def test_conv_input_rows_match_weight_columns():
    conv = nn.Conv2d(3, 4, 3, padding=1, groups=1)
    x = torch.randn(2, 3, 5, 5)
    rows = input_rows(conv, x)
    assert rows.shape == (2 * 25, 27)
    y = (rows @ conv.weight.reshape(4, -1).T + conv.bias).reshape(2, 25, 4).permute(0, 2, 1).reshape(2, 4, 5, 5)
    assert torch.allclose(y, conv(x), atol=1e-5)


def test_preset_suffixes():
    cfg = resolve_config("w4g128-clip")
    assert cfg.algorithm == "clip" and cfg.weight == squeezer.PRESETS["w4g128"].weight and cfg.name == "w4g128-clip"
    with pytest.raises(ConfigError, match="preset 'w4g128-magic': unknown algorithm 'magic'"):
        resolve_config("w4g128-magic")
    assert {"rtn", "clip"} <= set(ALGORITHMS)


def test_algorithm_needs_calibration(mlp):
    with pytest.raises(DataError, match="algorithm 'clip' needs calibration"):
        squeezer.quantize(mlp, "w4g128-clip")
    with pytest.raises(ConfigError, match="unknown algorithm 'nope'"):
        squeezer.quantize(mlp, squeezer.QuantConfig(algorithm="nope"), calib=[torch.randn(2, 40)])


def test_clip_search_never_worse_than_minmax_per_block():
    torch.manual_seed(0)
    x = torch.randn(512, 96) @ torch.randn(96, 96)
    w = torch.distributions.StudentT(3).sample((32, 96))
    stats = LayerStats(96)
    stats.update(x)
    h = stats.hessian()
    for spec in (QuantSpec(3, symmetric=False, granularity="group:40"), QuantSpec(4, granularity="channel")):
        base = block_output_error(w, fake_quantize(w, spec, compute_qparams(w, spec)), h, spec)
        best = block_output_error(w, fake_quantize(w, spec, best_clip_qparams(w, spec, h)), h, spec)
        assert (best <= base + 1e-9).all() and best.sum() < 0.9 * base.sum()


def test_clip_preset_beats_rtn_end_to_end():
    torch.manual_seed(0)
    model = Stacked().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.copy_(torch.distributions.StudentT(3).sample(m.weight.shape) * 0.05)
    calib = [torch.randn(64, 32) for _ in range(4)]
    x = torch.randn(256, 32)
    with torch.no_grad():
        ref = model(x)
        scores = {p: sqnr_db(ref, squeezer.quantize(model, p, calib=calib)(x)) for p in ("w3g128", "w3g128-clip")}
    assert scores["w3g128-clip"] > scores["w3g128"] + 0.5


def test_input_scale_is_function_preserving_and_saved(tmp_path, mlp):
    q = squeezer.quantize(mlp, "w8")
    s = torch.rand(40) + 0.5
    with torch.no_grad():
        q.fc1.weight.mul_(s)
    q.fc1.input_scale = 1 / s
    q.fc1.calibrate_weight()
    x = torch.randn(3, 40)
    squeezer.modules.set_mode(q, "float")
    assert torch.allclose(q(x), mlp(x), atol=1e-5)
    squeezer.modules.set_mode(q, "simulate")
    squeezer.save(q, tmp_path / "c")
    loaded = squeezer.load(tmp_path / "c", model=type(mlp))
    assert torch.equal(loaded(x), q(x)) and torch.equal(loaded.fc1.input_scale, q.fc1.input_scale)


def test_layer_stats_chunking_and_uniform_sample():
    """Statistics and the row sample do not depend on how the rows arrive; the sample is a
    uniform subset (bottom-k keys) of every row seen, in arrival order."""
    torch.manual_seed(0)
    rows = torch.randn(3000, 24)
    whole, pieces = LayerStats(24, max_rows=500), LayerStats(24, max_rows=500)
    whole._chunk = 3000
    whole.update(rows)
    for part in rows.split([7, 993, 1, 1999]):
        pieces.update(part)
    assert torch.equal(whole.sample, pieces.sample) and whole.sample.shape == (500, 24)
    assert torch.allclose(whole.xtx, pieces.xtx) and torch.allclose(whole.xtx, rows.double().T @ rows.double())
    first_col = rows[:, 0].tolist()
    where = [first_col.index(v) for v in pieces.sample[:, 0].tolist()]
    assert where == sorted(where), "rows keep their arrival order"
    assert 0.35 < sum(w >= 1500 for w in where) / 500 < 0.65, "late rows are not favoured over early ones"


def test_stage_forwards_build_no_autograd_graph():
    """Calibration forwards of the pipeline run without gradients even when the caller has them on
    (an autograd graph would keep every activation of the prefix alive)."""
    torch.manual_seed(0)
    q = squeezer.quantize(Stacked().eval(), "w8")
    layers = quant_layers(q)
    seen = []
    q.inp.register_forward_hook(lambda m, a, out: seen.append(out.requires_grad))
    assert torch.is_grad_enabled()
    collect_stats(q, {"blocks.0.up": layers["blocks.0.up"]}, [torch.randn(5, 32)])
    assert seen == [False]


@pytest.mark.parametrize("algorithm,kept", [("gptq", 512), ("smoothquant", 2048), ("smoothquant+gptq", 2048)])
def test_stage_statistics_keep_the_rows_the_algorithm_needs(monkeypatch, algorithm, kept):
    """Hessian-only algorithms keep 512 sampled rows per layer (for the report's output error), row searches 2048."""
    import squeezer.algorithms.pipeline as pipeline

    seen: list[int] = []
    original = pipeline.collect_stats

    def spy(*args, **kwargs):
        stats = original(*args, **kwargs)
        seen.extend(s.sample.shape[0] for s in stats.values() if s is not None)
        return stats

    monkeypatch.setattr(pipeline, "collect_stats", spy)
    torch.manual_seed(0)
    preset = "w8a8-" + algorithm
    q = squeezer.quantize(Stacked().eval(), preset, calib=[torch.randn(3000, 32)], progress=False)
    assert seen and set(seen) == {kept}
    assert all(r.output_error is not None for r in squeezer.report_of(q).layers)

"""Kernel choice as explicit state: the rule, robust timing, pins, the record in checkpoints, and
caches that live only where ``SQUEEZER_CACHE_DIR`` (read at each call) says."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import squeezer
from squeezer.cache import cache_dir
from squeezer.kernels import PATHS, packed_kernels, select
from squeezer.search import measure_sensitivity
from tests.test_kernels import _problem

W8A8_RULE = ["fbgemm_dynamic", "int_mm", "int_mm", "int_mm"]


@pytest.fixture(autouse=True)
def vnni(monkeypatch):
    """The paths eligible on a CPU with AVX-512 VNNI (fbgemm included), whatever this one has."""
    monkeypatch.setattr(torch.cpu, "_is_vnni_supported", lambda: True)


def _no_timing(*args, **kwargs):
    raise AssertionError("the rule must not time anything")


def _fake_timer(seconds: dict[str, float], calls: list):
    def time_paths(paths, states, x, repeats=select.REPEATS):
        calls.append([p.name for p in paths])
        return {p.name: seconds[p.name] for p in paths}
    return time_paths


def test_cache_dir_is_read_at_call_time(tmp_path, monkeypatch):
    monkeypatch.setenv("SQUEEZER_CACHE_DIR", str(tmp_path / "set-after-import"))
    assert cache_dir("kernels") == tmp_path / "set-after-import" / "kernels"
    monkeypatch.delenv("SQUEEZER_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir("sensitivity") == tmp_path / "xdg" / "squeezer" / "sensitivity"


def test_rule_is_deterministic_and_never_times(mlp, monkeypatch):
    monkeypatch.setattr(select, "time_paths", _no_timing)
    q = squeezer.quantize(mlp, "w8a8")
    first, second = packed_kernels(squeezer.pack(q)), packed_kernels(squeezer.pack(q, kernels="rule"))
    assert first == second
    # fc1 (K = 40): fbgemm for one row, _int_mm beyond; fc2 / head (K = 300, not a multiple of 8): no _int_mm
    assert first == {"fc1": W8A8_RULE, "fc2": ["fbgemm_dynamic"] + ["dequant_matmul"] * 3,
                     "head": ["fbgemm_dynamic"] + ["dequant_matmul"] * 3}
    problem, _, _ = _problem("w8", 384, 1536)  # weight-only int8 of a small layer: fp32 GEMM for m > 128
    assert [select.rule_choice(problem, PATHS, b) for b in range(4)] == ["int8_weight_bf16"] * 3 + ["dequant_matmul"]
    problem, _, _ = _problem("w8", 2048, 1024)
    assert [select.rule_choice(problem, PATHS, b) for b in range(4)] == ["int8_weight_bf16"] * 4
    problem, _, _ = _problem("w4g128", 64, 256)
    assert [select.rule_choice(problem, PATHS, b) for b in range(4)] == ["int4_weight_bf16"] * 4


def test_timed_choice_keeps_the_rule_unless_clearly_faster(monkeypatch):
    problem, _, _ = _problem("w8a8", 48, 96)
    calls: list = []
    close = {"int_mm": 1.0, "fbgemm_dynamic": 1.0, "int8_codes_bf16": 1.0, "dequant_matmul": 0.9}  # 10 % faster: within the margin
    monkeypatch.setattr(select, "time_paths", _fake_timer(close, calls))
    assert select.timed_choice(problem, PATHS) == W8A8_RULE and len(calls) == 4
    problem, _, _ = _problem("w8a8", 48, 104)  # another shape: another key, timed afresh
    clear = {"int_mm": 1.0, "fbgemm_dynamic": 1.0, "int8_codes_bf16": 1.0, "dequant_matmul": 0.5}
    monkeypatch.setattr(select, "time_paths", _fake_timer(clear, calls))
    assert select.timed_choice(problem, PATHS) == ["dequant_matmul"] * 4


def test_time_paths_interleaves_the_candidates(monkeypatch):
    problem, _, _ = _problem("w8a8", 48, 96)
    order: list[str] = []
    paths = [p for p in PATHS if p.eligible(problem, 8)]
    for p in paths:
        monkeypatch.setattr(p, "run", lambda state, x, name=p.name: order.append(name))
    seconds = select.time_paths(paths, {p.name: None for p in paths}, torch.randn(8, 96), repeats=3)
    assert set(seconds) == {"int_mm", "int8_codes_bf16", "dequant_matmul"}
    assert order[6:] == ["int_mm", "int8_codes_bf16", "dequant_matmul"] * 3, "after the warm-ups, rounds alternate the paths"


def test_cache_key_covers_the_activation_spec(squeezer_cache, monkeypatch):
    """``w8a8`` and ``w8a8-asym`` share weights, mode and eligible paths: only the activation spec
    tells their choices apart, so the second is timed too and gets its own entries."""
    calls: list = []
    monkeypatch.setattr(select, "time_paths", _fake_timer({"int_mm": 1.0, "fbgemm_dynamic": 1.0,
                                                           "dequant_matmul": 2.0}, calls))
    before = set((squeezer_cache / "kernels").glob("*.json"))
    sym, _, _ = _problem("w8a8", 32, 152)
    asym, _, _ = _problem("w8a8-asym", 32, 152)
    assert [p.name for p in PATHS if p.eligible(sym, 1)] == [p.name for p in PATHS if p.eligible(asym, 1)]
    select.timed_choice(sym, PATHS)
    select.timed_choice(asym, PATHS)
    assert len(calls) == 8
    assert len(set((squeezer_cache / "kernels").glob("*.json")) - before) == 8
    select.timed_choice(asym, PATHS)
    assert len(calls) == 8, "the second time comes from the disk cache"


def test_pins_choose_paths_per_layer_or_per_bucket(mlp, monkeypatch):
    monkeypatch.setattr(select, "time_paths", _no_timing)
    q = squeezer.quantize(mlp, "w8a8")
    per_bucket = ["fbgemm_dynamic", "dequant_matmul", "int_mm", "int_mm"]
    p = squeezer.pack(q, kernels={"fc1": per_bucket, "head": "dequant_matmul"})
    kernels = packed_kernels(p)
    assert kernels["fc1"] == per_bucket and kernels["head"] == "dequant_matmul"
    assert kernels["fc2"] == packed_kernels(squeezer.pack(q))["fc2"], "layers not named follow the rule"
    assert p.fc1.runtime.describe() == dict(zip(("m<=1", "m<=16", "m<=128", "m>128"), per_bucket))


@pytest.mark.parametrize("kernels, message", [
    ({"nope": "int_mm"}, r"unknown layer\(s\) \['nope'\]"),
    ({"fc1": "bogus"}, r"kernels\['fc1'\]: unknown kernel path 'bogus'"),
    ({"fc2": "int_mm"}, r"kernels\['fc2'\]: path 'int_mm' does not support layer 'fc2'"),  # K = 300
    ({"fc1": "int4_weight_bf16"}, r"layer 'fc1': format .* is not supported by kernel path 'int4_weight_bf16'"),
    ({"fc1": "fbgemm_dynamic"}, r"'fbgemm_dynamic' does not support layer 'fc1'.*m<=16 rows"),  # per token: one row only
    ({"fc1": ["int_mm", "int_mm"]}, r"kernels\['fc1'\] must be a path name or a list of 4"),
    ("fastest", r"kernels must be 'rule' or 'time'"),
])
def test_bad_pins_are_refused_naming_the_culprit(mlp, kernels, message):
    q = squeezer.quantize(mlp, "w8a8")
    with pytest.raises(squeezer.ConfigError, match=message):
        squeezer.pack(q, kernels=kernels)


def test_conv_and_embedding_pins_name_their_one_runtime(cnn, cnn_batches):
    q = squeezer.quantize(cnn, "w8", calib=cnn_batches)
    assert packed_kernels(squeezer.pack(q, kernels={"conv1": "dequant_conv"}))["conv1"] == "dequant_conv"
    with pytest.raises(squeezer.ConfigError, match=r"kernels\['conv1'\]: a QuantConv2d runs only 'dequant_conv'"):
        squeezer.pack(q, kernels={"conv1": "int_mm"})


def test_checkpoint_records_and_reuses_the_kernels(tmp_path, mlp):
    q = squeezer.quantize(mlp, "w8a8")
    packed = squeezer.pack(q, kernels={"fc1": ["fbgemm_dynamic", "dequant_matmul", "int_mm", "dequant_matmul"]})
    squeezer.save(packed, tmp_path / "p")
    manifest = json.loads((tmp_path / "p" / "manifest.json").read_text())
    assert manifest["kernels"] == packed_kernels(packed)
    loaded = squeezer.load(tmp_path / "p", model=type(mlp), packed=True)
    assert packed_kernels(loaded) == manifest["kernels"]
    with torch.no_grad():
        for rows in (1, 5, 40, 300):
            x = torch.randn(rows, 40)
            assert torch.equal(packed(x), loaded(x)), rows
    squeezer.save(q, tmp_path / "plain")
    assert json.loads((tmp_path / "plain" / "manifest.json").read_text())["kernels"] == {}


def test_nothing_is_written_under_home(tmp_path, monkeypatch, mlp, mlp_batches):
    home, root = tmp_path / "home", tmp_path / "cache"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("SQUEEZER_CACHE_DIR", str(root))  # set after squeezer was imported
    q = squeezer.quantize(mlp, "w8a8")
    squeezer.pack(q, kernels="time")
    measure_sensitivity(mlp, mlp_batches[:1], ("w8", "fp32"), progress=False)
    assert list(home.iterdir()) == []
    assert list((root / "kernels").glob("*.json")) and len(list((root / "sensitivity").glob("*.json"))) == 1


def test_no_module_level_cache_paths():
    """No cache location is fixed at import or bound as a default argument."""
    import inspect

    from squeezer.search import joint, sensitivity, session

    for fn in (sensitivity.measure_sensitivity, joint.pareto_search, session.run_search):
        assert inspect.signature(fn).parameters["cache_dir"].default is True, fn.__name__
    assert not any(isinstance(v, Path) for mod in (select, sensitivity) for v in vars(mod).values())


_PACK_IN_A_PROCESS = """
import hashlib, json, sys, torch, squeezer
from squeezer.kernels import packed_kernels
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10)).eval()
calib = [torch.randn(16, 64) for _ in range(2)]
out = {}
for preset in sys.argv[1:]:
    packed = squeezer.pack(squeezer.quantize(model, preset, calib=calib, progress=False))
    with torch.no_grad():
        y = torch.cat([packed(torch.randn(rows, 64, generator=torch.Generator().manual_seed(rows))) for rows in (1, 7, 64)])
    out[preset] = [packed_kernels(packed), hashlib.sha256(y.numpy().tobytes()).hexdigest()]
print(json.dumps(out))
"""


def test_pack_is_identical_across_processes(tmp_path):
    """Two processes (default rule): the same kernels per layer and bit-identical packed outputs."""
    presets = ["w8", "w8a8", "w8a8-static", "w4g128"]
    env = {**os.environ, "SQUEEZER_CACHE_DIR": str(tmp_path / "cache")}
    runs = [subprocess.run([sys.executable, "-c", _PACK_IN_A_PROCESS, *presets], capture_output=True, text=True,
                           env=env, check=True, timeout=600).stdout for _ in range(2)]
    first, second = (json.loads(r.strip().splitlines()[-1]) for r in runs)
    assert set(first) == set(presets) and all(first[p][0] for p in presets)
    assert first == second


def test_rule_ranks_the_int_mm_reference_loop_last_without_vnni(monkeypatch):
    """Without VNNI, ``_int_mm`` is PyTorch's slow reference loop: the rule takes the fp32 fallback first."""
    problem, _, _ = _problem("w8a8", 64, 128)
    with_vnni = [select.rule_choice(problem, PATHS, b) for b in range(len(select.BUCKETS))]
    monkeypatch.setattr(torch.cpu, "_is_vnni_supported", lambda: False)
    without = [select.rule_choice(problem, PATHS, b) for b in range(len(select.BUCKETS))]
    assert "int_mm" in with_vnni and "int_mm" not in without and "fbgemm_dynamic" not in without
    assert select.rule_order()[-1] == "int_mm"

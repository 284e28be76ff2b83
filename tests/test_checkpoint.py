"""Bit-packing, save / load round trips, corrupt checkpoints, atomic writes."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import squeezer
from squeezer import ModelError, QuantSpec
from squeezer.io.atomic import atomic_directory
from squeezer.fold import FoldedNorm, folded_norms
from squeezer.io.checkpoint import MANIFEST, TENSORS, read_manifest, verify
from squeezer.io.manifest import digest
from squeezer.quant.packing import pack_codes, unpack_codes
from squeezer.quant.core import quantize

from .conftest import MLP, SmallCNN, TextModel


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 16), n=st.integers(1, 300), symmetric=st.booleans(), seed=st.integers(0, 2**16))
def test_packing_round_trip_and_size(bits, n, symmetric, seed):
    spec = QuantSpec(bits, symmetric=symmetric if bits > 1 else False, granularity="tensor")
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    codes = quantize(x, spec).codes
    packed = pack_codes(codes, spec)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-n * bits // 8)
    assert torch.equal(unpack_codes(packed, spec, tuple(codes.shape)), codes)


def test_int4_two_codes_per_byte_low_nibble_first():
    spec = QuantSpec(4, symmetric=False, signed=False, granularity="tensor")
    codes = torch.tensor([1, 2, 15, 0], dtype=torch.int8)
    assert pack_codes(codes, spec).tolist() == [0x21, 0x0F]


@pytest.mark.parametrize("preset", list(squeezer.PRESETS))
def test_save_load_gives_identical_outputs(tmp_path, preset, mlp, mlp_batches):
    q = squeezer.quantize(mlp, preset, calib=mlp_batches)
    squeezer.save(q, tmp_path / "ckpt")
    torch.manual_seed(123)  # a skeleton with other random weights
    loaded = squeezer.load(tmp_path / "ckpt", model=MLP)
    x = torch.randn(7, 40)
    with torch.no_grad():
        assert torch.equal(q(x), loaded(x))
    manifest = json.loads((tmp_path / "ckpt" / MANIFEST).read_text())
    assert set(manifest["layers"]) == {"fc1", "fc2", "head"}
    assert manifest["torch_version"] == torch.__version__


def test_checkpoint_file_is_really_small(tmp_path, mlp):
    fp32 = sum(p.numel() for n, p in mlp.named_parameters() if n.endswith("weight") and p.dim() == 2) * 4
    for preset, factor in (("w8", 3.9), ("w4g128", 7.0)):
        squeezer.save(squeezer.quantize(mlp, preset), tmp_path / preset)
        size = os.path.getsize(tmp_path / preset / TENSORS)
        other = sum(p.numel() * 4 for n, p in mlp.named_parameters() if not (n.endswith("weight") and p.dim() == 2))
        assert size - other - 4096 < fp32 / factor  # 4 KiB allowance for the safetensors header


def test_cnn_and_embedding_round_trip(tmp_path, cnn, cnn_batches):
    q = squeezer.quantize(cnn, "w8a8-static", calib=cnn_batches)
    squeezer.save(q, tmp_path / "cnn")
    loaded = squeezer.load(tmp_path / "cnn", model=SmallCNN())
    with torch.no_grad():
        assert torch.equal(q(cnn_batches[0]), loaded(cnn_batches[0]))
    torch.manual_seed(0)
    text = TextModel().eval()
    q = squeezer.quantize(text, "kmeans-w4")
    squeezer.save(q, tmp_path / "text")
    loaded = squeezer.load(tmp_path / "text", model=TextModel)
    ids = torch.randint(1, 100, (2, 5))
    assert torch.equal(q(ids, torch.ones(2, 5)), loaded(ids, torch.ones(2, 5)))


def test_folded_norms_are_recorded_and_refolded_on_load(tmp_path, cnn, cnn_batches):
    """The norm folded into ``conv1`` is gone from the checkpoint; loading folds the fresh float model the same way,
    also when the convolution stayed in float (its new bias included)."""
    for ignore in ((), ("conv1",)):
        config = dataclasses.replace(squeezer.PRESETS["w8a8-static"], ignore=ignore)
        q = squeezer.quantize(cnn, config, calib=cnn_batches, progress=False)
        squeezer.save(q, tmp_path / "cnn")
        assert read_manifest(tmp_path / "cnn")["folded_norms"] == {"bn": "conv1"}
        loaded = squeezer.load(tmp_path / "cnn", model=SmallCNN())
        assert isinstance(loaded.bn, FoldedNorm) and folded_norms(loaded) == {"bn": "conv1"}
        with torch.no_grad():
            assert torch.equal(q(cnn_batches[0]), loaded(cnn_batches[0]))
    no_norm = SmallCNN()
    no_norm.bn = torch.nn.Identity()
    with pytest.raises(ModelError, match="folded norm 'bn' into 'conv1': module 'bn' of the model is Identity, not a"):
        squeezer.load(tmp_path / "cnn", model=no_norm)
    manifest = json.loads((tmp_path / "cnn" / MANIFEST).read_text())  # forged, the digest re-sealed
    manifest["folded_norms"]["conv2"] = "conv1"
    manifest["sha256"] = digest(manifest, tmp_path / "cnn" / TENSORS)
    (tmp_path / "cnn" / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match="folded_norms must be one norm per convolution"):
        squeezer.load(tmp_path / "cnn", model=SmallCNN())


@pytest.fixture
def saved(tmp_path, mlp):
    path = tmp_path / "ckpt"
    squeezer.save(squeezer.quantize(mlp, "w8"), path)
    return path


def test_truncated_tensor_file(saved):
    data = (saved / TENSORS).read_bytes()
    (saved / TENSORS).write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="corrupt or truncated"):
        squeezer.load(saved, model=MLP)


def test_tampered_tensor_file(saved):
    data = bytearray((saved / TENSORS).read_bytes())
    data[-1] ^= 0xFF
    (saved / TENSORS).write_bytes(bytes(data))
    with pytest.raises(ModelError, match="corrupt"):
        squeezer.load(saved, model=MLP)


def test_a_version_3_checkpoint_is_refused_by_version(saved):
    """Version 4 moved static recurrent state grids and folded batch norms out of the state dict."""
    manifest = json.loads((saved / MANIFEST).read_text())
    assert manifest["format_version"] == 4
    manifest["format_version"] = 3
    manifest["sha256"] = digest(manifest, saved / TENSORS)
    (saved / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match=r"format version 3 is not supported \(this squeezer reads version 4\)"):
        verify(saved)


def test_wrong_format_version_and_corrupt_manifest(saved):
    manifest = json.loads((saved / MANIFEST).read_text())
    manifest["format_version"] = 99
    (saved / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match="format version 99"):
        squeezer.load(saved, model=MLP)
    (saved / MANIFEST).write_text("{not json")
    with pytest.raises(ModelError, match="manifest .* corrupt"):
        squeezer.load(saved, model=MLP)
    (saved / MANIFEST).unlink()
    with pytest.raises(ModelError, match="not a squeezer checkpoint"):
        squeezer.load(saved, model=MLP)


def test_mismatched_skeleton(saved):
    with pytest.raises(ModelError, match="fc1"):
        squeezer.load(saved, model=MLP(d_in=41))
    with pytest.raises(ModelError, match="does not exist"):
        squeezer.load(saved, model=SmallCNN())


def test_save_needs_a_quantized_model(tmp_path, mlp):
    with pytest.raises(ModelError, match="no quantized layers"):
        squeezer.save(mlp, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_interrupted_save_keeps_the_previous_checkpoint(saved, mlp, monkeypatch):
    before = (saved / TENSORS).read_bytes()

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("squeezer.io.checkpoint.save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        squeezer.save(squeezer.quantize(mlp, "w4g128"), saved)
    assert (saved / TENSORS).read_bytes() == before
    assert sorted(p.name for p in saved.parent.iterdir()) == ["ckpt"], "no temporary directory is left behind"
    squeezer.load(saved, model=MLP)


def test_atomic_directory_replaces_existing(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with atomic_directory(target) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

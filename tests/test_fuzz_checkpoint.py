"""Fuzzed checkpoints: a mutated manifest or tensor file, with the digest left as is or forged, either
raises a squeezer error or loads a model whose outputs equal the saved model's. With a forged digest,
only content that passes every check may load: a code changed within its range is such a change
(counted and printed, allowed)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import squeezer
from squeezer import SqueezerError
from squeezer.io.checkpoint import MANIFEST, TENSORS
from squeezer.io.manifest import digest

from .conftest import MLP, fuzz_examples

X = torch.randn(5, 40, generator=torch.Generator().manual_seed(3))
VALUES = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                   st.text(max_size=8), st.lists(st.integers(0, 9), max_size=3), st.dictionaries(st.text(max_size=3),
                                                                                                   st.integers(), max_size=2))
passed = {"forged code changes that loaded": 0}


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("fuzz") / "ckpt"
    model = squeezer.quantize(MLP().eval(), "w4g128")
    squeezer.save(model, path)
    with torch.no_grad():
        expected = model(X)
    yield path, expected
    print(f"\n{passed}")


def _paths(node, prefix=()):
    """Every (path, value) in a JSON tree."""
    yield prefix, node
    children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in children:
        yield from _paths(child, prefix + (key,))


def _outcome(directory, expected) -> bool:
    """True when the checkpoint loaded with outputs that differ; a squeezer error or equal outputs pass."""
    try:
        model = squeezer.load(directory, model=MLP)
    except SqueezerError:
        return False
    with torch.no_grad():
        return not torch.equal(model(X), expected)


@settings(max_examples=fuzz_examples(150), deadline=10_000, suppress_health_check=list(HealthCheck))
@given(data=st.data(), forge=st.booleans())
def test_mutated_manifest(original, tmp_path_factory, data, forge):
    source, expected = original
    work = tmp_path_factory.mktemp("m") / "ckpt"
    shutil.copytree(source, work)
    manifest = json.loads((work / MANIFEST).read_text())
    paths = [p for p, _ in _paths(manifest) if p and p != ("sha256",)]
    where = data.draw(st.sampled_from(paths))
    parent = manifest
    for key in where[:-1]:
        parent = parent[key]
    if data.draw(st.booleans()):
        parent[where[-1]] = data.draw(VALUES)
    elif isinstance(parent, dict):
        del parent[where[-1]]
    else:
        parent.pop(where[-1])
    if forge:
        manifest["sha256"] = digest(manifest, work / TENSORS)
    (work / MANIFEST).write_text(json.dumps(manifest))
    changed = _outcome(work, expected)
    assert not changed or forge, f"unforged manifest change {where} loaded with other outputs"
    if changed:  # forged and valid: only a scheme that still matches every tensor can get here
        assert where[0] == "layers", where


@settings(max_examples=fuzz_examples(150), deadline=10_000, suppress_health_check=list(HealthCheck))
@given(data=st.data(), forge=st.booleans(), kind=st.sampled_from(["flip", "truncate", "pad"]))
def test_mutated_tensor_file(original, tmp_path_factory, data, forge, kind):
    source, expected = original
    work = tmp_path_factory.mktemp("t") / "ckpt"
    shutil.copytree(source, work)
    blob = bytearray((work / TENSORS).read_bytes())
    header = 8 + int.from_bytes(blob[:8], "little")
    if kind == "flip":
        at = data.draw(st.integers(0, len(blob) - 1))
        blob[at] ^= 1 << data.draw(st.integers(0, 7))
    elif kind == "truncate":
        at = data.draw(st.integers(0, len(blob) - 1))
        blob = blob[:at]
    else:
        blob += bytes(data.draw(st.integers(1, 4096)))
    (work / TENSORS).write_bytes(bytes(blob))
    if forge:
        manifest = json.loads((work / MANIFEST).read_text())
        manifest["sha256"] = digest(manifest, work / TENSORS)
        (work / MANIFEST).write_text(json.dumps(manifest))
    changed = _outcome(work, expected)
    assert not changed or (forge and kind == "flip" and at >= header), "only a forged flip in tensor data may load"
    if changed:
        passed["forged code changes that loaded"] += 1

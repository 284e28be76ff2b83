"""Crash-safe, locked saves: a kill at every step of a directory swap, concurrent writers, umask permissions."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import squeezer
from squeezer import DataError
from squeezer.io.atomic import atomic_directory, atomic_write

from .conftest import MLP

ROOT = Path(__file__).resolve().parents[1]

# Runs atomic_directory (or squeezer.save) with every call of atomic.py that changes the disk counted as a
# step; ``os._exit(9)`` replaces step ``kill_at``. Prints the names of the steps taken when it is not killed.
KILLED_SAVE = textwrap.dedent("""
    import os, shutil, sys, json
    from pathlib import Path
    import squeezer.io.atomic as atomic

    body, kill_at, source, target = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
    steps = []

    def step(name, real):
        def call(*args, **kwargs):
            if len(steps) == kill_at:
                sys.stderr.write(name)
                os._exit(9)
            steps.append(name)
            return real(*args, **kwargs)
        return call

    class Os:
        def __getattr__(self, name):
            real = getattr(os, name)
            return step(name, real) if name in {"open", "fsync", "fchmod", "chmod", "rename", "replace", "mkdir", "unlink"} else real

    atomic.os = Os()
    atomic.shutil = type("Shutil", (), {"rmtree": staticmethod(step("rmtree", shutil.rmtree))})
    if body == "copy":
        with atomic.atomic_directory(target) as tmp:
            for path in sorted(source.iterdir()):
                shutil.copyfile(path, tmp / path.name)
    else:
        import squeezer
        from tests.test_atomic_save import skeleton
        squeezer.save(squeezer.load(source, model=skeleton), target)
    print(json.dumps(steps))
""")

# Saves the checkpoint ``source`` to ``target`` ``times`` times once ``go`` exists.
CONCURRENT_SAVE = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import squeezer
    from tests.test_atomic_save import skeleton

    source, target, go = (Path(a) for a in sys.argv[1:4])
    model = squeezer.load(source, model=skeleton)
    while not go.exists():
        time.sleep(0.01)
    for _ in range(int(sys.argv[4])):
        squeezer.save(model, target)
""")

X = torch.randn(5, 40, generator=torch.Generator().manual_seed(3))


def skeleton() -> MLP:
    """The float model every checkpoint here is loaded into (small: the tests run many saves)."""
    return MLP(hidden=24)


def _run(script: str, *args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", script, *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def _outputs(directory: Path) -> torch.Tensor:
    with torch.no_grad():
        return squeezer.load(directory, model=skeleton)(X)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, torch.nn.Module, Path]:
    """An old and a new quantized model; the new one also saved as a checkpoint (the source of the saves)."""
    torch.manual_seed(0)
    old = squeezer.quantize(skeleton().eval(), "w8")
    torch.manual_seed(1)
    new = squeezer.quantize(skeleton().eval(), "w4g128")
    return old, new, squeezer.save(new, tmp_path_factory.mktemp("sources") / "new")


def test_a_kill_at_any_step_leaves_the_old_or_the_new_checkpoint(tmp_path, models):
    old, new, source = models
    target = tmp_path / "work" / "ckpt"
    with torch.no_grad():
        old_out, new_out = old(X), new(X)
    squeezer.save(old, target)
    done = _run(KILLED_SAVE, "copy", -1, source, target)
    assert done.returncode == 0, done.stderr
    steps = json.loads(done.stdout)
    assert steps.count("rename") == 3 and "rmtree" in steps and steps.count("fsync") >= 5, steps
    assert torch.equal(_outputs(target), new_out)

    which, leftovers = [], set()
    for kill_at, name in enumerate(steps):
        squeezer.save(old, target)
        killed = _run(KILLED_SAVE, "copy", kill_at, source, target)
        assert killed.returncode == 9 and killed.stderr == name, (kill_at, name, killed.stderr)
        leftovers |= {p.name.rsplit("-", 1)[0] for p in target.parent.iterdir() if p.name != "ckpt"}
        out = _outputs(target)  # load repairs a swap cut between its two renames
        assert torch.equal(out, old_out) or torch.equal(out, new_out), (kill_at, name)
        which.append(0 if torch.equal(out, old_out) else 1)
        squeezer.save(new, target)  # the next save cleans up
        assert [p.name for p in target.parent.iterdir()] == ["ckpt"], (kill_at, name)
        assert torch.equal(_outputs(target), new_out)
    assert which == sorted(which) and which[0] == 0 and which[-1] == 1, "old until the swap, new after it"
    assert {".ckpt.tmp", ".ckpt.old", ".ckpt.del", ".ckpt.lock"} <= leftovers, "the kills did leave leftovers to clean"


def test_a_real_save_killed_between_its_renames_is_repaired_by_load(tmp_path, models):
    old, new, source = models
    target = tmp_path / "work" / "ckpt"
    squeezer.save(old, target)
    _run(KILLED_SAVE, "copy", -1, source, tmp_path / "steps")
    steps = json.loads(_run(KILLED_SAVE, "copy", -1, source, tmp_path / "steps").stdout)  # of a replacing save
    between = [i for i, name in enumerate(steps) if name == "rename"][1]  # target -> .old done, .tmp -> target not
    killed = _run(KILLED_SAVE, "save", between, source, target)
    assert killed.returncode == 9 and killed.stderr == "rename", killed.stderr
    assert not target.exists() and any(p.name.startswith(".ckpt.old-") for p in target.parent.iterdir())
    with torch.no_grad():
        assert torch.equal(_outputs(target), old(X))
    assert sorted(p.name for p in target.parent.iterdir())[-1] == "ckpt"


def test_concurrent_saves_both_finish_or_one_fails_clearly(tmp_path, models):
    old, new, source = models
    old_source = squeezer.save(old, tmp_path / "old")
    target, go = tmp_path / "work" / "ckpt", tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", CONCURRENT_SAVE, str(s), str(target), str(go), "3"], cwd=ROOT,
                              stderr=subprocess.PIPE, text=True) for s in (source, old_source)]
    time.sleep(0.5)
    go.touch()
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0 or "another squeezer process is writing" in err, err
    with torch.no_grad():
        out = _outputs(target)
        assert torch.equal(out, old(X)) or torch.equal(out, new(X))
    assert [p.name for p in target.parent.iterdir()] == ["ckpt"]


def test_a_second_writer_waits_then_gets_a_clear_error(tmp_path, models):
    old, new, _ = models
    target = tmp_path / "ckpt"
    squeezer.save(old, target)
    with atomic_directory(target) as tmp:
        (tmp / "x").write_text("x")
        started = time.monotonic()
        with pytest.raises(DataError, match=f"another squeezer process is writing {target}"):
            with atomic_directory(target, timeout=0.3):
                pass
        assert time.monotonic() - started >= 0.3
    assert [p.name for p in target.iterdir()] == ["x"]
    squeezer.save(new, target)
    with torch.no_grad():
        assert torch.equal(_outputs(target), new(X))


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_outputs_follow_the_umask(tmp_path, models, umask, file_mode, dir_mode):
    previous = os.umask(umask)
    try:
        target = squeezer.save(models[0], tmp_path / "ckpt")
        squeezer.save(models[1], target)
        atomic_write(tmp_path / "report.json", "{}")
        atomic_write(tmp_path / "model.bin", b"\x00")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(target.stat().st_mode) == dir_mode
    for path in [*target.iterdir(), tmp_path / "report.json", tmp_path / "model.bin"]:
        assert stat.S_IMODE(path.stat().st_mode) == file_mode, path


def test_atomic_write_replaces_and_names_an_unwritable_target(tmp_path):
    target = tmp_path / "model.bin"
    atomic_write(target, b"old")
    atomic_write(target, "new")
    assert target.read_bytes() == b"new" and os.listdir(tmp_path) == ["model.bin"]
    with pytest.raises(DataError, match=f"cannot write {tmp_path / 'missing' / 'x.bin'}"):
        atomic_write(tmp_path / "missing" / "x.bin", b"x")

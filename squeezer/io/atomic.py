"""Atomic, durable, locked writes: build output in a temporary sibling, then rename it into place.

Files (:func:`atomic_write`): a fresh ``.<name>.tmp-*`` sibling is written, fsynced and
``os.replace``-d onto the target, then the parent directory is fsynced. Readers see the old or the new
file, never a half-written one.

Directories (:func:`atomic_directory`) cannot be swapped by one plain rename when the target exists,
so the target stays a real directory and an interrupted swap is repaired on the next access:

1. take ``.<name>.lock`` (``fcntl.flock``; a second writer waits up to ``timeout`` seconds, then gets
   a :class:`DataError`), restore an interrupted swap (below), delete leftovers of interrupted saves
   (``.<name>.tmp-*``, ``.<name>.old-*``, ``.<name>.del-*``: nothing else uses them while the lock is held);
2. the caller writes into a fresh ``.<name>.tmp-*``; every file and directory in it gets the modes of the
   user's umask (some writers create 0600 files) and is fsynced;
3. ``target -> .<name>.old-*``, fsync the parent; ``.<name>.tmp-* -> target``, fsync the parent;
4. ``.<name>.old-* -> .<name>.del-*``, then deleted.

A kill between the two renames of step 3 leaves no target but a complete ``.<name>.old-*`` (a whole
previous target, only ever renamed); :func:`recover_directory` (called by ``squeezer.load`` and by the
next save) renames it back. Once step 3 is over the new target is complete, so after a kill at any
instant the target path holds (or, for a kill inside step 3, is restored to) the complete old or the
complete new content. A ``.<name>.old-*`` being deleted is first renamed to ``.<name>.del-*``, so a
partly deleted directory is never restored.

Why this design: a symlink target swapped by ``os.replace`` would change what users see (a link to a
versioned folder), and ``renameat2(RENAME_EXCHANGE)`` is Linux-only and not supported by every
filesystem, so it would still need this repair as a fallback; one path everywhere is the one tested.

Outputs get the user's umask (0644 / 0755 under umask 022) like any other file they write: temporary
files and directories are created with ``os.open(..., 0o666)`` / ``os.mkdir(..., 0o777)``, and what a
caller wrote into a temporary directory is given those modes before it is renamed into place.
"""

from __future__ import annotations

import fcntl
import os
import re
import secrets
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from ..errors import DataError

LOCK_TIMEOUT_S = 60.0
"""How long a writer waits for another process's lock on the same target before failing."""
_POLL_S = 0.05


def _writable_parent(target: Path) -> Path:
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"output directory {target} cannot be created: {exc.strerror or exc}") from None
    if not os.access(parent, os.W_OK):
        raise DataError(f"output directory {target} is not writable (no write permission on {parent})")
    if target.exists() and not target.is_dir():
        raise DataError(f"output path {target} exists and is not a directory")
    return parent


def _sibling(target: Path, kind: str) -> Path:
    """A fresh name ``.<name>.<kind>-<12 hex digits>`` beside ``target``."""
    return target.parent / f".{target.name}.{kind}-{secrets.token_hex(6)}"


def _siblings(target: Path, kind: str) -> list[Path]:
    """The existing :func:`_sibling` names of ``kind`` beside ``target``."""
    pattern = re.compile(re.escape(f".{target.name}.{kind}-") + "[0-9a-f]{12}")
    return [p for p in target.parent.iterdir() if pattern.fullmatch(p.name)]


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    """The process's umask (read from ``/proc`` where it exists, as setting it to read it is not thread-safe)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _seal(root: Path) -> None:
    """Give every file under ``root`` mode ``0o666 & ~umask`` (``0o777`` if executable) and every directory
    ``0o777 & ~umask`` (writers such as safetensors create 0600 files), then fsync them, deepest first."""
    mask = _umask()
    for current, _, files in os.walk(root, topdown=False):
        for name in files:
            fd = os.open(os.path.join(current, name), os.O_RDONLY)
            try:
                os.fchmod(fd, (0o777 if os.fstat(fd).st_mode & 0o111 else 0o666) & ~mask)
                os.fsync(fd)
            finally:
                os.close(fd)
        os.chmod(current, 0o777 & ~mask)
        _fsync_dir(Path(current))


def _acquire(lock: Path, target: Path, timeout: float) -> int:
    """An fd holding ``flock(LOCK_EX)`` on ``lock``; retried when the holder removed the file meanwhile."""
    deadline = time.monotonic() + timeout
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise DataError(f"another squeezer process is writing {target} (lock {lock} held for "
                                        f"more than {timeout:g} s); retry when it has finished") from None
                    time.sleep(_POLL_S)
            if os.path.samestat(os.fstat(fd), os.stat(lock)):
                return fd
        except FileNotFoundError:
            pass  # the previous holder removed the lock file: lock the new one
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


@contextmanager
def _locked(target: Path, timeout: float) -> Iterator[None]:
    """Hold ``.<name>.lock`` beside ``target`` (removed on release, so no lock file is left behind)."""
    lock = target.parent / f".{target.name}.lock"
    fd = _acquire(lock, target, timeout)
    try:
        yield
    finally:
        with suppress(FileNotFoundError):
            os.unlink(lock)  # before unlocking: a waiter then sees a stale file and retries
        os.close(fd)


def _discard(old: Path, target: Path) -> None:
    """Delete ``old`` after renaming it to ``.<name>.del-*``, so a kill never leaves a partial ``.old``."""
    trash = _sibling(target, "del")
    os.rename(old, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _restore(target: Path) -> None:
    """With the lock held: put back the newest ``.<name>.old-*`` when ``target`` is missing."""
    if target.exists():
        return
    old = sorted(_siblings(target, "old"), key=lambda p: p.stat().st_mtime)
    if old:
        os.rename(old[-1], target)
        _fsync_dir(target.parent)


def _remove_leftovers(target: Path) -> None:
    """With the lock held (no save of ``target`` is running): delete what interrupted saves left."""
    for path in _siblings(target, "old"):
        _discard(path, target)
    for path in _siblings(target, "tmp") + _siblings(target, "del"):
        shutil.rmtree(path, ignore_errors=True)


def recover_directory(target: str | Path, timeout: float = LOCK_TIMEOUT_S) -> None:
    """Restore ``target`` from the ``.<name>.old-*`` a save killed between its two renames left behind.

    Does nothing (and takes no lock) when ``target`` exists or no such sibling does. A save in progress
    is waited for (up to ``timeout`` seconds) first, as it puts the target back itself."""
    target = Path(target)
    if target.exists() or not target.parent.is_dir() or not _siblings(target, "old"):
        return
    try:
        with _locked(target, timeout):
            _restore(target)
    except OSError as exc:
        raise DataError(f"cannot restore {target} from an interrupted save: {exc.strerror or exc}") from None


@contextmanager
def atomic_directory(target: str | Path, timeout: float = LOCK_TIMEOUT_S) -> Iterator[Path]:
    """Yield a fresh temporary directory; on success it replaces ``target`` (steps in the module docstring).

    A second writer of the same ``target`` waits up to ``timeout`` seconds, then raises :class:`DataError`."""
    target = Path(target)
    parent = _writable_parent(target)
    with _locked(target, timeout):
        _restore(target)
        _remove_leftovers(target)
        tmp = _sibling(target, "tmp")
        os.mkdir(tmp, 0o777)
        try:
            yield tmp
            _seal(tmp)
            if target.exists():
                old = _sibling(target, "old")
                os.rename(target, old)
                _fsync_dir(parent)
                os.rename(tmp, target)
                _fsync_dir(parent)
                _discard(old, target)
            else:
                os.rename(tmp, target)
                _fsync_dir(parent)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def atomic_write(target: str | Path, data: str | bytes) -> None:
    """Write ``data`` (text as UTF-8) to ``target`` through a fsynced temporary sibling and ``os.replace``.

    The directory of ``target`` must exist; any failure raises :class:`DataError` naming ``target``."""
    target = Path(target)
    payload = data.encode() if isinstance(data, str) else data
    tmp = _sibling(target, "tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(payload)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, target)
            _fsync_dir(target.parent)
        finally:
            if os.path.lexists(tmp):
                os.unlink(tmp)
    except OSError as exc:
        raise DataError(f"cannot write {target}: {exc.strerror or exc}") from None

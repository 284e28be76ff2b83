"""squeezer's on-disk caches: one directory per kind, one JSON file per entry.

The root is ``$SQUEEZER_CACHE_DIR`` read at every call (so setting it later, in a test or a
script, is honoured), else the platform's user cache directory + ``squeezer``
(``$XDG_CACHE_HOME`` or ``~/.cache`` on Linux, ``~/Library/Caches`` on macOS,
``%LOCALAPPDATA%`` on Windows). An entry is ``<root>/<kind>/<key>.json``, written through a
temporary file and a rename; a missing, unreadable or damaged entry reads as ``None`` and an
unwritable cache is skipped: a cache only ever saves time.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from .errors import DataError
from .io.atomic import atomic_write

ENV = "SQUEEZER_CACHE_DIR"

CacheDir = str | Path | bool | None
"""A cache location argument: ``True`` = :func:`cache_dir` of the kind, a path = that directory,
``None`` / ``False`` = no cache."""


def _user_cache_root() -> Path:
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches"
    if sys.platform == "win32" and os.environ.get("LOCALAPPDATA"):
        return Path(os.environ["LOCALAPPDATA"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")


def cache_dir(kind: str) -> Path:
    """``$SQUEEZER_CACHE_DIR/<kind>`` (default root: the user cache directory + ``squeezer``), read now."""
    root = os.environ.get(ENV)
    return (Path(root) if root else _user_cache_root() / "squeezer") / kind


def resolve(kind: str, given: CacheDir) -> Path | None:
    """The directory a :data:`CacheDir` argument names (``True``: :func:`cache_dir` ``(kind)`` now)."""
    if given is True:
        return cache_dir(kind)
    return None if given is None or given is False else Path(given)


def key_hash(parts: Any) -> str:
    """32 hex digits of the SHA-256 of ``parts`` as sorted JSON (a stable key of plain data)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def read_entry(directory: Path, key: str) -> Any:
    """The JSON value stored under ``key`` in ``directory``, or ``None`` (missing or damaged)."""
    try:
        return json.loads((directory / f"{key}.json").read_text())
    except (OSError, ValueError):
        return None


def write_entry(directory: Path, key: str, value: Any) -> None:
    """Store ``value`` (JSON-ready) under ``key`` atomically; an unwritable cache is skipped."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write(directory / f"{key}.json", json.dumps(value))
    except (OSError, DataError):
        pass  # an unwritable cache only costs a re-measurement

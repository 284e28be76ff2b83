"""SHA-256 digests read in chunks (a file is never read whole into memory) and ``NAME.sha256`` sidecars.

A sidecar holds one line in ``sha256sum`` form: ``<64 hex digits>  <file name>``.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from ..errors import ModelError
from .atomic import atomic_write

CHUNK = 1 << 20  # bytes read at a time
_SIDECAR_LINE = re.compile(r"([0-9a-f]{64}) [ *](.+)")


def update_from_file(hasher: "hashlib._Hash", path: Path) -> None:
    """Feed the bytes of ``path`` to ``hasher``, ``CHUNK`` bytes at a time."""
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            hasher.update(chunk)


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of the file at ``path``, streamed."""
    hasher = hashlib.sha256()
    update_from_file(hasher, Path(path))
    return hasher.hexdigest()


def sidecar_of(path: str | Path) -> Path:
    """``model.onnx`` -> ``model.onnx.sha256``."""
    path = Path(path)
    return path.with_name(path.name + ".sha256")


def write_sidecar(path: str | Path) -> Path:
    """Write ``path``'s SHA-256 next to it (atomically); returns the sidecar's path."""
    path = Path(path)
    sidecar = sidecar_of(path)
    atomic_write(sidecar, f"{file_sha256(path)}  {path.name}\n")
    return sidecar


def check_sidecar(path: str | Path) -> None:
    """When ``path`` has a sidecar, :class:`ModelError` naming the file unless its SHA-256 matches;
    no sidecar: nothing to check."""
    path = Path(path)
    sidecar = sidecar_of(path)
    if not sidecar.is_file():
        return
    try:
        text = sidecar.read_text(encoding="ascii") if sidecar.stat().st_size <= 4096 else ""
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelError(f"cannot read the digest {sidecar} of {path}: {exc}") from None
    match = _SIDECAR_LINE.fullmatch(text.strip())
    if match is None or match.group(2) != path.name:
        raise ModelError(f"digest file {sidecar} is malformed: expected '<sha256>  {path.name}'")
    if file_sha256(path) != match.group(1):
        raise ModelError(f"exported model {path} is corrupt or was modified: its SHA-256 does not match {sidecar.name}")

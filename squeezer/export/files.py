"""Writing an exported file: the output directory must exist, and the file is never half-written."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ..errors import DataError


def check_output_dir(path: Path, what: str) -> None:
    """:class:`DataError` naming ``path``'s directory when it does not exist (``what``: the format)."""
    if not path.parent.is_dir():
        raise DataError(f"{what} output directory {path.parent} does not exist")


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary sibling, then rename it onto ``path``: never half-written."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except OSError as exc:
        raise DataError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)

"""The output of an exported file: its directory must exist (the file is written by :func:`squeezer.io.atomic.atomic_write`)."""

from __future__ import annotations

from pathlib import Path

from ..errors import DataError


def check_output_dir(path: Path, what: str) -> None:
    """:class:`DataError` naming ``path``'s directory when it does not exist (``what``: the format)."""
    if not path.parent.is_dir():
        raise DataError(f"{what} output directory {path.parent} does not exist")

"""What the bench scripts do alike: progress lines, error strings, sizes, results files and Markdown tables.

The machine meters (CPU, load, memory, versions) live in ``machine.py``.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
DOCS = REPO / "docs"


def log(msg: str) -> None:
    """``[HH:MM:SS] msg`` on stderr, flushed (progress, apart from the tables printed on stdout)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def short_error(exc: BaseException, limit: int = 400) -> str:
    """``Type: message`` on one line (white space folded), cut to ``limit`` characters."""
    text = re.sub(r"\s+", " ", f"{type(exc).__name__}: {exc}".strip())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def utc_now() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def state_dict_bytes(model: nn.Module) -> int | None:
    """Bytes of ``torch.save(model.state_dict())``; None where the state dict does not serialize (some
    peers' tensor subclasses)."""
    buf = io.BytesIO()
    try:
        torch.save(model.state_dict(), buf)
    except Exception:  # noqa: BLE001 - any failure means: no size to show
        return None
    return buf.getbuffer().nbytes


def repo_relative(path: Path) -> str:
    """``path`` relative to the repository root where it lies inside it, else as given."""
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def write_json(path: Path, data: Any, indent: int = 2) -> None:
    """Results as indented JSON (values JSON cannot hold written as ``str``), parent folders made."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=indent, default=str) + "\n", encoding="utf-8")


def write_doc(path: Path, text: str) -> None:
    """A Markdown document, parent folders made; logs where it went."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    log(f"wrote {path}")


def fmt_ms(x: float | None) -> str:
    """Milliseconds with 3 significant-ish digits: ``0.123``, ``12.34``, ``123``; ``—`` for None."""
    if x is None:
        return "—"
    return f"{x:.3f}" if x < 1 else f"{x:.2f}" if x < 100 else f"{x:.0f}"


def table_row(cells: Sequence[str]) -> str:
    """One Markdown table row: ``| a | b |``."""
    return "| " + " | ".join(cells) + " |"


def table_head(head: Sequence[str]) -> list[str]:
    """A Markdown table's header row and its ``|---|`` rule."""
    return [table_row(head), "|" + "---|" * len(head)]

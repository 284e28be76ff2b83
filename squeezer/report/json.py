"""JSON text of report data, with one policy for the numbers JSON cannot hold.

JSON has no NaN or infinity. :func:`dumps` writes a non-finite float as the string ``"nan"``,
``"inf"`` or ``"-inf"`` (an infinite SQNR is an exact layer: the value means something, ``null``
would lose it); :func:`loads` turns exactly these three strings back into floats. The text is
always strict JSON (``allow_nan=False``).
"""

from __future__ import annotations

import json
import math
from typing import Any

NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def encode_non_finite(value: Any) -> Any:
    """``value`` with every non-finite float (in nested dicts / lists / tuples) replaced by its string."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: encode_non_finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [encode_non_finite(v) for v in value]
    return value


def decode_non_finite(value: Any) -> Any:
    """Inverse of :func:`encode_non_finite`: the strings ``"nan"``, ``"inf"``, ``"-inf"`` become floats."""
    if isinstance(value, str):
        return NON_FINITE.get(value, value)
    if isinstance(value, dict):
        return {k: decode_non_finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decode_non_finite(v) for v in value]
    return value


def dumps(data: Any, indent: int | None = 2, **kwargs: Any) -> str:
    """Strict JSON text of ``data`` (non-finite floats as strings, see the module docstring)."""
    return json.dumps(encode_non_finite(data), indent=indent, allow_nan=False, **kwargs)


def loads(text: str) -> Any:
    """Parse JSON written by :func:`dumps`, non-finite floats restored."""
    return decode_non_finite(json.loads(text))

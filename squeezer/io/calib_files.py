"""Calibration files for the CLI: ``.npy``, ``.npz``, ``.safetensors``, ``.csv``.

One array gives tensor batches (``model(x)``). Several arrays give keyword batches
(``model(**batch)``) named by their keys, except numpy's positional names ``arr_0, arr_1, ...``
which give tuple batches (``model(*batch)``). Every array is split along axis 0. Labelled data
(:func:`load_pairs`) is an ``.npz`` with exactly the arrays ``x`` (inputs) and ``y`` (targets).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..calibration import Batch
from ..errors import DataError, excerpt, one_line

_NUMERIC_KINDS = "biuf"
"""numpy dtype kinds a calibration array may hold: bool, signed / unsigned integer, float."""


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return {"arr_0": np.load(path, allow_pickle=False)}
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    if suffix == ".safetensors":
        from safetensors.numpy import load_file

        return dict(load_file(str(path)))
    if suffix == ".csv":
        with path.open() as handle:
            first = handle.readline()
        try:
            [float(v) for v in first.strip().split(",")]
            skip = 0
        except ValueError:
            skip = 1
        return {"arr_0": np.atleast_2d(np.loadtxt(path, delimiter=",", skiprows=skip, dtype=np.float32))}
    raise DataError(f"calibration file {path}: unsupported type {suffix!r}; use .npy, .npz, .safetensors or .csv")


def load_calibration(path: str | Path, batch_size: int = 32) -> list[Batch]:
    """Read ``path`` and split it into batches of ``batch_size`` rows."""
    path = Path(path)
    if batch_size <= 0:
        raise DataError(f"--batch-size must be positive, got {batch_size}")
    if not path.is_file():
        raise DataError(f"calibration file {path} does not exist")
    try:
        arrays = _read_arrays(path)
    except DataError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, Exception) as exc:  # noqa: BLE001 - any parse failure
        raise DataError(f"cannot read calibration file {path}: {one_line(exc)}") from None
    if not arrays:
        raise DataError(f"calibration file {path} holds no arrays")
    rows = {k: (v.shape[0] if v.ndim else 0) for k, v in arrays.items()}
    if len(set(rows.values())) != 1:
        raise DataError(f"calibration file {path}: arrays have different numbers of rows {excerpt(rows)}")
    n = next(iter(rows.values()))
    if n == 0:
        raise DataError(f"calibration file {path} is empty")
    for k, v in arrays.items():
        if v.dtype.kind not in _NUMERIC_KINDS:
            raise DataError(f"calibration file {path}: array {excerpt(k)} holds {v.dtype} values; "
                            "expected numbers (bool, integer or float)")
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v, dtype=v.dtype.newbyteorder("="))) for k, v in arrays.items()}
    tensors = {k: t.float() if t.is_floating_point() else t for k, t in tensors.items()}
    positional = all(k == f"arr_{i}" for i, k in enumerate(tensors))
    batches: list[Batch] = []
    for start in range(0, n, batch_size):
        part = {k: t[start:start + batch_size] for k, t in tensors.items()}
        if len(part) == 1 and positional:
            batches.append(part["arr_0"])
        elif positional:
            batches.append(tuple(part.values()))
        else:
            batches.append(part)
    return batches


def load_pairs(path: str | Path, batch_size: int, flag: str) -> list[tuple[Tensor, Tensor]]:
    """``(x, y)`` batches of ``batch_size`` rows from an ``.npz`` holding exactly ``x`` and ``y``;
    ``flag`` names the option that gave ``path`` in errors."""
    batches = load_calibration(path, batch_size)
    if not isinstance(batches[0], dict) or set(batches[0]) != {"x", "y"}:
        raise DataError(f"{flag} {path} must be an .npz with exactly the arrays 'x' and 'y'")
    return [(b["x"], b["y"]) for b in batches]

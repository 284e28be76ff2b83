"""A safetensors file written one tensor at a time.

The format is ``u64 header length | JSON header {name: {dtype, shape, data_offsets}} | data``; the header
needs every shape first, so each tensor's bytes go to a temporary data file as they come, and
:meth:`SafetensorsStream.close` writes the header and copies the data behind it (memory: one tensor)."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import torch

_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}


class SafetensorsStream:
    """Append tensors with :meth:`add`; :meth:`close` writes ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._data_path = path.with_name(path.name + ".data")
        self._data = open(self._data_path, "wb")
        self._header: dict[str, dict] = {}
        self._offset = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        payload = tensor.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy().tobytes()
        self._header[name] = {"dtype": _DTYPES[tensor.dtype], "shape": list(tensor.shape),
                              "data_offsets": [self._offset, self._offset + len(payload)]}
        self._data.write(payload)
        self._offset += len(payload)

    @property
    def names(self) -> list[str]:
        return list(self._header)

    def close(self) -> None:
        self._data.close()
        header = json.dumps({"__metadata__": {"format": "pt"}, **self._header}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # data starts 8-byte aligned
        with open(self.path, "wb") as out, open(self._data_path, "rb") as data:
            out.write(struct.pack("<Q", len(header)) + header)
            shutil.copyfileobj(data, out, 1 << 20)
        self._data_path.unlink()

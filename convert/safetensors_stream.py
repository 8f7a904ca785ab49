"""Safetensors files written a tensor at a time, and a part's layout read without its data.

A safetensors file is its header, then the tensors' bytes in the header's order:

    <header length: u64, little-endian> <JSON header, space-padded to 8 bytes> <tensor bytes ...>
    header = {name: {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, "__metadata__": {...}}

Names, dtypes and shapes are known before any tensor is read (from the parts' own headers), so
a shard of any size is written while holding one tensor, not the whole shard.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from modules.layout import load_part, part_file

DTYPE_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
DTYPES_BY_NAME = {name: dtype for dtype, name in DTYPE_NAMES.items()}


@dataclass(frozen=True)
class Entry:
    """One tensor of a file: its name, shape and dtype as written."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def part_layout(model_dir: str | Path, part: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Shape and dtype of every tensor of a part, from its header (a legacy ``.pt`` is loaded)."""
    from safetensors import safe_open

    path = part_file(model_dir, part)
    if path.suffix != ".safetensors":
        return {k: (tuple(t.shape), t.dtype) for k, t in load_part(model_dir, part).items()}
    with safe_open(str(path), "pt") as f:
        slices = {key: f.get_slice(key) for key in f.keys()}
        return {key: (tuple(s.get_shape()), DTYPES_BY_NAME[s.get_dtype()]) for key, s in slices.items()}


class ShardWriter:
    """Writes ``entries`` into ``path``: the header at once, then each tensor as it is handed
    over (in the entries' order, checked). ``close`` makes the file appear under its name."""

    def __init__(self, path: Path, entries: list[Entry], metadata: dict[str, str]) -> None:
        self.path = path
        self._tmp = path.with_name(path.name + ".tmp")
        self._pending = list(reversed(entries))
        header: dict[str, object] = {"__metadata__": metadata}
        offset = 0
        for entry in entries:
            header[entry.name] = {
                "dtype": DTYPE_NAMES[entry.dtype],
                "shape": list(entry.shape),
                "data_offsets": [offset, offset + entry.nbytes],
            }
            offset += entry.nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
        self._file = open(self._tmp, "wb")
        self._file.write(struct.pack("<Q", len(text)) + text)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        entry = self._pending.pop()
        if (name, tuple(tensor.shape), tensor.dtype) != (entry.name, entry.shape, entry.dtype):
            raise ValueError(f"{self.path}: expected {entry}, got {name} {tuple(tensor.shape)} {tensor.dtype}")
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        self._file.write(flat.view(torch.uint8).numpy().data)  # the bytes as they lie (little-endian)

    def close(self) -> None:
        if self._pending:
            raise ValueError(f"{self.path}: {len(self._pending)} tensors were never written")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._tmp, self.path)

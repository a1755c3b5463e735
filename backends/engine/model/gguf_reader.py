"""The engine's one GGUF reader: a file's key/values and its tensor table. No torch here.

The config, the tokenizer and the weights' table all come from here. Not ``gguf.GGUFReader``: it
builds a numpy view per array element; opening the default model (SmolLM2-135M Q4_1, a 49k-token
vocabulary) takes it 1.87 s, this reader 0.04 s (2 cores, best of 3). The ``gguf`` package
still provides the tensor types' names and block sizes, and its reader is the tests' reference.

Layout (little-endian, versions 2 and 3): magic ``GGUF``, version u32, tensor count u64, key/value
count u64; the key/values (key string, value type u32, value); the tensor table (name string,
dimension count u32, dimensions u64 each, type u32, offset u64 from the data start); the tensor
data from the next multiple of ``general.alignment`` (default 32).
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Callable
from typing import Any

import msgspec
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

DEFAULT_ALIGNMENT = 32

# GGUF value types -> struct format (little-endian); 8 is a string, 9 an array.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9


class GGUFTensorInfo(msgspec.Struct, frozen=True):
    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]  # GGUF order: columns first
    offset: int  # absolute, in the file
    n_bytes: int


class GGUFHeader(msgspec.Struct, frozen=True):
    """What ``read_gguf`` kept: ``metadata`` as Python values; ``long_arrays``, the kept keys whose
    arrays were longer than ``max_array`` and left undecoded; the tensor table in file order."""

    metadata: dict[str, Any]
    long_arrays: frozenset[str]
    tensors: tuple[GGUFTensorInfo, ...]


def read_gguf_metadata(path: str | os.PathLike[str], prefix: str = "") -> dict[str, Any]:
    """The key/values of a GGUF file whose key starts with ``prefix``, as Python values."""
    return read_gguf(path, keep=lambda key: key.startswith(prefix), tensors=False).metadata


def read_gguf(
    path: str | os.PathLike[str],
    *,
    keep: Callable[[str], bool] = lambda key: True,
    max_array: int | None = None,
    tensors: bool = True,
) -> GGUFHeader:
    """Read the header of a GGUF file: the key/values for which ``keep(key)`` holds (arrays longer
    than ``max_array`` are skipped and named in ``long_arrays``), and, with ``tensors``, the
    tensor table. ``ValueError`` when the file is not a GGUF file this reader understands."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            raise ValueError(f"'{path}' is not a GGUF file")
        version, num_tensors, num_kv = struct.unpack_from("<IQQ", buf, 4)
        if version not in (2, 3):
            raise ValueError(f"'{path}': unsupported GGUF version {version} (a big-endian file?)")
        cursor = _Cursor(buf, 24)
        metadata: dict[str, Any] = {}
        long_arrays: set[str] = set()
        alignment = DEFAULT_ALIGNMENT
        for _ in range(num_kv):
            key = cursor.string()
            kind = cursor.unpack("<I")
            if key == "general.alignment":
                alignment = cursor.value(kind, decode=True)
                if keep(key):
                    metadata[key] = alignment
                continue
            wanted = keep(key)
            if wanted and kind == _ARRAY and max_array is not None and cursor.peek_array_length() > max_array:
                long_arrays.add(key)
                wanted = False
            value = cursor.value(kind, decode=wanted)
            if wanted:
                metadata[key] = value
        table = _tensor_table(cursor, num_tensors, alignment) if tensors else ()
        return GGUFHeader(metadata, frozenset(long_arrays), table)


def _tensor_table(cursor: _Cursor, num_tensors: int, alignment: int) -> tuple[GGUFTensorInfo, ...]:
    entries = []
    for _ in range(num_tensors):
        name = cursor.string()
        num_dims = cursor.unpack("<I")
        shape = struct.unpack_from(f"<{num_dims}Q", cursor.buf, cursor.pos)
        cursor.pos += 8 * num_dims
        raw_type, offset = cursor.unpack("<I"), cursor.unpack("<Q")
        try:
            qtype = GGMLQuantizationType(raw_type)
        except ValueError:
            raise ValueError(f"GGUF tensor '{name}' has an unknown type {raw_type}") from None
        block, block_bytes = GGML_QUANT_SIZES[qtype]
        n_bytes = int(np.prod(shape, dtype=np.int64)) // block * block_bytes
        entries.append((name, qtype, tuple(int(d) for d in shape), offset, n_bytes))
    data_start = -(-cursor.pos // alignment) * alignment
    return tuple(GGUFTensorInfo(name, q, shape, data_start + off, n) for name, q, shape, off, n in entries)


class _Cursor:
    """A read position in the mapped file."""

    def __init__(self, buf: mmap.mmap, pos: int) -> None:
        self.buf = buf
        self.pos = pos

    def unpack(self, fmt: str) -> Any:
        (out,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return out

    def string(self, *, decode: bool = True) -> str | None:
        size = self.unpack("<Q")
        self.pos += size
        return self.buf[self.pos - size : self.pos].decode("utf-8", errors="replace") if decode else None

    def peek_array_length(self) -> int:
        return struct.unpack_from("<Q", self.buf, self.pos + 4)[0]

    def value(self, kind: int, *, decode: bool) -> Any:
        """The value of type ``kind`` at the cursor (None when not ``decode``: only skipped)."""
        if kind == _STRING:
            return self.string(decode=decode)
        if kind == _ARRAY:
            item_kind, count = self.unpack("<I"), self.unpack("<Q")
            if item_kind in _NUMPY:  # numbers: one numpy read, never a Python loop
                dtype = np.dtype(_NUMPY[item_kind])
                start = self.pos
                self.pos += dtype.itemsize * count
                return np.frombuffer(self.buf, dtype, count, start).tolist() if decode else None
            items = [self.value(item_kind, decode=decode) for _ in range(count)]
            return items if decode else None
        return self.unpack(_SCALARS[kind])

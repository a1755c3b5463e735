"""Weights from a GGUF file: its header read by ``gguf_reader``, its tensors memory-mapped.

``GGUFSource.get(name)`` decodes one tensor at a time into the engine's exchange forms
(``quant.Int4Data`` for Q4_0/Q4_1/Q4_K, ``quant.Int8Data`` for Q5_0/Q8_0/Q3_K/Q6_K, and with
offsets for Q5_1/Q5_K/Q2_K, a float
tensor for F32/F16/BF16; ``gguf_blocks.py`` decodes the blocks) and drops the file pages it read from this process's mapping, so loading never
holds the whole file and the decoded model at once. Names are the engine's canonical ones
(``embed``, ``lm_head``, ``norm``, ``layers.{i}.q`` … see ``loader.py``). A mixture of experts'
``ffn_{gate,up,down}_exps`` (every expert stacked in one 3-D tensor) is handed out one expert
at a time, a row range of the stack: ``layers.{i}.experts.{e}.{gate,up,down}``.

llama.cpp's converter permutes the rows of ``attn_q``/``attn_k`` of ``llama`` models so that each
head's rotary pairs are interleaved (GPT-J style); the engine uses the Hugging Face half-rotation
layout, so those rows are permuted back here (a row permutation, exact for any tensor type).
``qwen2`` GGUFs are written unpermuted.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import torch
from gguf import GGMLQuantizationType
from torch import Tensor

from backends.engine.model.config import ModelConfig, UnsupportedModelError
from backends.engine.model.tensor_names import GGUF_NAMES, GGUF_WEIGHT_KINDS
from backends.engine.model.gguf_reader import GGUFHeader, GGUFTensorInfo, read_gguf
from backends.engine.model import gguf_blocks
from backends.engine.model.quant import WeightData

SUPPORTED_TYPES = tuple(GGUF_WEIGHT_KINDS)
_CHUNK_ROWS = 4096  # rows decoded at a time: bounds the transient memory of huge tensors



_EAGER_ARRAY_MAX = 1024  # longer arrays (the vocabulary, merges) are decoded on first access


class GGUFMetadata(Mapping[str, Any]):
    """The GGUF key/values as Python values (strings, numbers, lists).

    Long arrays (tokenizer vocabularies and merges: ~100k strings, ~16 MB of Python objects) are
    read from the file again on first access instead of being held for the process's life.
    """

    def __init__(self, path: Path, header: GGUFHeader) -> None:
        self._path = path
        self._values: dict[str, Any] = dict(header.metadata)
        self._lazy = header.long_arrays
        self._order = [*header.metadata, *header.long_arrays]

    def __getitem__(self, key: str) -> Any:
        if key in self._values:
            return self._values[key]
        if key not in self._lazy:
            raise KeyError(key)
        value = self._values[key] = read_gguf(self._path, keep=key.__eq__, tensors=False).metadata[key]
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(self._order)

    def __len__(self) -> int:
        return len(self._order)


class GGUFSource:
    """An open GGUF file: ``config``, ``metadata`` and ``get(name)`` of decoded tensors."""

    format = "gguf"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            header = read_gguf(self.path, max_array=_EAGER_ARRAY_MAX)
        except (ValueError, OSError) as exc:
            raise UnsupportedModelError(f"cannot read GGUF file '{self.path}': {exc}") from exc
        self.metadata = GGUFMetadata(self.path, header)
        self._tensors: dict[str, GGUFTensorInfo] = {}
        for t in header.tensors:
            name = GGUF_NAMES.canonical(t.name)
            if name is not None:
                self._tensors[name] = t
        self.config = ModelConfig.from_gguf_metadata(self.metadata, has_output_tensor="lm_head" in self._tensors)
        self.tensor_types = {name: t.qtype.name for name, t in self._tensors.items()}
        # experts stacked in one tensor (GGUF shape [cols, rows, num_experts]): expert e is a row
        # range of it, handed out as ``layers.{i}.experts.{e}.{gate,up,down}``
        self._experts: dict[str, tuple[str, int]] = {}
        for name, t in self._tensors.items():
            if name.endswith("_exps"):
                layer, _, kind = name.rpartition(".")
                if len(t.shape) != 3 or t.shape[2] != self.config.num_experts:
                    raise UnsupportedModelError(f"GGUF tensor '{t.name}' is not {self.config.num_experts} stacked experts")
                for e in range(self.config.num_experts):
                    self._experts[f"{layer}.experts.{e}.{kind.removesuffix('_exps')}"] = (name, e)
                    self.tensor_types[f"{layer}.experts.{e}.{kind.removesuffix('_exps')}"] = t.qtype.name
        # The header was read through its own mapping, closed by now: this one has touched no page.
        self._data: np.memmap | None = np.memmap(self.path, dtype=np.uint8, mode="r")

    def has(self, name: str) -> bool:
        return name in self._tensors or name in self._experts

    def close(self) -> None:
        """Drop the mapping (the decoded metadata stays)."""
        self._tensors.clear()
        self._data = None

    def num_rows(self, name: str) -> int:
        if name in self._experts:
            stacked, _ = self._experts[name]
            return self.num_rows(stacked) // self.config.num_experts
        shape = self._info(name).shape
        return int(np.prod(shape[1:])) if len(shape) > 1 else 1

    def _info(self, name: str) -> GGUFTensorInfo:
        t = self._tensors.get(name)
        if t is None or self._data is None:
            raise UnsupportedModelError(f"GGUF file '{self.path}' lacks tensor '{name}'")
        if t.qtype.name not in SUPPORTED_TYPES:
            raise UnsupportedModelError(
                f"GGUF tensor '{t.name}' has type {t.qtype.name}, which the engine cannot load "
                f"(supported: {', '.join(SUPPORTED_TYPES)})"
            )
        return t

    def get(self, name: str, rows: slice | None = None) -> WeightData:
        """Decode tensor ``name`` (``[rows, cols]`` or ``[cols]``), or only the row range ``rows``."""
        if name in self._experts:  # one expert's rows of the stacked tensor
            stacked, e = self._experts[name]
            per = self.num_rows(name)
            first, last = (0, per) if rows is None else (rows.start, min(rows.stop, per))
            return self.get(stacked, rows=slice(e * per + first, e * per + last))
        t = self._info(name)
        assert self._data is not None
        cols = t.shape[0]
        num_rows = self.num_rows(name)
        row_bytes = t.n_bytes // num_rows
        first, last = (0, num_rows) if rows is None else (rows.start, min(rows.stop, num_rows))
        start = t.offset + first * row_bytes
        raw = self._data[start : t.offset + last * row_bytes].reshape(last - first, row_bytes)
        try:
            data = _decode(raw, t.qtype, last - first, cols)
        finally:
            self._release(start, (last - first) * row_bytes)
        if len(t.shape) == 1:
            assert isinstance(data, Tensor)
            data = data.view(cols)
        return data if rows is not None else self._unpermute(name, data)

    def _unpermute(self, name: str, data: WeightData) -> WeightData:
        cfg = self.config
        if cfg.architecture not in ("llama", "mixtral") or not name.endswith((".q", ".k")):
            return data
        heads = cfg.num_heads if name.endswith(".q") else cfg.num_kv_heads
        rows = data.shape[0] if isinstance(data, Tensor) else data.q.shape[0]
        # GGUF row (head, i, j) holds HF row (head, j, i) for j in {0, 1}, i < head_dim / 2.
        perm = torch.arange(rows).view(heads, -1, 2).transpose(1, 2).reshape(-1)
        return data[perm] if isinstance(data, Tensor) else data.rows(perm)

    def _release(self, offset: int, length: int) -> None:
        """Drop the mapped pages of bytes already decoded, so they stop counting as ours."""
        mm = getattr(self._data, "_mmap", None)
        if mm is None or not hasattr(mm, "madvise"):
            return
        start = offset - offset % mmap.PAGESIZE
        try:
            mm.madvise(mmap.MADV_DONTNEED, start, offset + length - start)
        except (OSError, ValueError):
            pass  # advisory only


def _decode(raw: np.ndarray, qtype: GGMLQuantizationType, rows: int, cols: int) -> WeightData:
    name = qtype.name
    if name in ("F32", "F16", "BF16"):
        dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[name]
        return torch.from_numpy(np.array(raw)).view(dtype).view(rows, cols)
    _, per_block = gguf_blocks.BLOCKS[name]
    if cols % per_block:
        raise UnsupportedModelError(f"{name} tensor with {cols} columns is not whole blocks of {per_block}")
    # a chunk of rows at a time, into tensors of the whole: the decoder's temporaries stay a chunk's size
    out: WeightData | None = None
    for r in range(0, rows, _CHUNK_ROWS):
        part = gguf_blocks.decode(name, torch.from_numpy(np.array(raw[r : r + _CHUNK_ROWS])))
        if out is None:
            if rows <= _CHUNK_ROWS:
                return part
            out = msgspec.structs.replace(
                part, **{f: torch.empty(rows, *getattr(part, f).shape[1:], dtype=getattr(part, f).dtype)
                         for f in ("q", "scales", "zeros") if hasattr(part, f)}  # fmt: skip
            )
        for f in ("q", "scales", "zeros"):
            if hasattr(part, f):
                getattr(out, f)[r : r + _CHUNK_ROWS] = getattr(part, f)
    assert out is not None
    return out

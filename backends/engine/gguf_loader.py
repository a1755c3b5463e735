"""Weights from a GGUF file, read through ``gguf.GGUFReader`` (memory-mapped).

``GGUFSource.get(name)`` decodes one tensor at a time into the engine's exchange forms
(``quant.Int4Data`` for Q4_0/Q4_1, ``quant.Int8Data`` for Q8_0, a float tensor for
F32/F16/BF16) and drops the file pages it read from this process's mapping, so loading never
holds the whole file and the decoded model at once. Names are the engine's canonical ones
(``embed``, ``lm_head``, ``norm``, ``layers.{i}.q`` … see ``loader.py``).

llama.cpp's converter permutes the rows of ``attn_q``/``attn_k`` of ``llama`` models so that each
head's rotary pairs are interleaved (GPT-J style); the engine uses the Hugging Face half-rotation
layout, so those rows are permuted back here (a row permutation, exact for any tensor type).
``qwen2`` GGUFs are written unpermuted.
"""

from __future__ import annotations

import mmap
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader
from torch import Tensor

from backends.engine.config import ModelConfig, UnsupportedModelError
from backends.engine.quant import Int4Data, Int8Data, WeightData

SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")
_BLOCK = 32  # elements per Q4_0 / Q4_1 / Q8_0 block
_CHUNK_ROWS = 4096  # rows decoded at a time: bounds the transient memory of huge tensors

_LAYER_NAMES = {
    "attn_q.weight": "q",
    "attn_k.weight": "k",
    "attn_v.weight": "v",
    "attn_output.weight": "o",
    "attn_q.bias": "q.bias",
    "attn_k.bias": "k.bias",
    "attn_v.bias": "v.bias",
    "attn_output.bias": "o.bias",
    "ffn_gate.weight": "gate",
    "ffn_up.weight": "up",
    "ffn_down.weight": "down",
    "attn_norm.weight": "attn_norm",
    "ffn_norm.weight": "ffn_norm",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "embed",
    "output.weight": "lm_head",
    "output_norm.weight": "norm",
    "rope_freqs.weight": "rope_freqs",
}


def canonical_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    if gguf_name.startswith("blk."):
        _, layer, rest = gguf_name.split(".", 2)
        short = _LAYER_NAMES.get(rest)
        if short is not None:
            return f"layers.{layer}.{short}"
    return None


def read_metadata(reader: GGUFReader) -> dict[str, Any]:
    """Every GGUF key/value decoded to Python values (strings, numbers, lists)."""
    return {name: field.contents() for name, field in reader.fields.items()}


class GGUFSource:
    """An open GGUF file: ``config``, ``metadata`` and ``get(name)`` of decoded tensors."""

    format = "gguf"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self._reader: GGUFReader | None = GGUFReader(self.path)
        except (ValueError, OSError) as exc:
            raise UnsupportedModelError(f"cannot read GGUF file '{self.path}': {exc}") from exc
        self.metadata = read_metadata(self._reader)
        self._tensors = {}
        for t in self._reader.tensors:
            name = canonical_name(t.name)
            if name is not None:
                self._tensors[name] = t
        self.config = ModelConfig.from_gguf_metadata(self.metadata, has_output_tensor="lm_head" in self._tensors)
        self.tensor_types = {name: t.tensor_type.name for name, t in self._tensors.items()}

    def has(self, name: str) -> bool:
        return name in self._tensors

    def close(self) -> None:
        """Drop the reader and its mapping (the decoded metadata stays)."""
        self._tensors.clear()
        self._reader = None

    def get(self, name: str) -> WeightData:
        """Decode tensor ``name`` (``[rows, cols]`` or ``[cols]``)."""
        t = self._tensors.get(name)
        if t is None:
            raise UnsupportedModelError(f"GGUF file '{self.path}' lacks tensor '{name}'")
        type_name = t.tensor_type.name
        if type_name not in SUPPORTED_TYPES:
            raise UnsupportedModelError(
                f"GGUF tensor '{t.name}' has type {type_name}, which the engine cannot load "
                f"(supported: {', '.join(SUPPORTED_TYPES)})"
            )
        cols = int(t.shape[0])
        rows = int(np.prod(t.shape[1:])) if len(t.shape) > 1 else 1
        raw = np.asarray(t.data).reshape(rows, -1).view(np.uint8)
        try:
            data = _decode(raw, t.tensor_type, rows, cols)
        finally:
            self._release(int(t.data_offset), int(t.n_bytes))
        if len(t.shape) == 1:
            assert isinstance(data, Tensor)
            data = data.view(cols)
        return self._unpermute(name, data)

    def _unpermute(self, name: str, data: WeightData) -> WeightData:
        cfg = self.config
        if cfg.architecture != "llama" or not name.endswith((".q", ".k")):
            return data
        heads = cfg.num_heads if name.endswith(".q") else cfg.num_kv_heads
        rows = data.shape[0] if isinstance(data, Tensor) else data.q.shape[0]
        # GGUF row (head, i, j) holds HF row (head, j, i) for j in {0, 1}, i < head_dim / 2.
        perm = torch.arange(rows).view(heads, -1, 2).transpose(1, 2).reshape(-1)
        return data[perm] if isinstance(data, Tensor) else data.rows(perm)

    def _release(self, offset: int, length: int) -> None:
        """Drop the mapped pages of bytes already decoded, so they stop counting as ours."""
        mm = getattr(self._reader.data, "_mmap", None) if self._reader is not None else None
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
    if cols % _BLOCK:
        raise UnsupportedModelError(f"{name} tensor with {cols} columns is not whole blocks of {_BLOCK}")
    groups = cols // _BLOCK
    if name == "Q8_0":
        q = torch.empty(rows, cols, dtype=torch.int8)
        scales = torch.empty(rows, groups, dtype=torch.float32)
    else:
        q = torch.empty(rows, cols, dtype=torch.uint8)
        scales = torch.empty(rows, groups, dtype=torch.float32)
        zeros = torch.empty(rows, groups, dtype=torch.float32)
    for r0 in range(0, rows, _CHUNK_ROWS):
        r1 = min(r0 + _CHUNK_ROWS, rows)
        blocks = torch.from_numpy(np.array(raw[r0:r1])).view(r1 - r0, groups, -1)
        d = blocks[..., 0:2].contiguous().view(torch.float16).squeeze(-1).float()
        scales[r0:r1] = d
        if name == "Q8_0":
            q[r0:r1] = blocks[..., 2:34].contiguous().view(torch.int8).reshape(r1 - r0, cols)
            continue
        if name == "Q4_0":  # w = d * (q - 8)
            qs = blocks[..., 2:18]
            zeros[r0:r1] = 0.0
        else:  # Q4_1: w = d * q + m = (q - 8) * d + (m + 8 d)
            m = blocks[..., 2:4].contiguous().view(torch.float16).squeeze(-1).float()
            zeros[r0:r1] = m + 8.0 * d
            qs = blocks[..., 4:20]
        # Within a block, byte j holds element j (low nibble) and element j + 16 (high nibble).
        q[r0:r1] = torch.cat([qs & 15, qs >> 4], dim=-1).view(r1 - r0, cols)
    if name == "Q8_0":
        return Int8Data(q=q, scales=scales, group_size=_BLOCK)
    return Int4Data(q=q, scales=scales, zeros=zeros, group_size=_BLOCK)

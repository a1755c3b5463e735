"""What every linear module shares (``Linear``), the unquantized one, the dequantise reference
path, and the fallback that concatenates modules of mixed formats."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Self

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: Rows dequantised at a time when a huge weight (the vocabulary) takes the dequantise path.
DEQUANT_CHUNK_ROWS = 8192


class Linear(nn.Module):
    """``y = x @ W.T (+ bias)`` for some stored form of ``W`` ``[out_features, in_features]``.

    Every subclass keeps ``forward(x[M, in]) -> [M, out]``, a ``dequantize(dtype, rows)``
    reference and an ``embed(ids, dtype)`` row gather; its ``bias`` is in the compute dtype."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer("bias", None)

    def with_bias(self, bias: Tensor | None, *, dtype: torch.dtype, device: torch.device | str = "cpu") -> Self:
        """This module, ``bias`` (if any) attached in ``dtype`` on ``device``."""
        if bias is not None:
            self.bias = bias.to(device=device, dtype=dtype)
        return self

    def extra_repr(self) -> str:
        group_size = getattr(self, "group_size", None)
        sizes = f"in={self.in_features}, out={self.out_features}"
        return sizes if group_size is None else f"{sizes}, group_size={group_size}"


def dense_forward(mod: nn.Module, x: Tensor) -> Tensor:
    """``x @ mod.dequantize().T``, a row chunk at a time for vocabulary-sized weights."""
    n = getattr(mod, "padded_out", mod.out_features)
    if n <= DEQUANT_CHUNK_ROWS:
        y = F.linear(x, mod.dequantize(x.dtype))
    else:
        chunks = [mod.dequantize(x.dtype, slice(r, min(r + DEQUANT_CHUNK_ROWS, n))) for r in range(0, n, DEQUANT_CHUNK_ROWS)]
        y = torch.cat([F.linear(x, w) for w in chunks], dim=-1)[:, : mod.out_features]
    return y if mod.bias is None else y + mod.bias


class DenseLinear(Linear):
    """Unquantized ``y = x @ W.T (+ bias)``; also the embedding table when tied."""

    @classmethod
    def from_data(
        cls, w: Tensor, *, bias: Tensor | None = None, dtype: torch.dtype, device: torch.device | str = "cpu"
    ) -> DenseLinear:
        mod = cls(w.shape[1], w.shape[0])
        mod.register_buffer("weight", w.to(device=device, dtype=dtype).contiguous())
        return mod.with_bias(bias, dtype=dtype, device=device)

    def dequantize(self, dtype: torch.dtype | None = None, rows: slice | None = None) -> Tensor:
        w = self.weight if rows is None else self.weight[rows]
        return w if dtype is None else w.to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)

    def embed(self, ids: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        rows = F.embedding(ids, self.weight)
        return rows if dtype is None else rows.to(dtype)


class ConcatLinear(nn.Module):
    """Fallback fusion for parts that cannot share one weight (mixed quantization types)."""

    def __init__(self, parts: Sequence[nn.Module]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.in_features = parts[0].in_features
        self.out_features = sum(p.out_features for p in parts)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([p(x) for p in self.parts], dim=-1)

    def dequantize(self, dtype: torch.dtype | None = None, rows: slice | None = None) -> Tensor:
        w = torch.cat([p.dequantize(dtype) for p in self.parts])
        return w if rows is None else w[rows]

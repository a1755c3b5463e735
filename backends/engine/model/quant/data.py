"""The exchange forms of quantized weights and the quantizers that make them.

int4 (groupwise, asymmetric): ``W[n, k] = (q[n, k] - 8) * scale[n, g] + zero[n, g]`` with
``q`` in 0..15 and ``g = k // group_size``: torch's int4pack convention. GGUF maps onto it
without loss: Q4_0 ``w = d * (q - 8)`` is ``scale = d, zero = 0``; Q4_1 ``w = d * q + m`` is
``scale = d, zero = m + 8 d`` (exact in float32; rounded to bfloat16 when the layer computes in
bfloat16, because the packed kernel wants its scales in the activation dtype).

int8 (symmetric): ``W[n, k] = q[n, k] * scale[n, g]``; per channel when one group spans the row.

Loaders produce these, tensor parallelism slices them (``rows``) and ``make_linear`` packs them.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec
import torch
from torch import Tensor

DEFAULT_GROUP_SIZE = 32


class Int4Data(msgspec.Struct, kw_only=True):
    """Unpacked groupwise int4 weight: the exchange form for loading, fusing and sharding."""

    q: Tensor  # uint8 [N, K], values 0..15
    scales: Tensor  # float32 [N, K // group_size]
    zeros: Tensor  # float32 [N, K // group_size]
    group_size: int

    def dequantize(self) -> Tensor:
        n, k = self.q.shape
        w = self.q.to(torch.float32).view(n, -1, self.group_size) - 8.0
        return (w * self.scales.unsqueeze(-1) + self.zeros.unsqueeze(-1)).view(n, k)

    def rows(self, index: Tensor | slice) -> Int4Data:
        return Int4Data(q=self.q[index], scales=self.scales[index], zeros=self.zeros[index], group_size=self.group_size)


class Int8Data(msgspec.Struct, kw_only=True):
    """Symmetric int8 weight; ``group_size == K`` means per channel. With ``zeros`` (GGUF's
    formats with a minimum: Q5_1, Q5_K, Q2_K) each group also adds its offset:
    ``W[n, k] = q[n, k] * scale[n, g] + zero[n, g]``."""

    q: Tensor  # int8 [N, K]
    scales: Tensor  # float32 [N, K // group_size]
    group_size: int
    zeros: Tensor | None = None  # float32 [N, K // group_size]

    def dequantize(self) -> Tensor:
        n, k = self.q.shape
        w = self.q.to(torch.float32).view(n, -1, self.group_size) * self.scales.unsqueeze(-1)
        if self.zeros is not None:
            w = w + self.zeros.unsqueeze(-1)
        return w.view(n, k)

    def rows(self, index: Tensor | slice) -> Int8Data:
        zeros = None if self.zeros is None else self.zeros[index]
        return Int8Data(q=self.q[index], scales=self.scales[index], group_size=self.group_size, zeros=zeros)

    def symmetric(self) -> Int8Data:
        """The weight without its offsets (what the int8 kernels multiply)."""
        return Int8Data(q=self.q, scales=self.scales, group_size=self.group_size)


WeightData = Tensor | Int4Data | Int8Data


def cat_rows(parts: Sequence[WeightData]) -> WeightData:
    """Concatenate weights of one kind along output rows (fusing q/k/v or gate/up)."""
    first = parts[0]
    if isinstance(first, Int4Data):
        return Int4Data(
            q=torch.cat([p.q for p in parts]),
            scales=torch.cat([p.scales for p in parts]),
            zeros=torch.cat([p.zeros for p in parts]),
            group_size=first.group_size,
        )
    if isinstance(first, Int8Data):
        zeros = None
        if any(p.zeros is not None for p in parts):  # a part without offsets has zero ones
            zeros = torch.cat([torch.zeros_like(p.scales) if p.zeros is None else p.zeros for p in parts])
        return Int8Data(
            q=torch.cat([p.q for p in parts]), scales=torch.cat([p.scales for p in parts]), group_size=first.group_size,
            zeros=zeros,
        )  # fmt: skip
    return torch.cat(list(parts))


def same_kind(parts: Sequence[WeightData]) -> bool:
    kinds = {(type(p), getattr(p, "group_size", None)) for p in parts}
    return len(kinds) == 1


# --------------------------------------------------------------------------------------------
# quantizers (float -> int), row-chunked by the caller for huge tensors


def quantize_int4(w: Tensor, group_size: int = DEFAULT_GROUP_SIZE) -> Int4Data:
    """Asymmetric min/max groupwise int4 of a float ``[N, K]`` weight."""
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"int4: in_features {k} is not a multiple of the group size {group_size}")
    g = w.to(torch.float32).view(n, k // group_size, group_size)
    lo = g.amin(-1)
    hi = g.amax(-1)
    scales = ((hi - lo) / 15.0).clamp_min(1e-10)
    q = ((g - lo.unsqueeze(-1)) / scales.unsqueeze(-1)).round_().clamp_(0, 15).to(torch.uint8)
    return Int4Data(q=q.view(n, k), scales=scales, zeros=lo + 8.0 * scales, group_size=group_size)


def quantize_int8(w: Tensor, group_size: int | None = None) -> Int8Data:
    """Symmetric int8 of a float ``[N, K]`` weight, per channel (``group_size=None``) or per group."""
    n, k = w.shape
    gs = k if group_size is None else group_size
    g = w.to(torch.float32).view(n, k // gs, gs)
    scales = (g.abs().amax(-1) / 127.0).clamp_min(1e-10)
    q = (g / scales.unsqueeze(-1)).round_().clamp_(-127, 127).to(torch.int8)
    return Int8Data(q=q.view(n, k), scales=scales, group_size=gs)


def int8_per_channel(data: Int8Data) -> Int8Data:
    """Requantize per-group int8 (GGUF Q8_0) to per-channel int8 for ``_weight_int8pack_mm``.

    Lossy: on SmolLM2's Q8_0 token embedding the relative Frobenius error is about 1.2 %.
    """
    if data.group_size == data.q.shape[1]:
        return data
    return quantize_int8(data.dequantize(), None)

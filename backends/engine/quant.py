"""Weight-only quantized linear layers, and the plain-torch reference that defines them.

int4 (groupwise, asymmetric): ``W[n, k] = (q[n, k] - 8) * scale[n, g] + zero[n, g]`` with
``q`` in 0..15 and ``g = k // group_size``: torch's int4pack convention. GGUF maps onto it
without loss: Q4_0 ``w = d * (q - 8)`` is ``scale = d, zero = 0``; Q4_1 ``w = d * q + m`` is
``scale = d, zero = m + 8 d`` (exact in float32; rounded to bfloat16 when the layer computes in
bfloat16, because the packed kernel wants its scales in the activation dtype).

int8 (symmetric): ``W[n, k] = q[n, k] * scale[n, g]``. Per channel (one group spanning the row)
runs through ``_weight_int8pack_mm``; per group (GGUF Q8_0 kept exactly) runs through the
dequantise path only.

Every module keeps ``forward(x[M, in]) -> [M, out]``, a ``dequantize(dtype)`` reference and an
``embed(ids)`` row gather. Which kernel a call takes is picked per call from the activation dtype
and ``M`` (see ``INT4_KERNEL_MAX_ROWS``): the packed kernels win at decode-sized ``M`` with bfloat16
activations, a transient dense tile wins at prefill-sized ``M``, and float32 activations always take
the dequantise path (the packed kernels are 20x slower there and float32 is the exact reference).

For tensor parallelism the quantized tensors shard along whole rows (column parallel) and whole
groups (row parallel): ``Int4Linear.to_data()`` unpacks to an ``Int4Data`` that can be sliced
and packed again with ``Int4Linear.from_data``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec
import torch
import torch.nn.functional as F
from torch import Tensor, nn

DEFAULT_GROUP_SIZE = 32

#: Largest activation row count that uses the packed int4 / int8 kernels; above it the layer's
#: weight is dequantised to a transient tile and multiplied densely (measured crossover on
#: 2 AVX-512 cores, SmolLM2 shapes; see docs/benchmarks.md).
INT4_KERNEL_MAX_ROWS = 64
INT8_KERNEL_MAX_ROWS = 8

#: Rows dequantised at a time when a huge weight (the vocabulary) takes the dequantise path.
DEQUANT_CHUNK_ROWS = 8192

_CPU_BLOCK_N = 64  # the CPU int4pack layout interleaves rows in blocks of 64 (checked at runtime)


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
    """Symmetric int8 weight; ``group_size == K`` means per channel."""

    q: Tensor  # int8 [N, K]
    scales: Tensor  # float32 [N, K // group_size]
    group_size: int

    def dequantize(self) -> Tensor:
        n, k = self.q.shape
        w = self.q.to(torch.float32).view(n, -1, self.group_size) * self.scales.unsqueeze(-1)
        return w.view(n, k)

    def rows(self, index: Tensor | slice) -> Int8Data:
        return Int8Data(q=self.q[index], scales=self.scales[index], group_size=self.group_size)


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
        return Int8Data(
            q=torch.cat([p.q for p in parts]), scales=torch.cat([p.scales for p in parts]), group_size=first.group_size
        )
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


# --------------------------------------------------------------------------------------------
# int4 packing / unpacking


def _cpu_pack(q: Tensor) -> Tensor:
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 2)


def _cpu_unpack(packed: Tensor, n: int, k: int) -> Tensor:
    """Inverse of the CPU int4pack layout: byte[b, k, j] = q[64b + j, k] | q[64b + 32 + j, k] << 4."""
    b = packed.view(n // _CPU_BLOCK_N, k, _CPU_BLOCK_N // 2)
    out = torch.empty(n // _CPU_BLOCK_N, 2, _CPU_BLOCK_N // 2, k, dtype=torch.uint8, device=packed.device)
    torch.bitwise_and(b, 15, out=out[:, 0].transpose(1, 2))
    torch.bitwise_right_shift(b, 4, out=out[:, 1].transpose(1, 2))
    return out.view(n, k)


_cpu_layout_ok: bool | None = None


def _cpu_layout_known() -> bool:
    """Whether this torch build packs int4 for CPU in the layout ``_cpu_unpack`` inverts."""
    global _cpu_layout_ok
    if _cpu_layout_ok is None:
        gen = torch.Generator().manual_seed(0)
        q = torch.randint(0, 16, (128, 64), dtype=torch.uint8, generator=gen)
        packed = _cpu_pack(q)
        _cpu_layout_ok = packed.shape == (128, 32) and torch.equal(_cpu_unpack(packed, 128, 64), q)
    return _cpu_layout_ok


def _inner_k_tiles(k: int) -> int:
    for tiles in (8, 4, 2):
        if k % (tiles * 16) == 0:
            return tiles
    raise ValueError(f"int4 on CUDA needs in_features divisible by 32 (got {k})")


class Int4Linear(nn.Module):
    """``y = x @ W.T (+ bias)`` with ``W`` groupwise int4 in torch's packed layout for its device.

    Buffers: ``weight`` (packed, device-specific), ``scales_and_zeros [G, N, 2]`` in the
    compute dtype, optional ``bias [N]``. ``out_features`` may be padded to the packing block
    (``padded_out``); outputs are sliced back.
    """

    def __init__(self, in_features: int, out_features: int, group_size: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.group_size = group_size
        self.padded_out = out_features
        self.register_buffer("bias", None)
        self._mm: Any = None
        self._cpu_layout = False

    @classmethod
    def from_data(
        cls, data: Int4Data, *, bias: Tensor | None = None, dtype: torch.dtype, device: torch.device | str = "cpu"
    ) -> Int4Linear:
        n, k = data.q.shape
        device = torch.device(device)
        mod = cls(k, n, data.group_size)
        block = _CPU_BLOCK_N if device.type == "cpu" else 8
        pad = (-n) % block
        q, scales, zeros = data.q, data.scales, data.zeros
        if pad:  # padded rows dequantise to 0 and are sliced off the output
            q = torch.cat([q, torch.full((pad, k), 8, dtype=torch.uint8)])
            scales = torch.cat([scales, torch.zeros(pad, scales.shape[1])])
            zeros = torch.cat([zeros, torch.zeros(pad, zeros.shape[1])])
        mod.padded_out = n + pad
        if device.type == "cpu":
            packed = _cpu_pack(q)
            mod._mm = torch.ops.aten._weight_int4pack_mm_for_cpu
            mod._cpu_layout = _cpu_layout_known()
        else:
            q = q.to(device)
            bytes_ = (q[:, 0::2] << 4) | q[:, 1::2]
            packed = torch.ops.aten._convert_weight_to_int4pack(bytes_.contiguous(), _inner_k_tiles(k))
            mod._mm = torch.ops.aten._weight_int4pack_mm
        sz = torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous()  # [G, N, 2]
        mod.register_buffer("weight", packed)
        mod.register_buffer("scales_and_zeros", sz.to(device=device, dtype=dtype))
        if bias is not None:
            mod.bias = bias.to(device=device, dtype=dtype)
        return mod

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, group_size={self.group_size}"

    # reference ---------------------------------------------------------------------------------

    def unpacked_q(self, rows: slice | None = None) -> Tensor:
        """``q`` (uint8 ``[N, K]``, padded rows included) for ``rows`` (a multiple-of-64 slice)."""
        k = self.in_features
        if self._cpu_layout:
            packed = self.weight
            if rows is not None:
                per = _CPU_BLOCK_N * k // 2
                packed = packed.view(-1)[rows.start // _CPU_BLOCK_N * per : rows.stop // _CPU_BLOCK_N * per]
                return _cpu_unpack(packed, rows.stop - rows.start, k)
            return _cpu_unpack(packed, self.padded_out, k)
        # Generic: run the kernel on the identity with scale 1 and zero 8, which yields q exactly.
        g = k // self.group_size
        unit = torch.zeros(g, self.padded_out, 2, dtype=torch.bfloat16, device=self.weight.device)
        unit[..., 0] = 1.0
        unit[..., 1] = 8.0
        eye = torch.eye(k, dtype=torch.bfloat16, device=self.weight.device)
        q = self._mm(eye, self.weight, self.group_size, unit).t().to(torch.uint8)
        return q if rows is None else q[rows]

    def dequantize(self, dtype: torch.dtype | None = None, rows: slice | None = None) -> Tensor:
        """Dense ``[out_features, K]`` weight in ``dtype`` (default: the scales' dtype); ``rows``:
        a slice of the padded rows in multiples of 64."""
        dtype = dtype or self.scales_and_zeros.dtype
        q = self.unpacked_q(rows)
        n, k = q.shape
        sz = self.scales_and_zeros if rows is None else self.scales_and_zeros[:, rows]
        scales = sz[..., 0].t().unsqueeze(-1).to(dtype)  # [N, G, 1]
        zeros = sz[..., 1].t().unsqueeze(-1).to(dtype)
        w = q.to(dtype).view(n, -1, self.group_size)
        w.sub_(8.0).mul_(scales).add_(zeros)
        w = w.view(n, k)
        return w[: self.out_features] if rows is None else w

    def to_data(self) -> Int4Data:
        """The unpacked form (float32 scales), e.g. to slice for tensor parallelism and pack again."""
        sz = self.scales_and_zeros.float()
        n = self.out_features
        return Int4Data(
            q=self.unpacked_q()[:n], scales=sz[:, :n, 0].t().contiguous(), zeros=sz[:, :n, 1].t().contiguous(),
            group_size=self.group_size,
        )  # fmt: skip

    # forward -----------------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.bfloat16 and (x.shape[0] <= INT4_KERNEL_MAX_ROWS or x.device.type != "cpu"):
            y = self._mm(x, self.weight, self.group_size, self.scales_and_zeros)
        elif self.padded_out > DEQUANT_CHUNK_ROWS and self._cpu_layout:
            y = torch.cat(
                [
                    F.linear(x, self.dequantize(x.dtype, slice(r, min(r + DEQUANT_CHUNK_ROWS, self.padded_out))))
                    for r in range(0, self.padded_out, DEQUANT_CHUNK_ROWS)
                ],
                dim=-1,
            )
        else:
            y = F.linear(x, self.dequantize(x.dtype))
        if self.padded_out != self.out_features:
            y = y[:, : self.out_features]
        if self.bias is not None:
            y = y + self.bias
        return y

    def embed(self, ids: Tensor) -> Tensor:
        """Rows ``ids`` of the dequantised weight: an embedding lookup, ``[T, K]``."""
        k, gs = self.in_features, self.group_size
        dtype = self.scales_and_zeros.dtype
        if self._cpu_layout:
            blocks = self.weight.view(-1, k, _CPU_BLOCK_N // 2)
            r = ids % _CPU_BLOCK_N
            b = blocks[ids // _CPU_BLOCK_N, :, r % (_CPU_BLOCK_N // 2)]  # [T, K]
            shift = (r >= _CPU_BLOCK_N // 2).to(torch.uint8).mul_(4).unsqueeze(-1)
            q = torch.bitwise_right_shift(b, shift).bitwise_and_(15)
        else:
            q = self.unpacked_q()[ids]
        sz = self.scales_and_zeros[:, ids].transpose(0, 1)  # [T, G, 2]
        w = q.to(dtype).view(-1, k // gs, gs).sub_(8.0).mul_(sz[..., 0:1]).add_(sz[..., 1:2])
        return w.view(-1, k)


class Int8Linear(nn.Module):
    """``y = x @ W.T (+ bias)`` with symmetric int8 ``W``; per channel uses ``_weight_int8pack_mm``."""

    def __init__(self, in_features: int, out_features: int, group_size: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.group_size = group_size
        self.per_channel = group_size == in_features
        self.register_buffer("bias", None)

    @classmethod
    def from_data(
        cls, data: Int8Data, *, bias: Tensor | None = None, dtype: torch.dtype, device: torch.device | str = "cpu"
    ) -> Int8Linear:
        n, k = data.q.shape
        mod = cls(k, n, data.group_size)
        mod.register_buffer("weight", data.q.to(device).contiguous())
        scales = data.scales.view(n) if mod.per_channel else data.scales
        mod.register_buffer("scales", scales.to(device=device, dtype=dtype).contiguous())
        if bias is not None:
            mod.bias = bias.to(device=device, dtype=dtype)
        return mod

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, group_size={self.group_size}"

    def dequantize(self, dtype: torch.dtype | None = None, rows: slice | None = None) -> Tensor:
        dtype = dtype or self.scales.dtype
        q = self.weight if rows is None else self.weight[rows]
        s = self.scales if rows is None else self.scales[rows]
        n, k = q.shape
        w = q.to(dtype).view(n, -1, self.group_size)
        w.mul_(s.to(dtype).view(n, -1, 1))
        return w.view(n, k)

    def to_data(self) -> Int8Data:
        return Int8Data(q=self.weight, scales=self.scales.float().view(self.out_features, -1), group_size=self.group_size)

    def forward(self, x: Tensor) -> Tensor:
        if (
            self.per_channel
            and x.dtype == torch.bfloat16
            and x.device.type == "cpu"
            and x.shape[0] <= INT8_KERNEL_MAX_ROWS
        ):
            y = torch.ops.aten._weight_int8pack_mm(x, self.weight, self.scales)
        elif self.out_features > DEQUANT_CHUNK_ROWS:
            y = torch.cat(
                [
                    F.linear(x, self.dequantize(x.dtype, slice(r, r + DEQUANT_CHUNK_ROWS)))
                    for r in range(0, self.out_features, DEQUANT_CHUNK_ROWS)
                ],
                dim=-1,
            )
        else:
            y = F.linear(x, self.dequantize(x.dtype))
        if self.bias is not None:
            y = y + self.bias
        return y

    def embed(self, ids: Tensor) -> Tensor:
        k, gs = self.in_features, self.group_size
        dtype = self.scales.dtype
        w = self.weight[ids].to(dtype).view(-1, k // gs, gs)
        w.mul_(self.scales[ids].view(-1, k // gs, 1))
        return w.view(-1, k)


class DenseLinear(nn.Module):
    """Unquantized ``y = x @ W.T (+ bias)``; also the embedding table when tied."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer("bias", None)

    @classmethod
    def from_data(
        cls, w: Tensor, *, bias: Tensor | None = None, dtype: torch.dtype, device: torch.device | str = "cpu"
    ) -> DenseLinear:
        n, k = w.shape
        mod = cls(k, n)
        mod.register_buffer("weight", w.to(device=device, dtype=dtype).contiguous())
        if bias is not None:
            mod.bias = bias.to(device=device, dtype=dtype)
        return mod

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}"

    def dequantize(self, dtype: torch.dtype | None = None, rows: slice | None = None) -> Tensor:
        w = self.weight if rows is None else self.weight[rows]
        return w if dtype is None else w.to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)

    def embed(self, ids: Tensor) -> Tensor:
        return F.embedding(ids, self.weight)


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


QuantLinear = Int4Linear | Int8Linear | DenseLinear | ConcatLinear


def make_linear(
    data: WeightData, *, bias: Tensor | None = None, dtype: torch.dtype, device: torch.device | str = "cpu"
) -> nn.Module:
    """The module for ``data``: ``Int4Data`` -> ``Int4Linear``, ``Int8Data`` -> ``Int8Linear``,
    a float tensor -> ``DenseLinear``."""
    if isinstance(data, Int4Data):
        return Int4Linear.from_data(data, bias=bias, dtype=dtype, device=device)
    if isinstance(data, Int8Data):
        return Int8Linear.from_data(data, bias=bias, dtype=dtype, device=device)
    return DenseLinear.from_data(data, bias=bias, dtype=dtype, device=device)

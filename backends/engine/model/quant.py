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
``embed(ids, dtype)`` row gather. The path is picked per call from the activation dtype and ``M``:
float32 activations take the dequantise path (the plain-torch reference; the packed kernels are
~20x slower with float32 activations); bfloat16 activations take the packed int4 kernel at every
``M`` (exact stored weights, float32 accumulation; see ``INT4_DENSE_TILE_MIN_ROWS`` for the faster,
less exact bfloat16 tile) and the int8 kernel at decode-sized ``M``.

For tensor parallelism the quantized tensors shard along whole rows (column parallel) and whole
groups (row parallel): ``Int4Linear.to_data()`` unpacks to an ``Int4Data`` that can be sliced
and packed again with ``Int4Linear.from_data``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import msgspec
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backends.engine.native import ckernels
from backends.engine.native import hugepages

DEFAULT_GROUP_SIZE = 32

#: bfloat16 activations with more rows than this take a transient dense tile of the dequantised
#: weight in bfloat16 instead of the packed int4 kernel. ``None`` (the default): always the kernel.
#: Measured on 2 AVX-512 cores (SmolLM2's 3072x576, M=512): the bfloat16 tile is 1.85x faster than
#: the kernel, but it rounds the weights to bfloat16, which took SmolLM2's teacher-forced top-1
#: agreement with the float32 reference from 0.991 to 0.978; the kernel dequantises in float32 and
#: accumulates in float32 (its output equals float32 math rounded once to bfloat16).
INT4_DENSE_TILE_MIN_ROWS: int | None = None
#: ``_weight_int8pack_mm`` costs grow linearly with M (a GEMV per row); above this many rows the
#: exact float32 tile is cheaper.
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


_PACK_CHUNK_ROWS = 1024  # rows packed at a time: the packing op wants int32 input (8x the bytes)


def _cpu_pack(q: Tensor) -> Tensor:
    """Pack ``q`` (uint8 ``[N, K]``, N a multiple of 64) in row chunks; the layout is blocked by
    64 rows, so packed chunks concatenate into the packing of the whole."""
    n = q.shape[0]
    if n <= _PACK_CHUNK_ROWS or n % _CPU_BLOCK_N:
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 2)
    out = torch.empty(n, q.shape[1] // 2, dtype=torch.uint8)
    for r in range(0, n, _PACK_CHUNK_ROWS):
        chunk = q[r : r + _PACK_CHUNK_ROWS].to(torch.int32)
        out[r : r + chunk.shape[0]] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(chunk, 2)
    return out


def _cpu_unpack(packed: Tensor, n: int, k: int) -> Tensor:
    """Inverse of the CPU int4pack layout: byte[b, k, j] = q[64b + j, k] | q[64b + 32 + j, k] << 4."""
    b = packed.view(n // _CPU_BLOCK_N, k, _CPU_BLOCK_N // 2)
    out = torch.empty(n // _CPU_BLOCK_N, 2, _CPU_BLOCK_N // 2, k, dtype=torch.uint8, device=packed.device)
    torch.bitwise_and(b, 15, out=out[:, 0].transpose(1, 2))
    torch.bitwise_right_shift(b, 4, out=out[:, 1].transpose(1, 2))
    return out.view(n, k)


def _native_pack(q: Tensor) -> Tensor:
    """``q`` (uint8 ``[N, K]``, N a multiple of 16, K of 8) in the native int4 kernel's layout
    (``kernels/int4_matmul.c``): per 16 rows and 8 columns one 64-byte chunk whose byte
    ``4 i + 2 e + b`` holds, low nibble first, ``q[i, k0 + 4 b + e]`` and ``q[i, k0 + 4 b + 2 + e]``.
    Returned as ``[N, K // 2]`` bytes, rows in 16-row blocks (row chunks concatenate)."""
    n, k = q.shape
    a = q.view(n // 16, 16, k // 8, 2, 2, 2).permute(0, 2, 1, 5, 3, 4)  # [blk, kc, i, e, b, h]
    return (a[..., 0] | (a[..., 1] << 4)).reshape(n, k // 2)


def _native_nibbles(chunks: Tensor) -> Tensor:
    """``[..., 4]`` lane bytes of the native layout -> ``[..., 8]`` values in column order."""
    both = torch.stack([chunks & 15, chunks >> 4], dim=-1)  # [..., 4 (e, b), 2 (h)]
    shape = both.shape[:-2]
    return both.view(*shape, 2, 2, 2).permute(*range(len(shape)), -2, -1, -3).reshape(*shape, 8)  # [..., b, h, e]


def _native_unpack(packed: Tensor, n: int, k: int) -> Tensor:
    """Inverse of ``_native_pack``."""
    chunks = packed.reshape(n // 16, k // 8, 16, 4).transpose(1, 2)  # [blk, i, kc, 4]
    return _native_nibbles(chunks).reshape(n, k)


def _native_kernels(device: torch.device, dtype: torch.dtype, k: int, group_size: int, group_multiple: int) -> ckernels.Kernels | None:
    """The native kernels, where a layer of this shape may run on their matmuls: CPU, bfloat16,
    groups a multiple of ``group_multiple`` dividing ``k``."""
    if device.type != "cpu" or dtype != torch.bfloat16 or group_size % group_multiple or k % group_size:
        return None
    return ckernels.load()


def _native_int4_kernel(device: torch.device, dtype: torch.dtype, k: int, group_size: int) -> bool:
    kernels = _native_kernels(device, dtype, k, group_size, 8)
    return kernels is not None and kernels.has_int4_matmul


def _native_matmul(mod: nn.Module, x: Tensor, launch: Any) -> Tensor:
    """``[M, mod.padded_out]`` from ``launch(kernels, x, y)``, a native matmul call returning its
    status; ``x`` made unit-strided along its rows first."""
    kernels = ckernels.load()
    assert kernels is not None, "a native-layout weight exists only where the kernels loaded"
    if x.stride(-1) != 1:
        x = x.contiguous()
    y = torch.empty(x.shape[0], mod.padded_out, dtype=x.dtype)
    status = launch(kernels, x, y)
    if status != 0:
        raise RuntimeError(f"native matmul failed ({status}) on x {tuple(x.shape)}, weight {mod}")
    return y


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
    """``y = x @ W.T (+ bias)`` with ``W`` groupwise int4, packed for the kernel that runs it.

    Buffers: ``weight`` (packed, device-specific), ``scales_and_zeros [G, N, 2]`` in the
    compute dtype, optional ``bias [N]``. ``out_features`` may be padded to the packing block
    (``padded_out``); outputs are sliced back.

    ``layout``: ``"native"`` (CPU, bfloat16, the native kernel built: ``kernels/int4_matmul.c``,
    exact weights, float32 sums, each row's result independent of the batch), ``"torch_cpu"``
    (torch's ``_weight_int4pack_mm_for_cpu``) or ``"opaque"`` (CUDA's tiled layout).
    """

    def __init__(self, in_features: int, out_features: int, group_size: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.group_size = group_size
        self.padded_out = out_features
        self.register_buffer("bias", None)
        self._mm: Any = None
        self.layout = "opaque"
        self._unpacked: Tensor | None = None  # q kept for row gathers when the layout is opaque

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
        if _native_int4_kernel(device, dtype, k, data.group_size):
            packed = _native_pack(q)
            mod.layout = "native"
        elif device.type == "cpu":
            packed = _cpu_pack(q)
            mod._mm = torch.ops.aten._weight_int4pack_mm_for_cpu
            mod.layout = "torch_cpu" if _cpu_layout_known() else "opaque"
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

    @classmethod
    def from_row_chunks(cls, chunks: Iterable[Int4Data], rows: int, *, dtype: torch.dtype) -> Int4Linear:
        """``from_data`` of the row-concatenated ``chunks`` (CPU; every chunk but the last a whole
        number of 64-row blocks), packing one chunk at a time so no full-size temporary exists."""
        mod: Int4Linear | None = None
        weight = sz = None
        start = 0
        for data in chunks:
            part = cls.from_data(data, dtype=dtype, device="cpu")
            if mod is None:
                mod = cls(part.in_features, rows, part.group_size)
                mod.padded_out = rows + (-rows) % _CPU_BLOCK_N
                mod._mm, mod.layout = part._mm, part.layout
                weight = torch.empty(mod.padded_out, part.weight.shape[1], dtype=part.weight.dtype)
                sz = torch.empty(part.scales_and_zeros.shape[0], mod.padded_out, 2, dtype=dtype)
            assert start % _CPU_BLOCK_N == 0, "only the last chunk may be padded"
            weight[start : start + part.padded_out] = part.weight
            sz[:, start : start + part.padded_out] = part.scales_and_zeros
            start += part.out_features
        assert mod is not None and start == rows
        mod.register_buffer("weight", weight)
        mod.register_buffer("scales_and_zeros", sz)
        return mod

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, group_size={self.group_size}"

    # reference ---------------------------------------------------------------------------------

    def unpacked_q(self, rows: slice | None = None) -> Tensor:
        """``q`` (uint8 ``[N, K]``, padded rows included) for ``rows`` (a multiple-of-64 slice)."""
        k = self.in_features
        if self.layout != "opaque":
            unpack = _native_unpack if self.layout == "native" else _cpu_unpack
            packed = self.weight
            if rows is not None:
                per = _CPU_BLOCK_N * k // 2
                packed = packed.view(-1)[rows.start // _CPU_BLOCK_N * per : rows.stop // _CPU_BLOCK_N * per]
                return unpack(packed, rows.stop - rows.start, k)
            return unpack(packed, self.padded_out, k)
        # Generic (e.g. CUDA's layout): run the kernel on the identity with scale 1 and zero 8, which
        # yields q exactly. Costly, so the result is kept (1 byte per weight on the device).
        if self._unpacked is not None:
            return self._unpacked if rows is None else self._unpacked[rows]
        g = k // self.group_size
        unit = torch.zeros(g, self.padded_out, 2, dtype=torch.bfloat16, device=self.weight.device)
        unit[..., 0] = 1.0
        unit[..., 1] = 8.0
        eye = torch.eye(k, dtype=torch.bfloat16, device=self.weight.device)
        q = self._mm(eye, self.weight, self.group_size, unit).t().to(torch.uint8)
        self._unpacked = q
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
        if x.dtype is not torch.bfloat16 or (
            INT4_DENSE_TILE_MIN_ROWS is not None and x.shape[0] > INT4_DENSE_TILE_MIN_ROWS and self.layout != "opaque"
        ):  # float32: the plain-torch reference; or the optional bfloat16 tile
            return _dense_forward(self, x)
        if self.layout == "native":
            y = _native_matmul(self, x, self._launch)
        else:
            y = self._mm(x, self.weight, self.group_size, self.scales_and_zeros)
        if self.padded_out != self.out_features:
            y = y[:, : self.out_features]
        return y if self.bias is None else y + self.bias

    def _launch(self, kernels: ckernels.Kernels, x: Tensor, y: Tensor) -> int:
        return self.native_matmul(kernels, x, x.stride(0), x.shape[0], y)

    def native_matmul(
        self, kernels: ckernels.Kernels, x: Tensor, x_stride: int, rows: int, y: Tensor | None, *,
        bias: Tensor | None = None, residual: Tensor | None = None, act: int = 0,
    ) -> int:  # fmt: skip
        """``kernels/int4_matmul.c`` on this (native-layout) weight; returns its status. The
        epilogues and prologue the fused layer uses: ``bias`` padded to ``padded_out``, the result
        added into a float32 ``residual`` instead of written to ``y``, ``act=1`` for x = gate|up."""
        return kernels.int4_matmul_bf16(
            x.data_ptr(), x_stride, rows, self.weight.data_ptr(), self.scales_and_zeros.data_ptr(),
            self.padded_out, self.in_features, self.group_size,
            None if y is None else y.data_ptr(), 0 if y is None else y.stride(0), torch.get_num_threads(),
            None if bias is None else bias.data_ptr(),
            None if residual is None else residual.data_ptr(), 0 if residual is None else residual.stride(0), act,
        )  # fmt: skip

    def gather_q(self, ids: Tensor) -> Tensor:
        """``q`` of rows ``ids`` (uint8 ``[T, K]``), read straight from the packed layout."""
        k = self.in_features
        if self.layout == "native":
            lanes = self.weight.view(-1, k // 8, 16, 4)[ids // 16, :, ids % 16]  # [T, K / 8, 4]
            return _native_nibbles(lanes).reshape(-1, k)
        if self.layout == "opaque":
            return self.unpacked_q()[ids]
        blocks = self.weight.view(-1, k, _CPU_BLOCK_N // 2)
        r = ids % _CPU_BLOCK_N
        b = blocks[ids // _CPU_BLOCK_N, :, r % (_CPU_BLOCK_N // 2)]  # [T, K]
        shift = (r >= _CPU_BLOCK_N // 2).to(torch.uint8).mul_(4).unsqueeze(-1)
        return torch.bitwise_right_shift(b, shift).bitwise_and_(15)

    def embed(self, ids: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """Rows ``ids`` of the dequantised weight (an embedding lookup), ``[T, K]`` in ``dtype``
        (default: the compute dtype)."""
        k, gs = self.in_features, self.group_size
        sz = self.scales_and_zeros[:, ids].transpose(0, 1).to(dtype or self.scales_and_zeros.dtype)  # [T, G, 2]
        w = self.gather_q(ids).to(sz.dtype).view(-1, k // gs, gs).sub_(8.0).mul_(sz[..., 0:1]).add_(sz[..., 1:2])
        return w.view(-1, k)


def _dense_forward(mod: nn.Module, x: Tensor) -> Tensor:
    """``x @ mod.dequantize().T``, a row chunk at a time for vocabulary-sized weights."""
    n = getattr(mod, "padded_out", mod.out_features)
    if n <= DEQUANT_CHUNK_ROWS:
        y = F.linear(x, mod.dequantize(x.dtype))
    else:
        chunks = [mod.dequantize(x.dtype, slice(r, min(r + DEQUANT_CHUNK_ROWS, n))) for r in range(0, n, DEQUANT_CHUNK_ROWS)]
        y = torch.cat([F.linear(x, w) for w in chunks], dim=-1)[:, : mod.out_features]
    return y if mod.bias is None else y + mod.bias


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

    @property
    def compute_dtype(self) -> torch.dtype:
        """The activation dtype the layer was built for (its scales')."""
        return self.scales.dtype

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
        elif x.dtype == torch.float32:
            return _dense_forward(self, x)
        else:  # many bfloat16 rows: the exact float32 tile
            return _dense_forward(self, x.float()).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y

    def embed(self, ids: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        k, gs = self.in_features, self.group_size
        dtype = dtype or self.scales.dtype
        w = self.weight[ids].to(dtype).view(-1, k // gs, gs)
        w.mul_(self.scales[ids].to(dtype).view(-1, k // gs, 1))
        return w.view(-1, k)


class Int8GroupLinear(Int8Linear):
    """Per-group symmetric int8 (GGUF Q8_0: ``w = d * q``, q in -127..127, groups of 32) kept
    exactly and run through the int4 kernel, for which no per-group int8 kernel exists.

    ``q = 16 * hi + lo`` with ``hi`` in -8..7 and ``lo`` in 0..15. Each group becomes one 64-wide
    int4 group holding the 32 nibbles ``hi + 8`` then the 32 nibbles ``lo``, with scale ``d`` and
    zero ``8 d / 17``, and is fed the input ``[16 x_g, x_g]``. The kernel computes
    ``(nibble - 8) * d + z`` per weight, so the group contributes
    ``sum(d q x) + (17 z - 8 d) * sum(x_g)``: exact for ``z = 8 d / 17``, up to the rounding of
    ``z`` (and ``d``) to the activation dtype. Same bytes per weight as int8, same speed as an
    int4 matmul of twice the width.
    """

    def __init__(self, inner: Int4Linear, group_size: int) -> None:
        nn.Module.__init__(self)  # an Int8Linear by contract (to_data, scales), not by storage
        self.inner = inner
        self.in_features = inner.in_features // 2
        self.out_features = inner.out_features
        self.group_size = group_size
        self.per_channel = False

    @classmethod
    def from_data(
        cls, data: Int8Data, *, bias: Tensor | None = None, dtype: torch.dtype, device: torch.device | str = "cpu"
    ) -> Int8GroupLinear:
        n, k = data.q.shape
        gs = data.group_size

        def nibbles(rows: slice) -> Int4Data:
            q = data.q[rows].to(torch.int16).view(-1, k // gs, 1, gs)
            hi = torch.div(q, 16, rounding_mode="floor")
            both = torch.cat([hi + 8, q - 16 * hi], dim=2).to(torch.uint8).view(-1, 2 * k)
            scales = data.scales[rows].float()
            return Int4Data(q=both, scales=scales, zeros=scales * (8.0 / 17.0), group_size=2 * gs)

        if torch.device(device).type == "cpu" and n > _PACK_CHUNK_ROWS:  # the vocabulary: bound temporaries
            chunks = (nibbles(slice(r, r + _PACK_CHUNK_ROWS)) for r in range(0, n, _PACK_CHUNK_ROWS))
            inner = Int4Linear.from_row_chunks(chunks, n, dtype=dtype)
            if bias is not None:
                inner.bias = bias.to(dtype=dtype)
        else:
            inner = Int4Linear.from_data(nibbles(slice(0, n)), bias=bias, dtype=dtype, device=device)
        return cls(inner, gs)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, group_size={self.group_size}"

    @property
    def bias(self) -> Tensor | None:
        return self.inner.bias

    @property
    def scales(self) -> Tensor:
        """``d`` as ``[N, G]`` (in the compute dtype)."""
        return self.inner.scales_and_zeros[:, : self.out_features, 0].t()

    def _q(self, nibbles: Tensor) -> Tensor:
        v = nibbles.view(nibbles.shape[0], -1, 2, self.group_size).to(torch.int16)
        return (16 * (v[:, :, 0] - 8) + v[:, :, 1]).view(nibbles.shape[0], -1)  # [R, K]

    def to_data(self) -> Int8Data:
        q = self._q(self.inner.unpacked_q()[: self.out_features]).to(torch.int8)
        return Int8Data(q=q, scales=self.scales.float().contiguous(), group_size=self.group_size)

    def dequantize(self, dtype: torch.dtype | None = None, rows: slice | None = None) -> Tensor:
        dtype = dtype or self.inner.scales_and_zeros.dtype
        q = self._q(self.inner.unpacked_q(rows))
        sz = self.inner.scales_and_zeros if rows is None else self.inner.scales_and_zeros[:, rows]
        n, k = q.shape
        w = q.to(dtype).view(n, -1, self.group_size).mul_(sz[..., 0].t().unsqueeze(-1).to(dtype)).view(n, k)
        return w[: self.out_features] if rows is None else w

    def embed(self, ids: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        sz = self.inner.scales_and_zeros[:, ids, 0].t().unsqueeze(-1).to(dtype or self.inner.scales_and_zeros.dtype)
        w = self._q(self.inner.gather_q(ids)).to(sz.dtype).view(-1, sz.shape[1], self.group_size).mul_(sz)
        return w.view(-1, self.in_features)

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32:  # the exact reference: q * d in float32
            return _dense_forward(self, x)
        xg = x.view(x.shape[0], -1, 1, self.group_size)
        return self.inner(torch.cat([xg * 16, xg], dim=2).view(x.shape[0], -1))


def _native_int8_kernel(device: torch.device, dtype: torch.dtype, k: int, group_size: int) -> bool:
    kernels = _native_kernels(device, dtype, k, group_size, 2)
    return kernels is not None and kernels.has_int8_matmul


class Int8NativeLinear(Int8Linear):
    """Per-group int8 (GGUF Q8_0, ``W = d * q``) on the native int8 kernel (``kernels/int8_matmul.c``):
    every weight exact, ``d`` kept in float32, float32 sums, each row independent of the batch.

    Buffers: ``weight`` int8 in the kernel's layout (16-row blocks, 32 bytes per column pair:
    row ``i``'s two values at bytes ``2i, 2i + 1``), ``scales_t`` float32 ``[G, N]``. Rows are
    padded to 16 (``padded_out``) with zero scales. Half the work per row of ``Int8GroupLinear``'s
    two-nibble form, which it replaces where the kernel is built.
    """

    def __init__(self, in_features: int, out_features: int, group_size: int, dtype: torch.dtype) -> None:
        super().__init__(in_features, out_features, group_size)
        self.per_channel = False
        self._compute_dtype = dtype  # its scales stay float32 whatever it computes in
        self.padded_out = out_features + (-out_features) % 16

    @classmethod
    def from_data(
        cls, data: Int8Data, *, bias: Tensor | None = None, dtype: torch.dtype, device: torch.device | str = "cpu"
    ) -> Int8NativeLinear:
        n, k = data.q.shape
        mod = cls(k, n, data.group_size, dtype)
        rows = mod.padded_out
        weight = hugepages.empty((rows // 16, k // 2, 16, 2), torch.int8).zero_()  # the vocabulary: 28 MB on SmolLM2
        for r in range(0, n - n % 16, _PACK_CHUNK_ROWS):  # whole blocks, a chunk at a time
            stop = min(r + _PACK_CHUNK_ROWS, n - n % 16)
            weight[r // 16 : stop // 16] = data.q[r:stop].view(-1, 16, k // 2, 2).transpose(1, 2)
        if n % 16:
            tail = torch.zeros(16, k, dtype=torch.int8)
            tail[: n % 16] = data.q[n - n % 16 :]
            weight[-1] = tail.view(16, k // 2, 2).transpose(0, 1)
        scales = torch.zeros(data.scales.shape[1], rows, dtype=torch.float32)
        scales[:, :n] = data.scales.t()
        mod.register_buffer("weight", weight.view(rows, k))
        mod.register_buffer("scales_t", scales)
        if bias is not None:
            mod.bias = bias.to(dtype=dtype)
        return mod

    @property
    def compute_dtype(self) -> torch.dtype:
        return self._compute_dtype

    @property
    def scales(self) -> Tensor:  # type: ignore[override]
        """``d`` as ``[N, G]`` float32."""
        return self.scales_t[:, : self.out_features].t()

    def _rows_q(self, ids: Tensor) -> Tensor:
        k = self.in_features
        return self.weight.view(-1, k // 2, 16, 2)[ids // 16, :, ids % 16].reshape(-1, k)

    def dequantize(self, dtype: torch.dtype | None = None, rows: slice | None = None) -> Tensor:
        dtype = dtype or self.compute_dtype
        ids = torch.arange(self.out_features) if rows is None else torch.arange(rows.start, rows.stop)
        return self.embed(ids, dtype)

    def to_data(self) -> Int8Data:
        q = self._rows_q(torch.arange(self.out_features))
        return Int8Data(q=q, scales=self.scales.contiguous(), group_size=self.group_size)

    def embed(self, ids: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        k, gs = self.in_features, self.group_size
        d = self.scales_t[:, ids].t().unsqueeze(-1)  # [T, G, 1] float32
        w = self._rows_q(ids).float().view(-1, k // gs, gs).mul_(d).view(-1, k)
        return w.to(dtype or self.compute_dtype)

    def _launch(self, kernels: ckernels.Kernels, x: Tensor, y: Tensor) -> int:
        return kernels.int8_matmul_bf16(
            x.data_ptr(), x.stride(0), x.shape[0], self.weight.data_ptr(), self.scales_t.data_ptr(),
            self.padded_out, self.in_features, self.group_size, y.data_ptr(), y.stride(0), torch.get_num_threads(),
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype != torch.bfloat16:
            return _dense_forward(self, x)
        y = _native_matmul(self, x, self._launch)
        if self.padded_out != self.out_features:
            y = y[:, : self.out_features]
        return y if self.bias is None else y + self.bias


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


QuantLinear = Int4Linear | Int8GroupLinear | Int8NativeLinear | Int8Linear | DenseLinear | ConcatLinear


def make_linear(
    data: WeightData, *, bias: Tensor | None = None, dtype: torch.dtype, device: torch.device | str = "cpu"
) -> nn.Module:
    """The module for ``data``: ``Int4Data`` -> ``Int4Linear``; ``Int8Data`` -> ``Int8Linear`` per
    channel, per group ``Int8NativeLinear`` (where the native kernel runs) or ``Int8GroupLinear``;
    a float tensor -> ``DenseLinear``."""
    if isinstance(data, Int4Data):
        return Int4Linear.from_data(data, bias=bias, dtype=dtype, device=device)
    if isinstance(data, Int8Data):
        if data.group_size == data.q.shape[1]:
            return Int8Linear.from_data(data, bias=bias, dtype=dtype, device=device)
        if _native_int8_kernel(torch.device(device), dtype, data.q.shape[1], data.group_size):
            return Int8NativeLinear.from_data(data, bias=bias, dtype=dtype)
        return Int8GroupLinear.from_data(data, bias=bias, dtype=dtype, device=device)
    return DenseLinear.from_data(data, bias=bias, dtype=dtype, device=device)

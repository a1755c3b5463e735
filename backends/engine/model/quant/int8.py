"""Symmetric int8 weights: per channel (``Int8Linear``), and per group (GGUF Q8_0) kept exactly,
on the native int8 kernel (``Int8NativeLinear``) or, without it, as two int4 nibbles through the
int4 kernels (``Int8GroupLinear``).

Per channel runs through ``_weight_int8pack_mm`` at decode-sized ``M`` (``INT8_KERNEL_MAX_ROWS``)
and the exact float32 tile above; float32 activations always take the dequantise reference.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from backends.engine.model.quant import layouts
from backends.engine.model.quant.data import Int4Data, Int8Data
from backends.engine.model.quant.dense import Linear, dense_forward
from backends.engine.model.quant.int4 import Int4Linear
from backends.engine.native import abi, hugepages

if TYPE_CHECKING:
    from backends.engine.native.ckernels import Kernels

#: ``_weight_int8pack_mm`` costs grow linearly with M (a GEMV per row); above this many rows the
#: exact float32 tile is cheaper.
INT8_KERNEL_MAX_ROWS = 8


class Int8Linear(Linear):
    """``y = x @ W.T (+ bias)`` with symmetric int8 ``W``; per channel uses ``_weight_int8pack_mm``."""

    def __init__(self, in_features: int, out_features: int, group_size: int) -> None:
        super().__init__(in_features, out_features)
        self.group_size = group_size
        self.per_channel = group_size == in_features

    @classmethod
    def from_data(
        cls, data: Int8Data, *, bias: Tensor | None = None, dtype: torch.dtype, device: torch.device | str = "cpu"
    ) -> Int8Linear:
        n, k = data.q.shape
        mod = cls(k, n, data.group_size)
        mod.register_buffer("weight", data.q.to(device).contiguous())
        scales = data.scales.view(n) if mod.per_channel else data.scales
        mod.register_buffer("scales", scales.to(device=device, dtype=dtype).contiguous())
        return mod.with_bias(bias, dtype=dtype, device=device)

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
            return dense_forward(self, x)
        else:  # many bfloat16 rows: the exact float32 tile
            return dense_forward(self, x.float()).to(x.dtype)
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
        cls, data: Int8Data, *, bias: Tensor | None = None, dtype: torch.dtype, device: torch.device | str = "cpu",
        kernels: Kernels | None = None,
    ) -> Int8GroupLinear:  # fmt: skip
        n, k = data.q.shape
        gs = data.group_size

        def nibbles(rows: slice) -> Int4Data:
            q = data.q[rows].to(torch.int16).view(-1, k // gs, 1, gs)
            hi = torch.div(q, 16, rounding_mode="floor")
            both = torch.cat([hi + 8, q - 16 * hi], dim=2).to(torch.uint8).view(-1, 2 * k)
            scales = data.scales[rows].float()
            return Int4Data(q=both, scales=scales, zeros=scales * (8.0 / 17.0), group_size=2 * gs)

        chunk = layouts.PACK_CHUNK_ROWS
        if torch.device(device).type == "cpu" and n > chunk:  # the vocabulary: bound temporaries
            chunks = (nibbles(slice(r, r + chunk)) for r in range(0, n, chunk))
            inner = Int4Linear.from_row_chunks(chunks, n, dtype=dtype, kernels=kernels).with_bias(bias, dtype=dtype)
        else:
            inner = Int4Linear.from_data(nibbles(slice(0, n)), bias=bias, dtype=dtype, device=device, kernels=kernels)
        return cls(inner, gs)

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
        dtype = dtype or self.inner.compute_dtype
        q = self._q(self.inner.unpacked_q(rows))
        sz = self.inner.scales_and_zeros if rows is None else self.inner.scales_and_zeros[:, rows]
        n, k = q.shape
        w = q.to(dtype).view(n, -1, self.group_size).mul_(sz[..., 0].t().unsqueeze(-1).to(dtype)).view(n, k)
        return w[: self.out_features] if rows is None else w

    def embed(self, ids: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        sz = self.inner.scales_and_zeros[:, ids, 0].t().unsqueeze(-1).to(dtype or self.inner.compute_dtype)
        w = self._q(self.inner.gather_q(ids)).to(sz.dtype).view(-1, sz.shape[1], self.group_size).mul_(sz)
        return w.view(-1, self.in_features)

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32:  # the exact reference: q * d in float32
            return dense_forward(self, x)
        xg = x.view(x.shape[0], -1, 1, self.group_size)
        return self.inner(torch.cat([xg * 16, xg], dim=2).view(x.shape[0], -1))


class Int8NativeLinear(Int8Linear):
    """Per-group int8 (GGUF Q8_0, ``W = d * q``) on the native int8 kernel (``native/csrc/int8_matmul.c``):
    every weight exact, ``d`` kept in float32, float32 sums, each row independent of the batch.

    Buffers: ``weight`` int8 in the kernel's layout (16-row blocks, 32 bytes per column pair:
    row ``i``'s two values at bytes ``2i, 2i + 1``), ``scales_t`` ``[G, N]`` float32, or float16 where
    every ``d`` is one (GGUF's Q8_0: kept exactly in half the bytes; ``scale_format``). Rows are
    padded to 16 (``padded_out``) with zero scales. Half the work per row of ``Int8GroupLinear``'s
    two-nibble form, which it replaces where the kernel is built.
    """

    def __init__(self, in_features: int, out_features: int, group_size: int, dtype: torch.dtype, kernels: Kernels) -> None:
        super().__init__(in_features, out_features, group_size)
        self.per_channel = False
        self._compute_dtype = dtype  # its scales stay float32 whatever it computes in
        self.padded_out = out_features + (-out_features) % 16
        self.kernels = kernels
        self.scale_format = abi.INT8_SCALES_F32

    @classmethod
    def from_data(  # type: ignore[override]
        cls, data: Int8Data, *, kernels: Kernels, bias: Tensor | None = None, dtype: torch.dtype
    ) -> Int8NativeLinear:
        """On the CPU; ``kernels``: the loaded native kernels, with the int8 matmul."""
        n, k = data.q.shape
        mod = cls(k, n, data.group_size, dtype, kernels)
        chunk = layouts.PACK_CHUNK_ROWS
        rows = mod.padded_out
        weight = hugepages.empty((rows // 16, k // 2, 16, 2), torch.int8).zero_()  # the vocabulary: 28 MB on SmolLM2
        for r in range(0, n - n % 16, chunk):  # whole blocks, a chunk at a time
            stop = min(r + chunk, n - n % 16)
            weight[r // 16 : stop // 16] = data.q[r:stop].view(-1, 16, k // 2, 2).transpose(1, 2)
        if n % 16:
            tail = torch.zeros(16, k, dtype=torch.int8)
            tail[: n % 16] = data.q[n - n % 16 :]
            weight[-1] = tail.view(16, k // 2, 2).transpose(0, 1)
        scales = torch.zeros(data.scales.shape[1], rows, dtype=torch.float32)
        scales[:, :n] = data.scales.t()
        if torch.equal(scales.half().float(), scales):
            scales, mod.scale_format = scales.half(), abi.INT8_SCALES_F16
        mod.register_buffer("weight", weight.view(rows, k))
        mod.register_buffer("scales_t", scales)
        return mod.with_bias(bias, dtype=dtype)

    @property
    def compute_dtype(self) -> torch.dtype:
        return self._compute_dtype

    @property
    def scales(self) -> Tensor:  # type: ignore[override]
        """``d`` as ``[N, G]`` float32."""
        return self.scales_t[:, : self.out_features].t().float()

    def _rows_q(self, ids: Tensor) -> Tensor:
        # a row's column pair is one 16-bit word of its block: gathering words, not byte pairs, took
        # 32 rows of SmolLM2's head (the logit refinement of every step) from ~85 us to ~13
        k = self.in_features
        return self.weight.view(torch.int16).view(-1, k // 2, 16)[ids // 16, :, ids % 16].view(torch.int8).reshape(-1, k)

    def dequantize(self, dtype: torch.dtype | None = None, rows: slice | None = None) -> Tensor:
        dtype = dtype or self.compute_dtype
        ids = torch.arange(self.out_features) if rows is None else torch.arange(rows.start, rows.stop)
        return self.embed(ids, dtype)

    def to_data(self) -> Int8Data:
        q = self._rows_q(torch.arange(self.out_features))
        return Int8Data(q=q, scales=self.scales.contiguous(), group_size=self.group_size)

    def embed(self, ids: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        k, gs = self.in_features, self.group_size
        d = self.scales_t[:, ids].t().unsqueeze(-1).float()  # [T, G, 1]
        w = self._rows_q(ids).float().view(-1, k // gs, gs).mul_(d).view(-1, k)
        return w.to(dtype or self.compute_dtype)

    def projection(self, bias: Tensor | None) -> abi.Projection:
        """This weight as the fused layer's ``Projection`` (``bias`` padded to ``padded_out``)."""
        return abi.Projection(
            w=self.weight.data_ptr(), bias=None if bias is None else bias.data_ptr(), n=self.padded_out,
            gs=self.group_size, d=self.scales_t.data_ptr(), kind=abi.PROJECTION_INT8, scales=self.scale_format,
        )  # fmt: skip

    def _launch(self, x: Tensor, y: Tensor) -> int:
        return self.kernels.int8_matmul_bf16(
            abi.Int8MatmulArgs(
                x=x.data_ptr(), x_stride=x.stride(0), m=x.shape[0], w=self.weight.data_ptr(), d=self.scales_t.data_ptr(),
                n=self.padded_out, k=self.in_features, group_size=self.group_size, y=y.data_ptr(), y_stride=y.stride(0),
                num_threads=torch.get_num_threads(), scales=self.scale_format,
            )
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype != torch.bfloat16:
            return dense_forward(self, x)
        y = layouts.native_matmul(self, x, self._launch)
        if self.padded_out != self.out_features:
            y = y[:, : self.out_features]
        return y if self.bias is None else y + self.bias


class Int8OffsetLinear(nn.Module):
    """Per-group int8 with an offset per group (``Int8Data.zeros``: GGUF Q5_1, Q5_K, Q2_K, whose
    values are ``d * q + m``): ``inner`` multiplies the symmetric part on whichever int8 kernel
    takes it, and the offsets add ``sum_g(x) @ zeros.T`` — one small matmul over the ``K / gs``
    group sums, every weight's value kept exactly (up to float32 rounding of the offset)."""

    def __init__(self, inner: nn.Module, zeros: Tensor, group_size: int) -> None:
        super().__init__()
        self.inner = inner
        self.group_size = group_size
        self.in_features, self.out_features = inner.in_features, inner.out_features
        self.register_buffer("zeros", zeros.float().contiguous())  # [N, G]

    @property
    def bias(self) -> Tensor | None:
        return self.inner.bias

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.inner.compute_dtype

    def _offsets(self, rows: Tensor | slice | None, dtype: torch.dtype) -> Tensor:
        z = self.zeros if rows is None else self.zeros[rows]
        return z.repeat_interleave(self.group_size, dim=1).to(dtype)

    def dequantize(self, dtype: torch.dtype | None = None, rows: slice | None = None) -> Tensor:
        w = self.inner.dequantize(dtype, rows)
        return w + self._offsets(rows, w.dtype)

    def embed(self, ids: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        w = self.inner.embed(ids, dtype)
        return w + self._offsets(ids, w.dtype)

    def to_data(self) -> Int8Data:
        data = self.inner.to_data()
        return Int8Data(q=data.q, scales=data.scales, group_size=data.group_size, zeros=self.zeros)

    def forward(self, x: Tensor) -> Tensor:
        y = self.inner(x)
        sums = x.float().view(x.shape[0], -1, self.group_size).sum(-1)  # [T, G]
        offsets = torch.mm(sums, self.zeros.t())
        if y.dtype == torch.float32:
            return y.add_(offsets)
        return offsets.add_(y).to(y.dtype)  # the two parts summed in float32, rounded once

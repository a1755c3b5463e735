"""Per-group int8 whose codes fit five bits (GGUF Q5_0, Q5_1, Q5_K, Q3_K, Q2_K: ``-16 <= q <= 15``)
on the native int5 kernel (``native/csrc/projection_matmul.c``): ``Int5Linear``; six bits without
zeros (GGUF Q6_K: ``-32 <= q <= 31``) on its six-bit variant: ``Int6Linear``.

Such a weight held as int8 reads a byte per weight; here it reads 5/8 (6/8) of one, the low four
bits in the native int4 layout and the rest as masks beside them, and it runs in the fused decoder
layer and the one-call decode step like int4 (``Projection.kind``). ``make_linear`` picks it for
``Int8Data`` of that range where the kernels run it; ``to_data`` gives the ``Int8Data`` back.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from backends.engine.model.quant import layouts
from backends.engine.model.quant.data import Int8Data
from backends.engine.model.quant.dense import dense_forward
from backends.engine.model.quant.int8 import Int8Linear
from backends.engine.native import abi

if TYPE_CHECKING:
    from backends.engine.native.ckernels import Kernels

#: the int5 kernel's output rows come in pairs of 16-row blocks
BLOCK_ROWS = 32


def narrow_class(data: Int8Data) -> type[Int5Linear] | None:
    """``Int5Linear`` where every code of ``data`` fits five bits (``-16..15``), ``Int6Linear``
    where six (``-32..31``) and it has no zeros, else None (one pass over the codes)."""
    if not data.q.numel():
        return None
    lo, hi = (int(v) for v in torch.aminmax(data.q))
    if lo >= -16 and hi <= 15:
        return Int5Linear
    if lo >= -32 and hi <= 31 and data.zeros is None:
        return Int6Linear
    return None


class Int5Linear(Int8Linear):
    """``W = (u - 16) * scale + zero`` per group, ``u`` in 0..31 (``q + 16`` of the ``Int8Data``).

    Buffers: ``weight`` (``u & 15`` in the native int4 layout), ``high`` (the fifth bits as the
    kernel's masks: per 16 rows and 8 columns 16 bytes, ``layouts.high_bits_pack``),
    ``scales_zeros [G, 2, N]`` float32 (per group the scales, then the zeros: every weight is the
    exchange form's value, as ``Int8NativeLinear`` keeps them); without zeros ``[G, 1, N]``, in
    float16 where every scale is one (GGUF Q5_0's are), else float32: 5.5 bits read per weight
    instead of 7 (``scale_format``, the kernel's ``Projection.scales``). Rows padded to 32
    (``padded_out``) with zero scales. Native only: CPU, bfloat16.
    """

    BITS, OFFSET, KIND = 5, 16, abi.PROJECTION_INT5

    def __init__(
        self, in_features: int, out_features: int, group_size: int, dtype: torch.dtype, kernels: Kernels, has_zeros: bool
    ) -> None:
        super().__init__(in_features, out_features, group_size)
        self._compute_dtype = dtype  # its scales stay float32 whatever it computes in
        self.per_channel = False
        self.padded_out = out_features + (-out_features) % BLOCK_ROWS
        self.kernels = kernels
        self.has_zeros = has_zeros
        self.scale_format = abi.INT5_SCALES_ZEROS

    @classmethod
    def from_data(  # type: ignore[override]
        cls, data: Int8Data, *, kernels: Kernels, bias: Tensor | None = None, dtype: torch.dtype
    ) -> Int5Linear:
        n, k = data.q.shape
        mod = cls(k, n, data.group_size, dtype, kernels, data.zeros is not None)
        pad = mod.padded_out - n
        u = (data.q.to(torch.int16) + cls.OFFSET).to(torch.uint8)
        scales = data.scales.float()
        zeros = None if data.zeros is None else data.zeros.float()
        if pad:  # padded rows: scale and zero 0
            u = torch.cat([u, torch.full((pad, k), cls.OFFSET, dtype=torch.uint8)])
            scales = torch.cat([scales, torch.zeros(pad, scales.shape[1])])
            zeros = None if zeros is None else torch.cat([zeros, torch.zeros(pad, zeros.shape[1])])
        mod.register_buffer("weight", layouts.native_pack(u & 15))
        mod.register_buffer("high", layouts.high_bits_pack(u, cls.BITS))
        if zeros is not None:
            sz = torch.stack([scales.t(), zeros.t()], dim=1)  # [G, 2, N]
        elif torch.equal(scales.half().float(), scales):
            sz, mod.scale_format = scales.t().half().unsqueeze(1), abi.INT5_SCALES_F16
        else:
            sz, mod.scale_format = scales.t().unsqueeze(1), abi.INT5_SCALES_F32
        mod.register_buffer("scales_zeros", sz.contiguous())
        return mod.with_bias(bias, dtype=dtype)

    @property
    def compute_dtype(self) -> torch.dtype:
        return self._compute_dtype

    @property
    def scales(self) -> Tensor:  # type: ignore[override]
        """``[N, G]`` float32."""
        return self.scales_zeros[:, 0, : self.out_features].float().t()

    def _u(self, ids: Tensor) -> Tensor:
        """``u`` (uint8 ``[T, K]``) of rows ``ids``."""
        k = self.in_features
        lanes = self.weight.view(-1, k // 8, 16, 4)[ids // 16, :, ids % 16]  # [T, K / 8, 4]
        low = layouts.native_nibbles(lanes).reshape(-1, k)
        return low | (layouts.high_bits_unpack(self.high, low, ids, self.BITS) << 4)

    def embed(self, ids: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        k, gs = self.in_features, self.group_size
        sz = self.scales_zeros[:, :, ids].permute(2, 0, 1).float()  # [T, G, 2 or 1]
        w = self._u(ids).float().view(-1, k // gs, gs).sub_(float(self.OFFSET)).mul_(sz[..., 0:1])
        if self.has_zeros:
            w.add_(sz[..., 1:2])
        return w.view(-1, k).to(dtype or self.compute_dtype)

    def dequantize(self, dtype: torch.dtype | None = None, rows: slice | None = None) -> Tensor:
        ids = torch.arange(self.out_features) if rows is None else torch.arange(rows.start, rows.stop)
        return self.embed(ids, dtype)

    def to_data(self) -> Int8Data:
        ids = torch.arange(self.out_features)
        q = (self._u(ids).to(torch.int16) - self.OFFSET).to(torch.int8)
        sz = self.scales_zeros[:, :, : self.out_features].float()
        zeros = sz[:, 1].t().contiguous() if self.has_zeros else None
        return Int8Data(q=q, scales=sz[:, 0].t().contiguous(), group_size=self.group_size, zeros=zeros)

    def projection(self, bias: Tensor | None) -> abi.Projection:
        """This weight as the fused layer's ``Projection`` (``bias`` padded to ``padded_out``)."""
        return abi.Projection(
            w=self.weight.data_ptr(), sz=None, bias=None if bias is None else bias.data_ptr(), n=self.padded_out,
            gs=self.group_size, hb=self.high.data_ptr(), d=self.scales_zeros.data_ptr(), kind=self.KIND,
            scales=self.scale_format,
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype != torch.bfloat16:
            return dense_forward(self, x)
        bias = None if self.bias is None else torch.cat([self.bias, self.bias.new_zeros(self.padded_out - self.out_features)])
        projection = self.projection(bias)
        y = layouts.native_matmul(
            self, x, lambda x, y: layouts.native_project(self.kernels, projection, x, x.stride(0), x.shape[0], self.in_features, y)
        )
        return y[:, : self.out_features] if self.padded_out != self.out_features else y


class Int6Linear(Int5Linear):
    """``Int5Linear`` for six-bit codes without zeros (GGUF Q6_K: ``W = (u - 32) * scale``, ``u`` in
    0..63): two masks per nibble position (``layouts.high_bits_pack(u, 6)``) complete a six-bit
    index into ``VPERMT2W``'s 64-entry table; 6 bits per weight and its float32 scales (Q6_K: per
    16) instead of the per-group int8 kernel's 8."""

    BITS, OFFSET, KIND = 6, 32, abi.PROJECTION_INT6

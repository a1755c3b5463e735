"""Groupwise int4 weights (``Int4Linear``), packed for the kernel that runs them.

The path is picked per call from the activation dtype and ``M``: float32 activations take the
dequantise path (the plain-torch reference; the packed kernels are ~20x slower with float32
activations); bfloat16 activations take the packed kernel at every ``M`` (the native one where
the layer was built with the native kernels, else torch's; exact stored weights, float32
accumulation; see ``INT4_DENSE_TILE_MIN_ROWS`` for the faster, less exact bfloat16 tile).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from backends.engine.model.quant import layouts
from backends.engine.model.quant.data import Int4Data
from backends.engine.model.quant.dense import Linear, dense_forward
from backends.engine.native import abi

if TYPE_CHECKING:
    from backends.engine.native.ckernels import Kernels

#: bfloat16 activations with more rows than this take a transient dense tile of the dequantised
#: weight in bfloat16 instead of the packed int4 kernel. ``None`` (the default): always the kernel.
#: Measured on 2 AVX-512 cores (SmolLM2's 3072x576, M=512): the bfloat16 tile is 1.85x faster than
#: the kernel, but it rounds the weights to bfloat16, which took SmolLM2's teacher-forced top-1
#: agreement with the float32 reference from 0.991 to 0.978; the kernel dequantises in float32 and
#: accumulates in float32 (its output equals float32 math rounded once to bfloat16).
INT4_DENSE_TILE_MIN_ROWS: int | None = None


def _half_exact(t: Tensor) -> bool:
    return torch.equal(t.half().float(), t)


class Int4Linear(Linear):
    """``y = x @ W.T (+ bias)`` with ``W`` groupwise int4, packed for the kernel that runs it.

    Buffers: ``weight`` (packed, device-specific), ``scales_and_zeros [G, N, 2]`` in the
    compute dtype — or, in the native layout where every zero is 0 and every scale a float16 (GGUF's
    Q4_0: ``d`` is a float16), ``[G, N, 1]`` float16 scales alone (``scale_format``, the kernel's
    ``Int4MatmulArgs.scales``): the weights stay exact, and a decode step reads 9 bits per weight,
    not 10; where scale and offset ``m = zero - 8 * scale`` are float16s (GGUF's Q4_1: ``W = d q + m``),
    float16 ``d`` and ``m`` as ``[G, N / 16, 2, 16]`` (each 16 rows' ``d``, then their ``m``: one
    load each in the kernel): exact too, where bfloat16 pairs would round both — optional
    ``bias [N]``. ``out_features`` may be padded to the packing block
    (``padded_out``); outputs are sliced back.

    ``layout``: ``"native"`` (CPU, bfloat16, built with the native kernels, which it keeps in
    ``kernels``: ``native/csrc/int4_matmul.c``, exact weights, float32 sums, each row's result
    independent of the batch), ``"torch_cpu"`` (torch's ``_weight_int4pack_mm_for_cpu``) or
    ``"opaque"`` (CUDA's tiled layout).
    """

    def __init__(self, in_features: int, out_features: int, group_size: int) -> None:
        super().__init__(in_features, out_features)
        self.group_size = group_size
        self.padded_out = out_features
        self.kernels: Kernels | None = None  # the native kernels, for the native layout
        self._mm: Any = None
        self.layout = "opaque"
        self._unpacked: Tensor | None = None  # q kept for row gathers when the layout is opaque
        self._compute_dtype = torch.bfloat16
        self.scale_format = abi.INT4_SCALES_BF16_PAIRS

    @classmethod
    def from_data(
        cls, data: Int4Data, *, bias: Tensor | None = None, dtype: torch.dtype, device: torch.device | str = "cpu",
        kernels: Kernels | None = None,
    ) -> Int4Linear:  # fmt: skip
        """Packed for ``device``: the native layout where ``kernels`` (the loaded native kernels,
        or None) run it, else torch's."""
        n, k = data.q.shape
        device = torch.device(device)
        mod = cls(k, n, data.group_size)
        block = layouts.CPU_BLOCK_N if device.type == "cpu" else 8
        pad = (-n) % block
        q, scales, zeros = data.q, data.scales, data.zeros
        if pad:  # padded rows dequantise to 0 and are sliced off the output
            q = torch.cat([q, torch.full((pad, k), 8, dtype=torch.uint8)])
            scales = torch.cat([scales, torch.zeros(pad, scales.shape[1])])
            zeros = torch.cat([zeros, torch.zeros(pad, zeros.shape[1])])
        mod.padded_out = n + pad
        if kernels is not None and layouts.runs_native(kernels.has_int4_matmul, device, dtype, k, data.group_size, 8):
            packed = layouts.native_pack(q)
            mod.layout, mod.kernels = "native", kernels
        elif device.type == "cpu":
            packed = layouts.cpu_pack(q)
            mod._mm = torch.ops.aten._weight_int4pack_mm_for_cpu
            mod.layout = "torch_cpu" if layouts.cpu_layout_known() else "opaque"
        else:
            q = q.to(device)
            bytes_ = (q[:, 0::2] << 4) | q[:, 1::2]
            packed = torch.ops.aten._convert_weight_to_int4pack(bytes_.contiguous(), layouts.inner_k_tiles(k))
            mod._mm = torch.ops.aten._weight_int4pack_mm
        mod._compute_dtype = dtype
        sz = None
        if mod.layout == "native" and _half_exact(scales):
            offsets = zeros - 8.0 * scales  # W = scales * q + offsets: GGUF's Q4_1 (d, m)
            if not zeros.any():
                sz = scales.t().half().unsqueeze(-1)  # [G, N, 1]
                mod.scale_format = abi.INT4_SCALES_F16
            elif _half_exact(offsets):
                dm = torch.stack([scales.t(), offsets.t()], dim=1).half()  # [G, 2, N]
                sz = dm.view(dm.shape[0], 2, -1, 16).transpose(1, 2)  # [G, N / 16, 2, 16]
                mod.scale_format = abi.INT4_SCALES_F16_OFFSETS
        if sz is None:
            sz = torch.stack([scales, zeros], dim=-1).transpose(0, 1).to(dtype)  # [G, N, 2]
        mod.register_buffer("weight", packed)
        mod.register_buffer("scales_and_zeros", sz.contiguous().to(device))
        return mod.with_bias(bias, dtype=dtype, device=device)

    @classmethod
    def from_row_chunks(
        cls, chunks: Iterable[Int4Data], rows: int, *, dtype: torch.dtype, kernels: Kernels | None = None
    ) -> Int4Linear:
        """``from_data`` of the row-concatenated ``chunks`` (CPU; every chunk but the last a whole
        number of 64-row blocks), packing one chunk at a time so no full-size temporary exists."""
        mod: Int4Linear | None = None
        weight = None
        parts: list[Int4Linear] = []
        start = 0
        for data in chunks:
            part = cls.from_data(data, dtype=dtype, device="cpu", kernels=kernels)
            if mod is None:
                mod = cls(part.in_features, rows, part.group_size)
                mod.padded_out = rows + (-rows) % layouts.CPU_BLOCK_N
                mod._mm, mod.layout, mod.kernels, mod._compute_dtype = part._mm, part.layout, part.kernels, dtype
                weight = torch.empty(mod.padded_out, part.weight.shape[1], dtype=part.weight.dtype)
            assert start % layouts.CPU_BLOCK_N == 0, "only the last chunk may be padded"
            weight[start : start + part.padded_out] = part.weight
            parts.append(part)
            start += part.out_features
        assert mod is not None and start == rows
        formats = {part.scale_format for part in parts}
        # one chunk's scales not all float16 (or with zeros): every chunk as (scale, zero) pairs
        mod.scale_format = formats.pop() if len(formats) == 1 else abi.INT4_SCALES_BF16_PAIRS
        sz = [part.scales_and_zeros if part.scale_format == mod.scale_format else part.scale_pairs() for part in parts]
        mod.register_buffer("weight", weight)
        mod.register_buffer("scales_and_zeros", torch.cat(sz, dim=1))
        return mod

    @property
    def compute_dtype(self) -> torch.dtype:
        return self._compute_dtype

    def scale_pairs(self, rows: Tensor | slice | None = None, dtype: torch.dtype | None = None) -> Tensor:
        """(scale, zero) ``[G, N, 2]`` (padded rows included) of ``rows``, in ``dtype`` (default:
        the compute dtype)."""
        sz = self.scales_and_zeros
        if self.scale_format == abi.INT4_SCALES_F16_OFFSETS:  # (d, m) -> (d, m + 8 d), as the kernel
            if isinstance(rows, Tensor):  # row r's pair is [:, r // 16, :, r % 16]
                sz = sz[:, rows // 16, :, rows % 16].transpose(0, 1)
            else:
                start, stop = (0, None) if rows is None else (rows.start or 0, rows.stop)
                if rows is not None and rows.step is None and start % 16 == 0 and stop is not None and stop % 16 == 0:
                    sz, rows = sz[:, start // 16 : stop // 16], None  # whole blocks (dequantize's chunks)
                sz = sz.transpose(2, 3).reshape(sz.shape[0], -1, 2)
                sz = sz if rows is None else sz[:, rows]
            d, m = sz.float().unbind(-1)
            return torch.stack([d, m + 8.0 * d], dim=-1).to(dtype or self.compute_dtype)
        sz = sz if rows is None else sz[:, rows]
        if self.scale_format == abi.INT4_SCALES_F16:
            sz = torch.cat([sz, torch.zeros_like(sz)], dim=-1)
        return sz.to(dtype or self.compute_dtype)

    # reference ---------------------------------------------------------------------------------

    def unpacked_q(self, rows: slice | None = None, *, keep: bool = True) -> Tensor:
        """``q`` (uint8 ``[N, K]``, padded rows included) for ``rows`` (a multiple-of-64 slice);
        ``keep``: on an opaque layout, keep the unpacked codes for later calls."""
        k = self.in_features
        if self.layout != "opaque":
            unpack = layouts.native_unpack if self.layout == "native" else layouts.cpu_unpack
            packed = self.weight
            if rows is not None:
                per = layouts.CPU_BLOCK_N * k // 2
                packed = packed.view(-1)[rows.start // layouts.CPU_BLOCK_N * per : rows.stop // layouts.CPU_BLOCK_N * per]
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
        if keep:
            self._unpacked = q
        return q if rows is None else q[rows]

    def dequantize(self, dtype: torch.dtype | None = None, rows: slice | None = None) -> Tensor:
        """Dense ``[out_features, K]`` weight in ``dtype`` (default: the compute dtype); ``rows``:
        a slice of the padded rows in multiples of 64."""
        dtype = dtype or self.compute_dtype
        q = self.unpacked_q(rows)
        n, k = q.shape
        sz = self.scale_pairs(rows, dtype)
        scales = sz[..., 0].t().unsqueeze(-1)  # [N, G, 1]
        zeros = sz[..., 1].t().unsqueeze(-1)
        w = q.to(dtype).view(n, -1, self.group_size)
        w.sub_(8.0).mul_(scales).add_(zeros)
        w = w.view(n, k)
        return w[: self.out_features] if rows is None else w

    def to_data(self) -> Int4Data:
        """The unpacked form (float32 scales), e.g. to slice for tensor parallelism and pack again."""
        sz = self.scale_pairs(dtype=torch.float32)
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
            return dense_forward(self, x)
        if self.layout == "native":
            y = layouts.native_matmul(self, x, self._launch)
        else:
            y = self._mm(x, self.weight, self.group_size, self.scales_and_zeros)
        if self.padded_out != self.out_features:
            y = y[:, : self.out_features]
        return y if self.bias is None else y + self.bias

    def _launch(self, x: Tensor, y: Tensor) -> int:
        return self.native_matmul(x, x.stride(0), x.shape[0], y)

    def native_matmul(
        self, x: Tensor, x_stride: int, rows: int, y: Tensor | None, *,
        bias: Tensor | None = None, residual: Tensor | None = None, act: int = 0,
    ) -> int:  # fmt: skip
        """``int4_matmul.c`` on this (native-layout) weight; returns its status. The epilogues and
        prologue the fused layer uses: ``bias`` padded to ``padded_out``, the result added into a
        float32 ``residual`` instead of written to ``y``, ``act=1`` for x = gate|up."""
        assert self.kernels is not None, "only a native-layout weight runs the native kernel"
        return self.kernels.int4_matmul_bf16(
            abi.Int4MatmulArgs(
                x=x.data_ptr(), x_stride=x_stride, m=rows, w=self.weight.data_ptr(), sz=self.scales_and_zeros.data_ptr(),
                n=self.padded_out, k=self.in_features, group_size=self.group_size,
                y=None if y is None else y.data_ptr(), y_stride=0 if y is None else y.stride(0),
                num_threads=torch.get_num_threads(), bias=None if bias is None else bias.data_ptr(),
                residual=None if residual is None else residual.data_ptr(),
                residual_stride=0 if residual is None else residual.stride(0), act=act, scales=self.scale_format,
            )
        )  # fmt: skip

    def projection(self, bias: Tensor | None) -> abi.Projection:
        """This (native-layout) weight as the fused layer's ``Projection`` (``bias`` padded to
        ``padded_out``)."""
        assert self.layout == "native", "only a native-layout weight runs the native kernels"
        return abi.Projection(
            w=self.weight.data_ptr(), sz=self.scales_and_zeros.data_ptr(), bias=None if bias is None else bias.data_ptr(),
            n=self.padded_out, gs=self.group_size, kind=abi.PROJECTION_INT4, scales=self.scale_format,
        )  # fmt: skip

    def gather_q(self, ids: Tensor) -> Tensor:
        """``q`` of rows ``ids`` (uint8 ``[T, K]``), read straight from the packed layout."""
        k = self.in_features
        if self.layout == "native":
            lanes = self.weight.view(-1, k // 8, 16, 4)[ids // 16, :, ids % 16]  # [T, K / 8, 4]
            return layouts.native_nibbles(lanes).reshape(-1, k)
        if self.layout == "opaque":
            return self.unpacked_q()[ids]
        blocks = self.weight.view(-1, k, layouts.CPU_BLOCK_N // 2)
        r = ids % layouts.CPU_BLOCK_N
        b = blocks[ids // layouts.CPU_BLOCK_N, :, r % (layouts.CPU_BLOCK_N // 2)]  # [T, K]
        shift = (r >= layouts.CPU_BLOCK_N // 2).to(torch.uint8).mul_(4).unsqueeze(-1)
        return torch.bitwise_right_shift(b, shift).bitwise_and_(15)

    def embed(self, ids: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """Rows ``ids`` of the dequantised weight (an embedding lookup), ``[T, K]`` in ``dtype``
        (default: the compute dtype)."""
        k, gs = self.in_features, self.group_size
        sz = self.scale_pairs(ids, dtype).transpose(0, 1)  # [T, G, 2]
        w = self.gather_q(ids).to(sz.dtype).view(-1, k // gs, gs).sub_(8.0).mul_(sz[..., 0:1]).add_(sz[..., 1:2])
        return w.view(-1, k)

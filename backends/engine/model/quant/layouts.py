"""The packed layouts of quantized weights, and where the native kernels run them.

- torch's CPU int4pack (``_weight_int4pack_mm_for_cpu``): rows interleaved in blocks of 64;
- the native int4 layout (``native/csrc/int4_matmul.c``): 16-row blocks of 64-byte chunks;
- the native int5 and int6 layouts: the int4 one for the low four bits, masks of the bits above
  beside it (``native/csrc/projection_matmul.c``);
- CUDA's tiled int4 layout (opaque: unpacked by running the kernel on the identity).

A layer takes a native layout only when it is given the loaded kernels (``make_linear(...,
kernels=...)``) and its shape and dtype suit them (``runs_native``); it keeps those kernels and
calls them through ``native_matmul``.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from backends.engine.native import abi

if TYPE_CHECKING:
    from backends.engine.native.ckernels import Kernels

CPU_BLOCK_N = 64  # the CPU int4pack layout interleaves rows in blocks of 64 (checked at runtime)

PACK_CHUNK_ROWS = 1024  # rows packed at a time: the packing op wants int32 input (8x the bytes)


def cpu_pack(q: Tensor) -> Tensor:
    """Pack ``q`` (uint8 ``[N, K]``, N a multiple of 64) in row chunks; the layout is blocked by
    64 rows, so packed chunks concatenate into the packing of the whole."""
    n = q.shape[0]
    if n <= PACK_CHUNK_ROWS or n % CPU_BLOCK_N:
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 2)
    out = torch.empty(n, q.shape[1] // 2, dtype=torch.uint8)
    for r in range(0, n, PACK_CHUNK_ROWS):
        chunk = q[r : r + PACK_CHUNK_ROWS].to(torch.int32)
        out[r : r + chunk.shape[0]] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(chunk, 2)
    return out


def cpu_unpack(packed: Tensor, n: int, k: int) -> Tensor:
    """Inverse of the CPU int4pack layout: byte[b, k, j] = q[64b + j, k] | q[64b + 32 + j, k] << 4."""
    b = packed.view(n // CPU_BLOCK_N, k, CPU_BLOCK_N // 2)
    out = torch.empty(n // CPU_BLOCK_N, 2, CPU_BLOCK_N // 2, k, dtype=torch.uint8, device=packed.device)
    torch.bitwise_and(b, 15, out=out[:, 0].transpose(1, 2))
    torch.bitwise_right_shift(b, 4, out=out[:, 1].transpose(1, 2))
    return out.view(n, k)


def native_pack(q: Tensor) -> Tensor:
    """``q`` (uint8 ``[N, K]``, N a multiple of 16, K of 8) in the native int4 kernel's layout
    (``native/csrc/int4_matmul.c``): per 16 rows and 8 columns one 64-byte chunk whose byte
    ``4 i + 2 e + b`` holds, low nibble first, ``q[i, k0 + 4 b + e]`` and ``q[i, k0 + 4 b + 2 + e]``.
    Returned as ``[N, K // 2]`` bytes, rows in 16-row blocks (row chunks concatenate)."""
    n, k = q.shape
    a = q.view(n // 16, 16, k // 8, 2, 2, 2).permute(0, 2, 1, 5, 3, 4)  # [blk, kc, i, e, b, h]
    return (a[..., 0] | (a[..., 1] << 4)).reshape(n, k // 2)


def native_nibbles(chunks: Tensor) -> Tensor:
    """``[..., 4]`` lane bytes of the native layout -> ``[..., 8]`` values in column order."""
    both = torch.stack([chunks & 15, chunks >> 4], dim=-1)  # [..., 4 (e, b), 2 (h)]
    shape = both.shape[:-2]
    return both.view(*shape, 2, 2, 2).permute(*range(len(shape)), -2, -1, -3).reshape(*shape, 8)  # [..., b, h, e]


def native_unpack(packed: Tensor, n: int, k: int) -> Tensor:
    """Inverse of ``native_pack``."""
    chunks = packed.reshape(n // 16, k // 8, 16, 4).transpose(1, 2)  # [blk, i, kc, 4]
    return native_nibbles(chunks).reshape(n, k)


def high_bits_pack(u: Tensor, bits: int = 5) -> Tensor:
    """The int5 (``bits=5``) or int6 kernel's bits above the nibble of ``u`` (uint8 ``[N, K]`` codes
    below ``2**bits``, N a multiple of 16, K of 8) as it reads them (``native/csrc/projection_matmul.c``):
    per 16 rows and 8 columns ``bits - 4`` 32-bit masks per nibble position ``t`` (``t`` major),
    mask bit ``2 i + e`` for row ``i``, column ``k0 + 2 t + e`` (the word that column's nibble sits
    in after the kernel's shift by ``4 t``). Above the nibble that word holds the low bits of
    column ``k0 + 2 t + 2 + e``'s code (nothing for ``t = 3``); the masks hold ``D``, the high bits
    minus those, modulo ``2**(bits - 4)``, so that adding 16 and 32 under them leaves the whole code
    in the index bits the lookup reads. ``[N, K // 8 * (bits - 4)]`` bytes."""
    n, k = u.shape
    planes = bits - 4
    d = ((u >> 4).view(n, k // 8, 8).to(torch.int16) - _next_low(u, planes)) % (1 << planes)
    d = d.view(n // 16, 16, k // 8, 4, 2).permute(0, 2, 3, 1, 4).reshape(n // 16, k // 8, 4, 1, 32)  # [blk, kc, t, ., 2i + e]
    masks = (d >> torch.arange(planes, dtype=torch.int16).view(1, 1, 1, planes, 1)) & 1  # [blk, kc, t, plane, 32]
    weights = torch.tensor([1 << j for j in range(8)], dtype=torch.int32)
    packed = (masks.reshape(n // 16, k // 8, 4, planes, 4, 8).to(torch.int32) * weights).sum(-1)
    return packed.to(torch.uint8).reshape(n, k // 8 * planes)


def high_bits_unpack(plane: Tensor, low: Tensor, rows: Tensor, bits: int = 5) -> Tensor:
    """The bits above the nibble (uint8 ``[T, K]``) of ``rows`` (``[T]`` row indices) from the whole
    ``plane`` (``high_bits_pack``'s) and those rows' low nibbles ``low`` ``[T, K]``."""
    t, k = low.shape
    planes = bits - 4
    chunks = plane.view(-1, k // 8, 16 * planes)[rows // 16]  # [T, kc, bytes]
    b = (chunks.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8)) & 1  # [T, kc, bytes, 8]
    b = b.view(t, k // 8, 4, planes, 16, 2)[torch.arange(t), :, :, :, rows % 16]  # [T, kc, t, plane, e]
    d = (b.to(torch.int16) << torch.arange(planes, dtype=torch.int16).view(1, 1, 1, planes, 1)).sum(3)  # [T, kc, t, e]
    return ((d.reshape(t, k // 8, 8) + _next_low(low, planes)) % (1 << planes)).to(torch.uint8).view(t, k)


def _next_low(u: Tensor, planes: int) -> Tensor:
    """``[N, K // 8, 8]`` int16: per column ``k0 + c`` the low ``planes`` bits of column ``k0 + c + 2``'s
    code (0 for the chunk's last two columns): what the kernel's shifted word holds above the nibble."""
    n, k = u.shape
    out = torch.zeros(n, k // 8, 8, dtype=torch.int16)
    out[..., :6] = (u & ((1 << planes) - 1)).view(n, k // 8, 8)[..., 2:].to(torch.int16)
    return out


_cpu_layout_ok: bool | None = None


def cpu_layout_known() -> bool:
    """Whether this torch build packs int4 for CPU in the layout ``cpu_unpack`` inverts."""
    global _cpu_layout_ok
    if _cpu_layout_ok is None:
        gen = torch.Generator().manual_seed(0)
        q = torch.randint(0, 16, (128, 64), dtype=torch.uint8, generator=gen)
        packed = cpu_pack(q)
        _cpu_layout_ok = packed.shape == (128, 32) and torch.equal(cpu_unpack(packed, 128, 64), q)
    return _cpu_layout_ok


def inner_k_tiles(k: int) -> int:
    for tiles in (8, 4, 2):
        if k % (tiles * 16) == 0:
            return tiles
    raise ValueError(f"int4 on CUDA needs in_features divisible by 32 (got {k})")


def runs_native(has_kernel: bool, device: torch.device, dtype: torch.dtype, k: int, group_size: int, multiple: int) -> bool:
    """Whether a layer may run on a native matmul: the kernel built (``has_kernel``), CPU, bfloat16
    activations, groups a multiple of ``multiple`` dividing ``k``."""
    return has_kernel and device.type == "cpu" and dtype == torch.bfloat16 and not group_size % multiple and not k % group_size


def native_matmul(mod: nn.Module, x: Tensor, launch: Callable[[Tensor, Tensor], int]) -> Tensor:
    """``[M, mod.padded_out]`` from ``launch(x, y)``, the layer's native matmul call returning its
    status; ``x`` made unit-strided along its rows first."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    y = torch.empty(x.shape[0], mod.padded_out, dtype=x.dtype)
    status = launch(x, y)
    if status != 0:
        raise RuntimeError(f"native matmul failed ({status}) on x {tuple(x.shape)}, weight {mod}")
    return y


def native_project(
    kernels: Kernels, projection: abi.Projection, x: Tensor, x_stride: int, rows: int, k: int, y: Tensor | None, *,
    residual: Tensor | None = None, act: int = 0,
) -> int:  # fmt: skip
    """``projection_matmul_bf16``: ``x`` (``rows`` rows of ``k``, or with ``act=1`` of gate | up,
    ``2k``) times the native-layout weight ``projection`` of any kind, into ``y`` or added into
    the float32 ``residual``; returns the kernel's status."""
    return kernels.projection_matmul_bf16(
        abi.ProjectionMatmulArgs(
            p=ctypes.addressof(projection), x=x.data_ptr(), x_stride=x_stride, m=rows, k=k,
            y=None if y is None else y.data_ptr(), y_stride=0 if y is None else y.stride(0),
            residual=None if residual is None else residual.data_ptr(),
            residual_stride=0 if residual is None else residual.stride(0), act=act, num_threads=torch.get_num_threads(),
        )
    )  # fmt: skip

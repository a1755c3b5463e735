"""The GPU decode path's fused kernels (Triton), each beside the torch ops that define it.

A decode step of a small model on a GPU is launch-bound: SmolLM2-135M's weights are read in tens of
microseconds, while torch's ops spend ~450 launches on it (issue 18's profile). These kernels
fold each layer's elementwise work into four launches, and run the one weight format torch has no
CUDA kernel for:

- ``add_rms_norm``: ``residual += x`` then ``RMSNorm(residual) * w``, one row per program;
- ``rope_write_kv``: rotary on q and k, q into its buffer, k and v into the paged cache at their
  slots, one (token, head) per program;
- ``decode_attention``: one query token per sequence against its paged K/V, the query heads of a
  KV head together, the context split over ``splits`` programs (flash-decoding) and merged by a
  second small kernel when ``splits > 1``;
- ``silu_mul``: ``silu(gate) * up`` of the fused gate|up projection;
- ``int8_matmul``: ``x @ (q * s).T`` for per-channel int8 weights (the int4 policy's vocabulary
  head), read as int8 and accumulated in float32: torch has no CUDA kernel for this format, and
  without one the head was dequantised to float32 in 8192-row chunks on every step;
- ``int4_matmul``: groupwise int4 ``x @ ((q - 8) * scale + zero).T`` from our own packing
  (``reference.pack_int4``), the alternative to torch's int4 kernel (``_weight_int4pack_mm``) that
  ``GpuCausalLM(int4_kernel="triton")`` runs, so that a device run can choose between them by
  measurement (``taxiway bench gpu --int4-kernels``).

``GpuKernels(use_triton=False)`` runs the torch definitions (``reference``, any device): what the
Triton kernels are tested against (tests/backends/engine/cuda/), and the path where Triton is
missing. Triton is the GPU image's, not a dependency of the product: the CPU path never imports
this module; the test extra installs it so that CI runs these kernels in Triton's interpreter and
compiles them for sm_90 (tests/backends/engine/cuda/).
"""

from __future__ import annotations

import torch
from torch import Tensor

from backends.engine.cuda.reference import (
    INT4_TILE_K,
    add_rms_norm_ref,
    decode_attention_ref,
    int4_matmul_ref,
    int8_matmul_ref,
    rope_write_kv_ref,
    silu_mul_ref,
)

try:  # present wherever a CUDA build of torch is installed
    from backends.engine.cuda import triton_kernels as tk
except ImportError:  # pragma: no cover - installs without Triton
    tk = None

HAVE_TRITON = tk is not None

#: Tokens of context one attention program reads per iteration.
ATTENTION_TILE = 32
#: Programs the attention grid aims for (two per multiprocessor of an H100/H200): the context is
#: split until ``sequences * kv_heads * splits`` reaches it, so one sequence still fills the GPU.
ATTENTION_PROGRAMS = 264
MAX_SPLITS = 16


def attention_splits(num_seqs: int, num_kv_heads: int) -> int:
    """Programs per (sequence, KV head) for a decode batch of ``num_seqs``."""
    return max(1, min(MAX_SPLITS, -(-ATTENTION_PROGRAMS // (num_seqs * num_kv_heads))))


def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _matmul_launch(x: Tensor, n: int, out_dtype: torch.dtype) -> tuple[Tensor, tuple[int, int], dict[str, object]]:
    """The output ``[M, n]``, grid and tile parameters of a weight matmul kernel over ``x [M, K]``:
    64-column tiles, 16 to 64 rows (``tl.dot``'s smallest tile is 16), TF32 products (exact for
    bfloat16 and float16 activations; IEEE for float32 ones)."""
    m = x.shape[0]
    block_m, block_n = min(64, max(16, _pow2(m))), 64
    y = torch.empty(m, n, dtype=out_dtype, device=x.device)
    tiles = dict(BLOCK_M=block_m, BLOCK_N=block_n, PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
                 num_warps=4)  # fmt: skip
    return y, (-(-n // block_n), -(-m // block_m)), tiles



class GpuKernels:
    """The fused operations, by Triton (``use_triton``) or by their torch definitions.

    All take and return tensors on one device; nothing here synchronizes with the host, so every
    call can be captured in a CUDA graph (``graphs.DecodeGraphs``)."""

    def __init__(self, use_triton: bool) -> None:
        if use_triton and not HAVE_TRITON:
            raise RuntimeError("Triton is not installed")
        self.use_triton = use_triton

    def add_rms_norm(
        self, x: Tensor | None, residual: Tensor, weight: Tensor, eps: float, out_dtype: torch.dtype
    ) -> Tensor:
        """``residual += x`` (float32, in place; ``x`` None: no add), then its RMS norm times
        ``weight`` in ``out_dtype``."""
        if not self.use_triton:
            return add_rms_norm_ref(x, residual, weight, eps, out_dtype)
        rows, dim = residual.shape
        out = torch.empty(rows, dim, dtype=out_dtype, device=residual.device)
        xs = x if x is not None else residual
        tk.add_rms_norm_kernel[(rows,)](
            xs, xs.stride(0), residual, residual.stride(0), weight, out, out.stride(0), dim, eps,
            HAS_X=x is not None, BLOCK=_pow2(dim), num_warps=4,
        )  # fmt: skip
        return out

    def rope_write_kv(
        self, qkv: Tensor, positions: Tensor, cos_sin: Tensor, k_cache: Tensor, v_cache: Tensor, slots: Tensor,
        num_heads: int, num_kv_heads: int, k_out: Tensor | None = None,
    ) -> Tensor:  # fmt: skip
        """Rotary on the q and k heads of ``qkv`` ``[T, (H + 2 KV) * D]`` (``cos_sin``: float32
        ``[positions, D]``, cos then sin of each frequency); k and v written into the caches at
        ``slots``, rotated k also into ``k_out`` ``[T, KV, D]`` when given; returns q ``[T, H, D]``."""
        if not self.use_triton:
            return rope_write_kv_ref(qkv, positions, cos_sin, k_cache, v_cache, slots, num_heads, num_kv_heads, k_out)
        tokens = qkv.shape[0]
        head_dim = k_cache.shape[-1]
        q = torch.empty(tokens, num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
        tk.rope_write_kv_kernel[(tokens, num_heads + 2 * num_kv_heads)](
            qkv, qkv.stride(0), positions, cos_sin, q, k_cache, v_cache, slots, k_out if k_out is not None else q,
            NUM_HEADS=num_heads, NUM_KV=num_kv_heads, HEAD_DIM=head_dim, HALF=head_dim // 2,
            BLOCK_HALF=_pow2(head_dim // 2),
            HAS_K_OUT=k_out is not None, num_warps=1,
        )  # fmt: skip
        return q

    def decode_attention(
        self, q: Tensor, k_cache: Tensor, v_cache: Tensor, tables: Tensor, seq_lens: Tensor, scale: float,
        splits: int | None = None,
    ) -> Tensor:  # fmt: skip
        """``[S, H * D]``: query ``q[s]`` ``[H, D]`` against the first ``seq_lens[s]`` keys of its
        blocks ``tables[s]`` (any integer dtype; entries past the context are not read)."""
        if not self.use_triton:
            return decode_attention_ref(q, k_cache, v_cache, tables, seq_lens, scale)
        num_seqs, num_heads, head_dim = q.shape
        _, block_size, num_kv, _ = k_cache.shape
        splits = _pow2(splits or attention_splits(num_seqs, num_kv))
        group = num_heads // num_kv
        block_d = _pow2(head_dim)
        out = torch.empty(num_seqs, num_heads * head_dim, dtype=q.dtype, device=q.device)
        part_ml = part_acc = out
        if splits > 1:
            part_ml = torch.empty(num_seqs * num_heads * splits * 2, dtype=torch.float32, device=q.device)
            part_acc = torch.empty(num_seqs * num_heads * splits * block_d, dtype=torch.float32, device=q.device)
        tk.decode_attention_kernel[(num_seqs, num_kv, splits)](
            q, k_cache, v_cache, tables, tables.stride(0), seq_lens, scale, part_ml, part_acc, out,
            NUM_HEADS=num_heads, NUM_KV=num_kv, GROUP=group, GROUP_PAD=max(2, _pow2(group)), HEAD_DIM=head_dim,
            BLOCK_D=block_d, BLOCK_SIZE=block_size, TILE=ATTENTION_TILE, SPLITS=splits, num_warps=4,
        )  # fmt: skip
        if splits > 1:
            tk.merge_splits_kernel[(num_seqs, num_heads)](
                part_ml, part_acc, out, NUM_HEADS=num_heads, HEAD_DIM=head_dim, BLOCK_D=block_d, SPLITS=splits,
                num_warps=1,
            )  # fmt: skip
        return out

    def silu_mul(self, gate_up: Tensor) -> Tensor:
        """``silu(gate) * up`` of ``gate_up`` ``[T, 2 I]``."""
        if not self.use_triton:
            return silu_mul_ref(gate_up)
        tokens, width = gate_up.shape
        inter = width // 2
        out = torch.empty(tokens, inter, dtype=gate_up.dtype, device=gate_up.device)
        block = 1024
        tk.silu_mul_kernel[(tokens, -(-inter // block))](
            gate_up, gate_up.stride(0), out, out.stride(0), inter, BLOCK=block, num_warps=4
        )  # fmt: skip
        return out

    def int4_matmul(self, x: Tensor, packed: Tensor, sz: Tensor, group_size: int, out_dtype: torch.dtype) -> Tensor:
        """``x [M, K] @ W.T`` for ``W`` ``[N, K]`` packed by ``pack_int4`` with (scale, zero)
        ``sz [G, N, 2]``; weights dequantised in float32, TF32 products (IEEE for float32 ``x``)."""
        if not self.use_triton:
            return int4_matmul_ref(x, packed, sz, group_size, out_dtype)
        y, grid, tiles = _matmul_launch(x, packed.shape[0], out_dtype)
        tk.int4_matmul_kernel[grid](
            x, x.stride(0), packed, sz, y, y.stride(0), *y.shape, x.shape[1], group_size, TILE_K=INT4_TILE_K, **tiles
        )  # fmt: skip
        return y

    def int8_matmul(self, x: Tensor, q: Tensor, scales: Tensor, out_dtype: torch.dtype) -> Tensor:
        """``x [M, K] @ (q * scales[:, None]).T`` in ``out_dtype``: ``q`` int8 ``[N, K]``, one
        scale per output row; exact products, accumulated in float32."""
        if not self.use_triton:
            return int8_matmul_ref(x, q, scales, out_dtype)
        y, grid, tiles = _matmul_launch(x, q.shape[0], out_dtype)
        tk.int8_matmul_kernel[grid](
            x, x.stride(0), q, scales, y, y.stride(0), *y.shape, x.shape[1], BLOCK_K=64, **tiles
        )  # fmt: skip
        return y

"""A decoder layer as seven native calls: the bfloat16 CPU fast path of ``model.DecoderLayer``.

At one token a layer's torch ops each cost 3-7 us of dispatch, more than their work: SmolLM2's
30 layers ran ~25 small ops each (norms, rotary, cache writes, residual adds, SiLU) for ~4 ms a
step beside ~6 ms of matmuls. Here a layer is

    rms_norm -> qkv (int4, + bias) -> rotary + cache write -> attention
      -> o_proj (int4, added into the residual) -> rms_norm
      -> gate_up (int4) -> down (int4 of silu(gate) * up, added into the residual)

with the kernels of ``kernels/`` (``int4_matmul.c``, ``fused_ops.c``, ``decode_attention.c``),
each rounding where the torch path rounds, so the two agree to float32 rounding (tested). A step
with prefills runs their attention through torch's SDPA as before (``paged_attention`` with the
cache already written).

``FusedLayer.build(layer)`` returns ``None`` unless every piece applies: the native kernels are
built with the int4 fast path, activations are bfloat16 on CPU, and the four projections are
native-layout ``Int4Linear`` (the residual ones unpadded). Otherwise the layer runs torch's ops.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from backends.engine import ckernels
from backends.engine.attention import AttentionPlan, paged_attention
from backends.engine.quant import Int4Linear

if TYPE_CHECKING:
    from backends.engine.model import DecoderLayer

#: Fused layers on (where they apply). Tests turn it off to compare with the torch path.
ENABLED = True


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class FusedLayer:
    """The native forward of one ``DecoderLayer``; holds no tensors of its own."""

    def __init__(self, layer: DecoderLayer, kernels: ckernels.Kernels) -> None:
        self.layer = layer
        self.k = kernels
        attn = layer.self_attn
        self.num_heads, self.num_kv_heads, self.head_dim = attn.num_heads, attn.num_kv_heads, attn.head_dim
        self.hidden = layer.attn_norm.dim

    @classmethod
    def build(cls, layer: DecoderLayer) -> FusedLayer | None:
        if not ENABLED or layer.attn_norm.out_dtype != torch.bfloat16:
            return None
        kernels = ckernels.load()
        if kernels is None or not kernels.has_int4_matmul:
            return None
        attn, mlp = layer.self_attn, layer.mlp
        projections = [attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj]
        if not all(isinstance(p, Int4Linear) and p.layout == "native" for p in projections):
            return None
        if any(p.padded_out != p.out_features for p in (attn.o_proj, mlp.down_proj)):
            return None
        if attn.head_dim % 2 or attn.head_dim > 512:
            return None
        return cls(layer, kernels)

    def _matmul(self, mod: Int4Linear, x: Tensor, x_stride: int, rows: int, out: Tensor | None, residual: Tensor | None, act: int, threads: int) -> None:
        status = self.k.int4_matmul_bf16(
            x.data_ptr(), x_stride, rows, mod.weight.data_ptr(), mod.scales_and_zeros.data_ptr(),
            mod.padded_out, mod.in_features, mod.group_size,
            _ptr(out), 0 if out is None else out.stride(0), threads,
            _ptr(mod.bias), _ptr(residual), 0 if residual is None else residual.stride(0), act,
        )  # fmt: skip
        if status != 0:
            raise RuntimeError(f"native int4 matmul failed ({status}) on {rows} rows, weight {mod}")

    def _norm(self, norm: torch.nn.Module, h: Tensor, threads: int) -> Tensor:
        rows = h.shape[0]
        out = torch.empty(rows, self.hidden, dtype=torch.bfloat16)
        self.k.rms_norm_bf16(h.data_ptr(), h.stride(0), rows, self.hidden, norm.weight2.data_ptr(), norm.eps, out.data_ptr(), self.hidden, threads)
        return out

    def __call__(self, h: Tensor, cos: Tensor, sin: Tensor, plan: AttentionPlan, k_cache: Tensor, v_cache: Tensor) -> Tensor:
        """``h``: the float32 residual stream ``[T, hidden]`` (contiguous), updated in place."""
        layer = self.layer
        attn, mlp = layer.self_attn, layer.mlp
        rows = h.shape[0]
        threads = torch.get_num_threads()
        heads, kv_heads, head_dim = self.num_heads, self.num_kv_heads, self.head_dim

        # attention: norm, qkv, rotary + cache write, attend, o_proj into the residual
        x = self._norm(layer.attn_norm, h, threads)
        qkv = torch.empty(rows, attn.qkv_proj.padded_out, dtype=torch.bfloat16)
        self._matmul(attn.qkv_proj, x, self.hidden, rows, qkv, None, 0, threads)
        slots = plan.slot_mapping
        status = self.k.rope_kv_bf16(
            qkv.data_ptr(), qkv.stride(0), rows, heads, kv_heads, head_dim, cos.data_ptr(), sin.data_ptr(), head_dim,
            slots.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), k_cache.shape[0] * k_cache.shape[1], threads,
        )  # fmt: skip
        if status != 0:
            raise RuntimeError(f"rotary / cache write refused: {rows} rows, slots {slots.tolist()[:8]}...")
        o = self._attend(qkv, plan, k_cache, v_cache, attn.scale, threads)
        self._matmul(attn.o_proj, o, o.stride(0), rows, None, h, 0, threads)

        # MLP: norm, gate_up, down of silu(gate) * up into the residual
        x = self._norm(layer.ffn_norm, h, threads)
        gate_up = torch.empty(rows, mlp.gate_up_proj.padded_out, dtype=torch.bfloat16)
        self._matmul(mlp.gate_up_proj, x, self.hidden, rows, gate_up, None, 0, threads)
        self._matmul(mlp.down_proj, gate_up, gate_up.stride(0), rows, None, h, 1, threads)
        return h

    def _attend(self, qkv: Tensor, plan: AttentionPlan, k_cache: Tensor, v_cache: Tensor, scale: float, threads: int) -> Tensor:
        heads, kv_heads, head_dim = self.num_heads, self.num_kv_heads, self.head_dim
        rows = qkv.shape[0]
        if not plan.prefills and plan.decode_rows is None and plan.decode_tables is not None and plan.decode_seq_lens is not None:
            out = torch.empty(rows, heads * head_dim, dtype=torch.bfloat16)
            status = self.k.decode_attention_bf16(
                qkv.data_ptr(), qkv.stride(0), k_cache.data_ptr(), v_cache.data_ptr(),
                plan.decode_tables.data_ptr(), plan.decode_tables.stride(0), plan.decode_seq_lens.data_ptr(),
                k_cache.shape[0], rows, heads, kv_heads, head_dim, k_cache.shape[1], scale, out.data_ptr(), out.stride(0), threads,
            )  # fmt: skip
            if status == 0:
                return out
        q_size, kv_size = heads * head_dim, kv_heads * head_dim
        q = qkv[:, :q_size].view(rows, heads, head_dim)
        k = qkv[:, q_size : q_size + kv_size].view(rows, kv_heads, head_dim)
        v = qkv[:, q_size + kv_size : q_size + 2 * kv_size].view(rows, kv_heads, head_dim)
        return paged_attention(q, k, v, k_cache, v_cache, plan, scale, write_kv=False)

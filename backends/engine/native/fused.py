"""A decoder layer as seven native calls: the bfloat16 CPU fast path of ``model.DecoderLayer``.

At one token a layer's torch ops each cost 3-7 us of dispatch, more than their work: SmolLM2's
30 layers ran ~25 small ops each (norms, rotary, cache writes, residual adds, SiLU) for ~4 ms a
step beside ~6 ms of matmuls. Here a layer is

    rms_norm -> qkv (int4, + bias) -> rotary + cache write -> attention
      -> o_proj (int4, added into the residual) -> rms_norm
      -> gate_up (int4) -> down (int4 of silu(gate) * up, added into the residual)

with the kernels of ``kernels/`` (``int4_matmul.c``, ``fused_ops.c``, ``decode_attention.c``),
each rounding where the torch path rounds, so the two agree to float32 rounding (tested; identical
on the test models). A step with prefills runs their attention through ``paged_attention``
with the cache already written (the native prefill kernel). A step of decodes alone goes further:
``FusedStack`` runs every layer in one native call (``decode_layers_bf16``), the same kernels in
the same order, without the Python between them (~2 ms a step on SmolLM2).

``FusedLayer.build(layer)`` returns ``None`` unless every piece applies: the native kernels are
built with the int4 fast path, activations are bfloat16 on CPU, and the four projections are
native-layout ``Int4Linear`` (the residual ones unpadded). Otherwise the layer runs torch's ops.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from backends.engine.native import ckernels
from backends.engine.model.attention import AttentionPlan, paged_attention
from backends.engine.model.quant import Int4Linear

if TYPE_CHECKING:
    from backends.engine.model.attention import KVCache
    from backends.engine.model.llama import DecoderLayer

#: Fused layers on (where they apply). Tests turn it off to compare with the torch path.
ENABLED = True


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _padded_bias(mod: Int4Linear) -> Tensor | None:
    """The bias at the kernel's padded width (the epilogue reads ``padded_out`` values)."""
    if mod.bias is None:
        return None
    out = torch.zeros(mod.padded_out, dtype=mod.bias.dtype)
    out[: mod.out_features] = mod.bias
    return out


def _cache_ok(k_cache: Tensor, v_cache: Tensor) -> bool:
    return (
        k_cache.dtype == v_cache.dtype == torch.bfloat16 and k_cache.device.type == "cpu"
        and k_cache.is_contiguous() and v_cache.is_contiguous()
    )  # fmt: skip


class FusedLayer:
    """The native forward of one ``DecoderLayer``. Weights must stay in place once built (the
    loader installs them all before the first forward); the tensors read are held here."""

    def __init__(self, layer: DecoderLayer, kernels: ckernels.Kernels) -> None:
        self.layer = layer
        self.k = kernels
        attn, mlp = layer.self_attn, layer.mlp
        self.num_heads, self.num_kv_heads, self.head_dim = attn.num_heads, attn.num_kv_heads, attn.head_dim
        self.hidden = layer.attn_norm.dim
        self.qkv_bias, self.gate_up_bias = _padded_bias(attn.qkv_proj), _padded_bias(mlp.gate_up_proj)
        self.o_bias, self.down_bias = attn.o_proj.bias, mlp.down_proj.bias  # unpadded (checked in build)
        self.pinned = [
            layer.attn_norm.weight2, layer.ffn_norm.weight2,
            *(t for p in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj) for t in (p.weight, p.scales_and_zeros)),
        ]  # fmt: skip

    @classmethod
    def build(cls, layer: DecoderLayer) -> FusedLayer | None:
        if not ENABLED or layer.attn_norm.out_dtype != torch.bfloat16 or layer.attn_norm.weight2.device.type != "cpu":
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

    def accepts(self, h: Tensor, k_cache: Tensor, v_cache: Tensor) -> bool:
        return h.is_contiguous() and _cache_ok(k_cache, v_cache)

    def _matmul(
        self, mod: Int4Linear, bias: Tensor | None, x: Tensor, x_stride: int, rows: int,
        out: Tensor | None, residual: Tensor | None, act: int,
    ) -> None:  # fmt: skip
        status = mod.native_matmul(self.k, x, x_stride, rows, out, bias=bias, residual=residual, act=act)
        if status != 0:
            raise RuntimeError(f"native int4 matmul failed ({status}) on {rows} rows, weight {mod}")

    def _norm(self, norm: torch.nn.Module, h: Tensor, threads: int) -> Tensor:
        rows = h.shape[0]
        out = torch.empty(rows, self.hidden, dtype=torch.bfloat16)
        status = self.k.rms_norm_bf16(
            h.data_ptr(), h.stride(0), rows, self.hidden, norm.weight2.data_ptr(), norm.eps, out.data_ptr(), self.hidden, threads
        )
        if status != 0:
            raise RuntimeError(f"native RMSNorm refused {rows} rows of {self.hidden}")
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
        self._matmul(attn.qkv_proj, self.qkv_bias, x, self.hidden, rows, qkv, None, 0)
        slots = plan.slot_mapping
        status = self.k.rope_kv_bf16(
            qkv.data_ptr(), qkv.stride(0), rows, heads, kv_heads, head_dim, cos.data_ptr(), sin.data_ptr(), head_dim,
            slots.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), k_cache.shape[0] * k_cache.shape[1], threads,
        )  # fmt: skip
        if status != 0:
            raise RuntimeError(f"rotary / cache write refused: {rows} rows, slots {slots.tolist()[:8]}...")
        o = self._attend(qkv, plan, k_cache, v_cache, attn.scale)
        self._matmul(attn.o_proj, self.o_bias, o, o.stride(0), rows, None, h, 0)

        # MLP: norm, gate_up, down of silu(gate) * up into the residual
        x = self._norm(layer.ffn_norm, h, threads)
        gate_up = torch.empty(rows, mlp.gate_up_proj.padded_out, dtype=torch.bfloat16)
        self._matmul(mlp.gate_up_proj, self.gate_up_bias, x, self.hidden, rows, gate_up, None, 0)
        self._matmul(mlp.down_proj, self.down_bias, gate_up, gate_up.stride(0), rows, None, h, 1)
        return h

    def _attend(self, qkv: Tensor, plan: AttentionPlan, k_cache: Tensor, v_cache: Tensor, scale: float) -> Tensor:
        """``paged_attention`` on views of the rotated qkv rows (decode rows reach the native
        kernel in place: the views have unit head stride), the cache already written."""
        heads, kv_heads, head_dim = self.num_heads, self.num_kv_heads, self.head_dim
        rows = qkv.shape[0]
        q_size, kv_size = heads * head_dim, kv_heads * head_dim
        q = qkv[:, :q_size].view(rows, heads, head_dim)
        k = qkv[:, q_size : q_size + kv_size].view(rows, kv_heads, head_dim)
        v = qkv[:, q_size + kv_size : q_size + 2 * kv_size].view(rows, kv_heads, head_dim)
        return paged_attention(q, k, v, k_cache, v_cache, plan, scale, write_kv=False)


_p = ctypes.c_void_p


class Projection(ctypes.Structure):
    """Mirror of ``Projection`` in ``kernels/fused_ops.c``."""

    _fields_ = [("w", _p), ("sz", _p), ("bias", _p), ("n", ctypes.c_int64), ("gs", ctypes.c_int64)]

    @classmethod
    def of(cls, mod: Int4Linear, bias: Tensor | None) -> Projection:
        return cls(mod.weight.data_ptr(), mod.scales_and_zeros.data_ptr(), _ptr(bias), mod.padded_out, mod.group_size)


class LayerWeights(ctypes.Structure):
    """Mirror of ``LayerWeights`` in ``kernels/fused_ops.c``."""

    _fields_ = [
        ("attn_norm", _p), ("ffn_norm", _p),
        ("qkv", Projection), ("o", Projection), ("gate_up", Projection), ("down", Projection),
        ("k_cache", _p), ("v_cache", _p),
    ]  # fmt: skip


class FusedStack:
    """Every layer of a decode-only step in one native call (``decode_layers_bf16``): the same
    kernels as ``FusedLayer`` in the same order, without ~7 Python-side calls per layer (~2 ms a
    step on SmolLM2's 30 layers). Built when every layer has a ``FusedLayer``."""

    def __init__(self, layers: Sequence[FusedLayer]) -> None:
        self.layers = list(layers)
        first = self.layers[0]
        self.k = first.k
        self.num_heads, self.num_kv_heads, self.head_dim = first.num_heads, first.num_kv_heads, first.head_dim
        self.hidden = first.hidden
        self.intermediate = first.layer.mlp.intermediate_size
        self.eps = first.layer.attn_norm.eps
        self.scale = first.layer.self_attn.scale
        self.qkv_n = first.layer.self_attn.qkv_proj.padded_out
        self.gu_n = first.layer.mlp.gate_up_proj.padded_out
        self._table = (LayerWeights * len(self.layers))()
        self._caches: KVCache | None = None  # the caches the table points into (held)
        self._cache_ok = False
        group = self.num_heads // self.num_kv_heads
        # decode_attention_bf16's limits: beyond them the per-layer path falls back to torch
        self.attention_ok = self.num_heads % self.num_kv_heads == 0 and group <= 16 and self.head_dim <= 256
        for entry, fused_layer in zip(self._table, self.layers, strict=True):
            layer = fused_layer.layer
            attn, mlp = layer.self_attn, layer.mlp
            if attn.qkv_proj.padded_out != self.qkv_n or mlp.gate_up_proj.padded_out != self.gu_n:
                raise ValueError("layers differ in shape")
            # the tensors stay alive in fused_layer.pinned and its biases
            entry.attn_norm, entry.ffn_norm = layer.attn_norm.weight2.data_ptr(), layer.ffn_norm.weight2.data_ptr()
            entry.qkv = Projection.of(attn.qkv_proj, fused_layer.qkv_bias)
            entry.o = Projection.of(attn.o_proj, fused_layer.o_bias)
            entry.gate_up = Projection.of(mlp.gate_up_proj, fused_layer.gate_up_bias)
            entry.down = Projection.of(mlp.down_proj, fused_layer.down_bias)

    @classmethod
    def build(cls, layers: Sequence[object]) -> FusedStack | None:
        fused_layers = [getattr(layer, "_fused", None) for layer in layers]
        if not fused_layers or not all(isinstance(f, FusedLayer) for f in fused_layers):
            return None
        try:
            return cls(fused_layers)  # type: ignore[arg-type]
        except ValueError:
            return None

    def applies(self, h: Tensor, plan: AttentionPlan, kv_caches: KVCache) -> bool:
        if not (
            self.attention_ok and not plan.prefills and plan.decode_rows is None and plan.decode_tables is not None
            and plan.decode_seq_lens is not None and h.is_contiguous()
        ):  # fmt: skip
            return False
        if kv_caches is not self._caches:  # one list per engine, allocated once; not known at build
            self._cache_ok = all(_cache_ok(k, v) for k, v in kv_caches)
            for entry, (k_cache, v_cache) in zip(self._table, kv_caches, strict=True):
                entry.k_cache, entry.v_cache = k_cache.data_ptr(), v_cache.data_ptr()
            self._caches = kv_caches
        return self._cache_ok

    def __call__(self, h: Tensor, cos: Tensor, sin: Tensor, plan: AttentionPlan, kv_caches: KVCache) -> Tensor:
        """Call only after ``applies`` returned True for these ``kv_caches``."""
        rows = h.shape[0]
        bf16 = torch.bfloat16
        x = torch.empty(rows, self.hidden, dtype=bf16)
        qkv = torch.empty(rows, self.qkv_n, dtype=bf16)
        attn = torch.empty(rows, self.num_heads * self.head_dim, dtype=bf16)
        gate_up = torch.empty(rows, self.gu_n, dtype=bf16)
        k_cache = kv_caches[0][0]
        tables, lens = plan.decode_tables, plan.decode_seq_lens
        assert tables is not None and lens is not None
        status = self.k.decode_layers_bf16(
            self._table, len(self.layers), h.data_ptr(), rows, self.hidden,
            self.num_heads, self.num_kv_heads, self.head_dim, self.intermediate, self.eps, self.scale,
            cos.data_ptr(), sin.data_ptr(), plan.slot_mapping.data_ptr(), k_cache.shape[0] * k_cache.shape[1],
            tables.data_ptr(), tables.stride(0), lens.data_ptr(), k_cache.shape[0], k_cache.shape[1],
            x.data_ptr(), qkv.data_ptr(), attn.data_ptr(), gate_up.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
        if status != 0:
            raise RuntimeError(f"native decode step refused at layer {status - 1} ({rows} rows)")
        return h

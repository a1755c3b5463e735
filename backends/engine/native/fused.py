"""A decoder layer as seven native calls: the bfloat16 CPU fast path of ``llama.DecoderLayer``.

At one token a layer's torch ops each cost 3-7 us of dispatch, more than their work: SmolLM2's
30 layers ran ~25 small ops each (norms, rotary, cache writes, residual adds, SiLU) for ~4 ms a
step beside ~6 ms of matmuls. Here a layer is

    rms_norm -> qkv (+ bias) -> rotary + cache write -> attention
      -> o_proj (added into the residual) -> rms_norm
      -> gate_up -> down (of silu(gate) * up, added into the residual)

with the kernels of ``csrc/`` (``projection_matmul.c`` for the projections, int4, int5 or
per-group int8 each, ``fused_ops.c``, ``decode_attention.c``),
each rounding where the torch path rounds, so the two agree to float32 rounding (tested; identical
on the test models). A step with prefills runs their attention through ``paged_attention``
with the cache already written (the native prefill kernel). A step of decodes alone goes further:
``stack.DecodeStep`` runs every layer in one native call (``decode_layers_bf16``), the same kernels
in the same order, without the Python between them (~2 ms a step on SmolLM2).

``FusedLayer.applies(layer, kernels)`` says whether every piece applies: the native kernels are
built with the int4 fast path, activations are bfloat16 on CPU, and the four projections are
native-layout weights (``Int4Linear`` of the native layout, ``Int5Linear``, ``Int8NativeLinear``:
a GGUF ``Q4_K_M`` file mixes them in one layer; the residual ones unpadded), and the layer is llama's
own ``DecoderLayer`` (gemma's, ``model/gemma.py``, with its extra norms, GeGLU, soft-capping and
sliding windows, is declined: it runs on torch's path), and the MLP is a dense one (a mixture
of experts' layer keeps torch's ops, its experts' matmuls still the native kernels'). ``fuse.fuse`` swaps such layers in;
the others keep torch's ops. A fused layer whose input or cache does not suit the kernels (not
contiguous, not bfloat16) runs the plain layer's forward.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from backends.engine.model.attention import AttentionPlan, paged_attention
from backends.engine.model.llama import MLP, DecoderLayer
from backends.engine.model.quant import Int4Linear, Int5Linear, Int8NativeLinear, layouts
from backends.engine.native import abi
from backends.engine.native.ckernels import Kernels

#: the four projections of a layer, by the name of their ``Projection`` in ``abi.LayerWeights``
PROJECTIONS = ("qkv", "o", "gate_up", "down")


def native_projection(mod: nn.Module) -> bool:
    """Whether ``mod`` holds a weight ``projection_matmul_bf16`` multiplies."""
    return isinstance(mod, (Int5Linear, Int8NativeLinear)) or (isinstance(mod, Int4Linear) and mod.layout == "native")


def _padded_bias(mod: nn.Module) -> Tensor | None:
    """The bias at the kernel's padded width (the epilogue reads ``padded_out`` values)."""
    if mod.bias is None:
        return None
    out = torch.zeros(mod.padded_out, dtype=mod.bias.dtype)
    out[: mod.out_features] = mod.bias
    return out


def cache_ok(k_cache: Tensor, v_cache: Tensor) -> bool:
    return (
        k_cache.dtype == v_cache.dtype == torch.bfloat16 and k_cache.device.type == "cpu"
        and k_cache.is_contiguous() and v_cache.is_contiguous()
    )  # fmt: skip


class FusedLayer(DecoderLayer):
    """A ``DecoderLayer`` (the same submodules) whose forward runs the native kernels. Weights
    must stay in place once built (the model is loaded before ``fuse``); the tensors read are
    held here."""

    def __init__(self, layer: DecoderLayer, kernels: Kernels) -> None:
        nn.Module.__init__(self)
        self.attn_norm, self.self_attn, self.ffn_norm, self.mlp = layer.attn_norm, layer.self_attn, layer.ffn_norm, layer.mlp
        self.kernels = kernels
        self.lora = None  # lora.layers.LayerLoRA, set by lora.apply_lora: adapter terms after the matmuls
        attn, mlp = self.self_attn, self.mlp
        self.num_heads, self.num_kv_heads, self.head_dim = attn.num_heads, attn.num_kv_heads, attn.head_dim
        self.hidden = self.attn_norm.dim
        self.qkv_bias, self.gate_up_bias = _padded_bias(attn.qkv_proj), _padded_bias(mlp.gate_up_proj)
        self.o_bias, self.down_bias = attn.o_proj.bias, mlp.down_proj.bias  # unpadded (checked in applies)
        self.modules_by_name = {"qkv": attn.qkv_proj, "o": attn.o_proj, "gate_up": mlp.gate_up_proj, "down": mlp.down_proj}
        biases = {"qkv": self.qkv_bias, "o": self.o_bias, "gate_up": self.gate_up_bias, "down": self.down_bias}
        #: each projection as the kernels take it (the decode step copies them into its table)
        self.projections = {name: mod.projection(biases[name]) for name, mod in self.modules_by_name.items()}
        self.pinned = [
            self.attn_norm.weight2, self.ffn_norm.weight2, *(b for b in biases.values() if b is not None),
            *(t for mod in self.modules_by_name.values() for t in mod.buffers()),
        ]  # fmt: skip

    @staticmethod
    def applies(layer: nn.Module, kernels: Kernels) -> bool:
        """Whether ``layer`` (a plain ``DecoderLayer``) can run as a ``FusedLayer``."""
        # the llama layer itself: a subclass (gemma's, or a FusedLayer already) runs another forward
        if not kernels.has_int4_matmul or type(layer) is not DecoderLayer:
            return False
        if layer.attn_norm.out_dtype != torch.bfloat16 or layer.attn_norm.weight2.device.type != "cpu":
            return False
        attn, mlp = layer.self_attn, layer.mlp
        if attn.q_norm is not None:  # qwen3's per-head q/k norm: not in the native kernels yet
            return False
        if not isinstance(mlp, MLP):  # a mixture of experts (moe.py): torch's path
            return False
        projections = [attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj]
        if not all(native_projection(p) for p in projections):
            return False
        if any(p.padded_out != p.out_features for p in (attn.o_proj, mlp.down_proj)):
            return False
        return attn.head_dim % 2 == 0 and attn.head_dim <= 512

    def accepts(self, h: Tensor, k_cache: Tensor, v_cache: Tensor) -> bool:
        return h.is_contiguous() and cache_ok(k_cache, v_cache)

    def _matmul(
        self, name: str, x: Tensor, x_stride: int, rows: int, out: Tensor | None, residual: Tensor | None, act: int
    ) -> None:
        mod = self.modules_by_name[name]
        status = layouts.native_project(
            self.kernels, self.projections[name], x, x_stride, rows, mod.in_features, out, residual=residual, act=act
        )
        if status != 0:
            raise RuntimeError(f"native matmul failed ({status}) on {rows} rows, weight {mod}")

    def _norm(self, norm: torch.nn.Module, h: Tensor, threads: int) -> Tensor:
        rows = h.shape[0]
        out = torch.empty(rows, self.hidden, dtype=torch.bfloat16)
        status = self.kernels.rms_norm_bf16(
            abi.RmsNormArgs(
                x=h.data_ptr(), x_stride=h.stride(0), m=rows, d=self.hidden, w=norm.weight2.data_ptr(), eps=norm.eps,
                out=out.data_ptr(), out_stride=self.hidden, num_threads=threads,
            )
        )  # fmt: skip
        if status != 0:
            raise RuntimeError(f"native RMSNorm refused {rows} rows of {self.hidden}")
        return out

    def forward(self, h: Tensor, cos: Tensor, sin: Tensor, plan: AttentionPlan, k_cache: Tensor, v_cache: Tensor) -> Tensor:
        """``h``: the float32 residual stream ``[T, hidden]``, updated in place and returned."""
        if not self.accepts(h, k_cache, v_cache):
            if self.lora is not None and self.lora.active:  # the plain forward has no LoRA term
                raise RuntimeError("a step with LoRA rows reached a fused layer whose input the kernels refuse")
            return super().forward(h, cos, sin, plan, k_cache, v_cache)
        attn, mlp = self.self_attn, self.mlp
        lora = self.lora if self.lora is not None and self.lora.active else None
        rows = h.shape[0]
        threads = torch.get_num_threads()
        heads, kv_heads, head_dim = self.num_heads, self.num_kv_heads, self.head_dim

        # attention: norm, qkv, rotary + cache write, attend, o_proj into the residual
        x = self._norm(self.attn_norm, h, threads)
        qkv = torch.empty(rows, attn.qkv_proj.padded_out, dtype=torch.bfloat16)
        self._matmul("qkv", x, self.hidden, rows, qkv, None, 0)
        if lora is not None:
            lora.qkv.add_native(self.kernels, x, self.hidden, qkv, attn.qkv_proj.out_features)
        slots = plan.slot_mapping
        status = self.kernels.rope_kv_bf16(
            abi.RopeKvArgs(
                qkv=qkv.data_ptr(), qkv_stride=qkv.stride(0), t=rows, num_heads=heads, num_kv_heads=kv_heads,
                head_dim=head_dim, cos=cos.data_ptr(), sin=sin.data_ptr(), cs_stride=head_dim, slots=slots.data_ptr(),
                k_cache=k_cache.data_ptr(), v_cache=v_cache.data_ptr(), num_slots=k_cache.shape[0] * k_cache.shape[1],
                num_threads=threads,
            )
        )  # fmt: skip
        if status != 0:
            raise RuntimeError(f"rotary / cache write refused: {rows} rows, slots {slots.tolist()[:8]}...")
        o = self._attend(qkv, plan, k_cache, v_cache, attn.scale)
        self._matmul("o", o, o.stride(0), rows, None, h, 0)
        if lora is not None:
            lora.o.add_native(self.kernels, o, o.shape[1], h, self.hidden, residual=True)

        # MLP: norm, gate_up, down of silu(gate) * up into the residual
        x = self._norm(self.ffn_norm, h, threads)
        gate_up = torch.empty(rows, mlp.gate_up_proj.padded_out, dtype=torch.bfloat16)
        self._matmul("gate_up", x, self.hidden, rows, gate_up, None, 0)
        if lora is not None:
            lora.gate_up.add_native(self.kernels, x, self.hidden, gate_up, mlp.gate_up_proj.out_features)
        self._matmul("down", gate_up, gate_up.stride(0), rows, None, h, 1)
        if lora is not None:
            lora.add_down(self.kernels, gate_up, h)
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
        return paged_attention(q, k, v, k_cache, v_cache, plan, scale, write_kv=False, kernels=self.kernels)



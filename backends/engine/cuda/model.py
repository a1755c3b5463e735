"""``GpuCausalLM``: the Llama forward on a GPU, over the weights of a built ``CausalLM``.

Same contract as ``model.llama.CausalLM`` (``model(ids, positions, attn, kv) -> float32 hidden``,
``compute_logits``), plus ``decode``: a decode step that takes its metadata as device tensors and
never synchronizes with the host, so that ``graphs.DecodeGraphs`` can capture it. Per layer it
runs nine launches: add+norm, qkv, rotary+cache write, attention, o, add+norm, gate|up,
silu*up, down (``kernels.GpuKernels``); the linear layers are the model's own (torch's int4
kernel, cuBLAS for bfloat16), except per-channel int8 ones (the int4 policy's vocabulary head,
every layer under the int8 policy), which torch can only dequantise per call: those run
``GpuKernels.int8_matmul``. ``int4_kernel="triton"`` runs int4 weights through
``GpuKernels.int4_matmul`` instead of torch's kernel (a copy of each packed for it at start):
the alternative a device run measures. The residual stream stays float32, as on the CPU path.

Steps with prompt tokens (``forward``) run eagerly: the same fused norm, rotary and cache write,
with ``attention.paged_attention`` (torch's SDPA) for the attention itself.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from backends.engine.cuda.kernels import GpuKernels, attention_splits
from backends.engine.cuda.reference import INT4_TILE_K, pack_int4
from backends.engine.model.attention import AttentionMetadata, AttentionPlan, KVCache, paged_attention
from backends.engine.model.llama import CausalLM
from backends.engine.model.quant import Int4Linear, Int8Linear

#: which kernel runs int4 weights: torch's (``_weight_int4pack_mm``) or ours (``int4_matmul``)
INT4_KERNELS = ("torch", "triton")


def _is_int8_per_channel(module: nn.Module) -> bool:
    return type(module) is Int8Linear and module.per_channel


class GpuCausalLM(nn.Module):
    def __init__(
        self, model: CausalLM, kernels: GpuKernels, max_positions: int | None = None, int4_kernel: str = "torch"
    ) -> None:
        super().__init__()
        if int4_kernel not in INT4_KERNELS:
            raise ValueError(f"int4_kernel must be one of {INT4_KERNELS}, not {int4_kernel!r}")
        self.model = model
        self.config = model.config
        self.dtype = model.dtype
        self.kernels = kernels
        config = model.config
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.scale = config.head_dim**-0.5
        self.eps = config.rms_norm_eps
        positions = torch.arange(max_positions or config.max_position_embeddings, device=model.device).float()
        freqs = positions.unsqueeze(1) * model.inv_freq.float()  # [P, D/2]
        self.register_buffer("cos_sin", torch.cat([freqs.cos(), freqs.sin()], dim=-1).contiguous(), persistent=False)
        #: ``id(module)`` -> (packed codes, (scale, zero) pairs, group size) of the int4 weights ours runs
        self._int4: dict[int, tuple[Tensor, Tensor, int]] = {}
        if int4_kernel == "triton":
            for module in model.modules():
                if type(module) is Int4Linear and module.in_features % INT4_TILE_K == 0:
                    n = module.out_features
                    q = module.unpacked_q(keep=False)[:n]
                    sz = module.scale_pairs(dtype=model.dtype)[:, :n].contiguous()
                    self._int4[id(module)] = (pack_int4(q), sz, module.group_size)

    @property
    def device(self) -> torch.device:
        return self.model.device

    def compute_logits(self, hidden: Tensor) -> Tensor:
        """Float32 logits, refined as ``CausalLM.compute_logits`` refines bfloat16 ones."""
        head = self.model.lm_head
        if id(head) not in self._int4 and not _is_int8_per_channel(head):
            return self.model.compute_logits(hidden)
        logits = self._project(head, hidden.to(self.dtype), torch.float32)
        return logits if self.dtype == torch.float32 else self.model.refine_logits(logits, hidden)

    def _project(self, module: nn.Module, x: Tensor, out_dtype: torch.dtype | None = None) -> Tensor:
        """``module(x)``, through our kernels where they run the module's weights."""
        int4 = self._int4.get(id(module))
        if int4 is not None:
            y = self.kernels.int4_matmul(x, *int4, out_dtype or x.dtype)
        elif _is_int8_per_channel(module):
            y = self.kernels.int8_matmul(x, module.weight, module.scales, out_dtype or x.dtype)
        else:
            return module(x)
        return y if module.bias is None else y + module.bias

    def _layers(self, h: Tensor, attend, positions: Tensor, slots: Tensor, kv_caches: KVCache,
                k_out: Tensor | None = None) -> Tensor:  # type: ignore[no-untyped-def]  # fmt: skip
        """The decoder layers over the float32 residual ``h`` (updated in place); ``attend(layer, q,
        k_cache, v_cache) -> [T, H * D]``. Returns the final norm's float32 output."""
        k = self.kernels
        x = None
        for layer, (k_cache, v_cache) in zip(self.model.layers, kv_caches, strict=True):
            attn, mlp = layer.self_attn, layer.mlp
            normed = k.add_rms_norm(x, h, layer.attn_norm.weight, self.eps, self.dtype)
            qkv = self._project(attn.qkv_proj, normed)
            q = k.rope_write_kv(qkv, positions, self.cos_sin, k_cache, v_cache, slots, self.num_heads,
                                self.num_kv_heads, k_out)  # fmt: skip
            x = self._project(attn.o_proj, attend(qkv, q, k_cache, v_cache))
            normed = k.add_rms_norm(x, h, layer.ffn_norm.weight, self.eps, self.dtype)
            x = self._project(mlp.down_proj, k.silu_mul(self._project(mlp.gate_up_proj, normed)))
        return k.add_rms_norm(x, h, self.model.norm.weight, self.eps, torch.float32)

    @torch.inference_mode()
    def decode(self, input_ids: Tensor, positions: Tensor, block_tables: Tensor, seq_lens: Tensor, slots: Tensor,
               kv_caches: KVCache) -> Tensor:  # fmt: skip
        """One new token per sequence: ``[S]`` ids, positions, context lengths after this step and
        cache slots, ``[S, W]`` block tables (any integer dtype). Float32 hidden ``[S, D]``."""
        splits = attention_splits(input_ids.shape[0], self.num_kv_heads)

        def attend(qkv: Tensor, q: Tensor, k_cache: Tensor, v_cache: Tensor) -> Tensor:
            return self.kernels.decode_attention(q, k_cache, v_cache, block_tables, seq_lens, self.scale, splits)

        h = self.model.embed_tokens.embed(input_ids).float()
        return self._layers(h, attend, positions, slots, kv_caches)

    @torch.inference_mode()
    def forward(self, input_ids: Tensor, positions: Tensor, attn: AttentionMetadata, kv_caches: KVCache) -> Tensor:
        """Any step (prefill, decode or both), eagerly; writes this step's K/V."""
        plan = AttentionPlan.build(attn, kv_caches[0][0].shape[1])
        tokens = input_ids.shape[0]
        k_rot = torch.empty(tokens, self.num_kv_heads, self.head_dim, dtype=self.dtype, device=input_ids.device)
        v_start = (self.num_heads + self.num_kv_heads) * self.head_dim

        def attend(qkv: Tensor, q: Tensor, k_cache: Tensor, v_cache: Tensor) -> Tensor:
            v = qkv[:, v_start:].view(tokens, self.num_kv_heads, self.head_dim)
            return paged_attention(q, k_rot, v, k_cache, v_cache, plan, self.scale, write_kv=False)

        h = self.model.embed_tokens.embed(input_ids).float()
        return self._layers(h, attend, positions, attn.slot_mapping, kv_caches, k_rot)

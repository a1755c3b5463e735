"""The gemma2 / gemma3 forward: ``llama.CausalLM``'s contract, paged cache and weights, with
gemma's differences (transformers' ``Gemma2ForCausalLM`` / ``Gemma3ForCausalLM`` are the reference):

- the token embedding is scaled by ``sqrt(hidden_size)``, that factor rounded to the activation
  dtype first (as transformers does: 55.4256 is 55.5 in bfloat16 for a 3072-wide model);
- every RMSNorm multiplies by ``1 + weight`` as the checkpoint stores it: the sources hand the
  engine the multiplier (``hf_loader`` adds the 1, llama.cpp's GGUF converter already has), so
  ``llama.RMSNorm`` runs unchanged;
- a layer normalises its attention output and its MLP output too (``post_attn_norm``,
  ``post_ffn_norm``) before adding them into the residual stream;
- the MLP is GeGLU: ``down(gelu_tanh(gate) * up)``;
- attention scales by ``query_pre_attn_scalar ** -0.5``; gemma2 soft-caps the scores
  (``cap * tanh(s / cap)``) and the final logits; gemma3 normalises each head of q and k
  (``1 + weight`` too, rounded after the product as transformers does);
- the layers in ``config.sliding_layers`` attend to the last ``sliding_window`` positions only,
  exactly, on the same paged cache (``AttentionPlan.windowed``); gemma3's use their own rotary
  base (``local_rope_theta``, never scaled), its global layers the config's (with linear scaling
  where configured).

The native CPU path declines these layers (``native.fused.FusedLayer.applies`` fuses the llama
layer only): they run on torch's ops, the matmuls still on the packed int4/int8 kernels, the
global layers' attention on the native attention kernels where no soft-capping applies. Tensor
parallelism (``tp.shard``) shards them as llama layers: the extra norms are replicated.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backends.engine.model.attention import AttentionMetadata, AttentionPlan, KVCache
from backends.engine.model.config import ModelConfig
from backends.engine.model.llama import MLP, Attention, CausalLM, DecoderLayer, DecoderStack, RMSNorm


class GemmaAttention(Attention):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__(config)
        self.scale = (config.query_pre_attn_scalar or config.head_dim) ** -0.5
        self.softcap = config.attn_logit_softcap
        self.is_sliding = layer_idx in config.sliding_layers
        self.window = config.sliding_window if self.is_sliding else None

    def _norm_heads(self, qk: Tensor) -> Tensor:
        """gemma3's per-head RMSNorm (``[T, H + KV, D]``): in float32, times the weight, then
        rounded to the activation dtype (qwen3 rounds before the product)."""
        x = qk.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        w = torch.cat([self.q_norm.expand(self.num_heads, -1), self.k_norm.expand(self.num_kv_heads, -1)])
        return (x * w).to(qk.dtype)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, plan: AttentionPlan, k_cache: Tensor, v_cache: Tensor) -> Tensor:
        num_tokens = x.shape[0]
        qkv = self.qkv_proj(x)  # [T, (H + 2 KV) * D]
        qk = qkv[:, : self.qk_size].view(num_tokens, self.num_heads + self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            qk = self._norm_heads(qk)
        qk = torch.addcmul(qk * cos, qk.roll(self.head_dim // 2, -1), sin)  # rotary, as llama.Attention
        q = qk[:, : self.num_heads]
        k = qk[:, self.num_heads :]
        v = qkv[:, self.qk_size :].view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.window is not None:
            plan = plan.windowed(self.window)
        o = self.attend(q, k, v, k_cache, v_cache, plan, self.scale, softcap=self.softcap)  # [T, H * D]
        return self.o_proj(o)


class GemmaMLP(MLP):
    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        return self.down_proj(F.gelu(gate, approximate="tanh") * up)


class GemmaDecoderLayer(DecoderLayer):
    """``llama.DecoderLayer``'s submodules (so sharding and LoRA see the same projections) plus
    the norms of the attention and MLP outputs."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype, layer_idx: int) -> None:
        nn.Module.__init__(self)
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.attn_norm = RMSNorm(hidden, eps, dtype)
        self.self_attn: GemmaAttention = GemmaAttention(config, layer_idx)
        self.post_attn_norm = RMSNorm(hidden, eps, torch.float32)  # lands in the float32 residual
        self.ffn_norm = RMSNorm(hidden, eps, dtype)
        self.mlp = GemmaMLP(config)
        self.post_ffn_norm = RMSNorm(hidden, eps, torch.float32)

    def forward(self, h: Tensor, cos: Tensor, sin: Tensor, plan: AttentionPlan, k_cache: Tensor, v_cache: Tensor) -> Tensor:
        """``h``: the float32 residual stream, updated in place and returned."""
        h.add_(self.post_attn_norm(self.self_attn(self.attn_norm(h), cos, sin, plan, k_cache, v_cache).float()))
        return h.add_(self.post_ffn_norm(self.mlp(self.ffn_norm(h)).float()))


class GemmaCausalLM(CausalLM):
    """A gemma2 / gemma3 decoder (module docstring). Built, like ``CausalLM``, on the meta device
    by ``loader.load_model``, which also sets ``local_inv_freq`` (gemma3)."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__(config, dtype)  # llama's layers, replaced: nothing is allocated on meta
        self.layers = DecoderStack(GemmaDecoderLayer(config, dtype, i) for i in range(config.num_layers))
        # transformers multiplies in the embedding's dtype: the factor rounded to it
        self.embed_scale = torch.tensor(config.hidden_size**0.5, dtype=dtype, device="cpu").item()
        self.final_logit_softcap = config.final_logit_softcap
        if config.local_rope_theta is not None:  # gemma3's sliding layers' own frequencies
            self.register_buffer("local_inv_freq", torch.empty(config.head_dim // 2), persistent=False)
        else:
            self.local_inv_freq = None

    def _rotary(self, positions: Tensor, inv_freq: Tensor) -> tuple[Tensor, Tensor]:
        """``CausalLM.rotary`` for the given frequencies."""
        freqs = positions.unsqueeze(1).float() * inv_freq  # [T, D/2]
        cos, sin = freqs.cos(), freqs.sin()
        cos = torch.cat([cos, cos], dim=-1)
        sin = torch.cat([-sin, sin], dim=-1)
        return cos.to(self.dtype).unsqueeze(1), sin.to(self.dtype).unsqueeze(1)

    @torch.inference_mode()
    def forward(self, input_ids: Tensor, positions: Tensor, attn: AttentionMetadata, kv_caches: KVCache) -> Tensor:
        """Float32 hidden states after the final norm, ``[T, hidden_size]``; writes this step's K/V."""
        plan = AttentionPlan.build(attn, kv_caches[0][0].shape[1])
        rotary = self._rotary(positions, self.inv_freq)
        local = rotary if self.local_inv_freq is None else self._rotary(positions, self.local_inv_freq)
        h = self.embed_tokens.embed(input_ids).float() * self.embed_scale
        # The layers one by one (whatever stack ``fuse`` or LoRA put around them: its one-call
        # native step never applies, no gemma layer being fused), each with its rotary table.
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches, strict=True):
            cos, sin = local if layer.self_attn.is_sliding else rotary
            h = layer(h, cos, sin, plan, k_cache, v_cache)
        return self.norm(h)

    @torch.inference_mode()
    def compute_logits(self, hidden: Tensor) -> Tensor:
        """``CausalLM.compute_logits``, then gemma2's soft-capping (monotonic: the refined top-k
        are still the top-k)."""
        logits = super().compute_logits(hidden)
        cap = self.final_logit_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap

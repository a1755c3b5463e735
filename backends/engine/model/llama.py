"""The Llama-family forward (llama, mistral, qwen2, qwen3, phi3; mixtral and qwen3_moe with
``moe.SparseMoE`` as each layer's MLP) over a flattened batch and a paged KV cache.

``model(input_ids[T], positions[T], attn, kv_caches) -> hidden[T, D]`` (after the final norm);
``model.compute_logits(hidden[rows]) -> float32 [S, V]``. See docs/architecture.md for the
contract and ``attention.py`` for the cache layout.

The model is built on the meta device by ``loader.py``, which then installs the real weights:
each linear layer is a small module from ``quant/`` (int4, int8 or dense), with q/k/v fused into
``qkv_proj`` and gate/up into ``gate_up_proj`` (one matmul each). Activations run in the dtype
of the weights' scales: float32 (the exact reference) or bfloat16 (the fast path).

This is the plain forward, torch's ops throughout. The native CPU path is a separate step on the
built model (``native.fuse.fuse``, beside tensor parallelism's ``shard_model``): it swaps in
fused decoder layers, a one-call decode stack and attention with the native kernels.
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backends.engine.model.attention import AttentionMetadata, AttentionPlan, KVCache, PagedAttention, allocate_kv_cache
from backends.engine.model.config import ModelConfig
from backends.engine.model.moe import SparseMoE
from backends.engine.model.quant import DenseLinear

__all__ = ["AttentionMetadata", "CausalLM", "allocate_kv_cache", "rope_inv_freq"]

#: Logits recomputed exactly (float32) per sampled row when the head ran in bfloat16.
LOGIT_REFINE_TOP_K = 32


class RMSNorm(nn.Module):
    """``x * rsqrt(mean(x^2) + eps) * weight``, computed as a LayerNorm over ``[x, -x]``.

    That concatenation has mean 0 and variance ``mean(x^2)``, so LayerNorm's fused kernel gives the
    RMS norm in one op; torch's ``rms_norm`` is a chain of ~10 small ops on CPU, about 2x slower at
    decode sizes. Input: the float32 residual stream; output in ``out_dtype`` (the matmuls' dtype).
    ``weight`` is the first half of the doubled LayerNorm weight, kept in float32.
    """

    def __init__(self, dim: int, eps: float, out_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.out_dtype = out_dtype
        self.register_buffer("weight2", torch.empty(2 * dim))

    @property
    def weight(self) -> Tensor:
        return self.weight2[: self.dim]

    def set_weight(self, weight: Tensor) -> None:
        self.weight2 = torch.cat([weight, weight]).float()

    def forward(self, x: Tensor) -> Tensor:
        y = torch.layer_norm(torch.cat([x, x.neg()], dim=-1), (2 * self.dim,), self.weight2, None, self.eps)
        # the slice is contiguous at T = 1; .to/.contiguous make it so otherwise (the kernels need it)
        y = y[:, : self.dim]
        return y.to(self.out_dtype) if self.out_dtype != y.dtype else y.contiguous()


def rope_inv_freq(config: ModelConfig, rope_freqs: Tensor | None = None) -> Tensor:
    """Rotary inverse frequencies (float32 ``[head_dim / 2]``), scaled as the config says.

    ``rope_freqs``: GGUF's per-frequency divisors (how llama.cpp stores Llama 3 scaling).
    """
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = config.rope_scaling
    if rope_freqs is not None:
        inv_freq = inv_freq / rope_freqs.float()
    elif scaling is not None and scaling.kind == "linear":
        inv_freq = inv_freq / scaling.factor
    elif scaling is not None and scaling.kind == "llama3":
        # Long wavelengths are slowed by ``factor``, short ones kept, the band between blended.
        old_len = scaling.original_max_position_embeddings
        wavelen = 2 * math.pi / inv_freq
        slow = inv_freq / scaling.factor
        blend = (old_len / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
        blended = (1 - blend) * slow + blend * inv_freq
        long = wavelen > old_len / scaling.low_freq_factor
        short = wavelen < old_len / scaling.high_freq_factor
        inv_freq = torch.where(long, slow, torch.where(short, inv_freq, blended))
    return inv_freq


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.qk_size = config.q_size + config.kv_size
        self.scale = config.head_dim**-0.5
        self.qkv_proj: nn.Module = DenseLinear(config.hidden_size, config.q_size + 2 * config.kv_size)
        self.o_proj: nn.Module = DenseLinear(config.q_size, config.hidden_size)
        self.attend = PagedAttention()
        self.eps = config.rms_norm_eps
        if config.qk_norm:  # qwen3: float32 [head_dim] each, one per head kind, set by the loader
            self.register_buffer("q_norm", torch.empty(config.head_dim))
            self.register_buffer("k_norm", torch.empty(config.head_dim))
        else:
            self.q_norm = self.k_norm = None

    def _norm_heads(self, qk: Tensor) -> Tensor:
        """qwen3's per-head RMSNorm of q's and k's heads (``[T, H + KV, D]``), as transformers
        computes it: in float32, rounded to the activation dtype, then times the weight."""
        x = qk.float()
        x = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)).to(qk.dtype)
        w = torch.cat([self.q_norm.expand(self.num_heads, -1), self.k_norm.expand(self.num_kv_heads, -1)])
        return x * w.to(qk.dtype)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, plan: AttentionPlan, k_cache: Tensor, v_cache: Tensor) -> Tensor:
        num_tokens = x.shape[0]
        qkv = self.qkv_proj(x)  # [T, (H + 2 KV) * D]
        # rotary on q and k together: x * cos + rotate_half(x) * sin, with rotate_half's sign in sin
        qk = qkv[:, : self.qk_size].view(num_tokens, self.num_heads + self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            qk = self._norm_heads(qk)
        qk = torch.addcmul(qk * cos, qk.roll(self.head_dim // 2, -1), sin)
        q = qk[:, : self.num_heads]
        k = qk[:, self.num_heads :]
        v = qkv[:, self.qk_size :].view(num_tokens, self.num_kv_heads, self.head_dim)
        o = self.attend(q, k, v, k_cache, v_cache, plan, self.scale)  # [T, H * D]
        return self.o_proj(o)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.intermediate_size = config.intermediate_size
        self.gate_up_proj: nn.Module = DenseLinear(config.hidden_size, 2 * config.intermediate_size)
        self.down_proj: nn.Module = DenseLinear(config.intermediate_size, config.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.self_attn = Attention(config)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.mlp: nn.Module = MLP(config)
        if config.is_moe:
            self.mlp = SparseMoE(config, [MLP(config) for _ in range(config.num_experts)])

    def forward(self, h: Tensor, cos: Tensor, sin: Tensor, plan: AttentionPlan, k_cache: Tensor, v_cache: Tensor) -> Tensor:
        """``h``: the float32 residual stream, updated in place and returned."""
        h.add_(self.self_attn(self.attn_norm(h), cos, sin, plan, k_cache, v_cache))
        return h.add_(self.mlp(self.ffn_norm(h)))


class DecoderStack(nn.ModuleList):
    """The decoder layers, run in order over the residual stream, each with its layer's cache."""

    def forward(self, h: Tensor, cos: Tensor, sin: Tensor, plan: AttentionPlan, kv_caches: KVCache) -> Tensor:
        for layer, (k_cache, v_cache) in zip(self, kv_caches, strict=True):
            h = layer(h, cos, sin, plan, k_cache, v_cache)
        return h


class CausalLM(nn.Module):
    """A Llama-family decoder. Build with ``loader.load_model``; construction alone allocates nothing
    when done under ``torch.device("meta")``."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        self.config = config
        self.dtype = dtype
        self.embed_tokens: nn.Module = DenseLinear(config.hidden_size, config.vocab_size)
        self.layers = DecoderStack(DecoderLayer(config, dtype) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, torch.float32)  # for exact logits
        self.lm_head: nn.Module = self.embed_tokens
        self.register_buffer("inv_freq", torch.empty(config.head_dim // 2), persistent=False)
        self._head_takes_dtype: tuple[object, bool] = (None, False)

    @property
    def device(self) -> torch.device:
        return self.inv_freq.device

    def rotary(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """``cos, sin`` as ``[T, 1, head_dim]`` in the activation dtype; ``sin``'s first half negated
        so that ``rotate_half(x) * sin == roll(x, head_dim / 2) * sin``."""
        freqs = positions.unsqueeze(1).float() * self.inv_freq  # [T, D/2]
        cos = freqs.cos()
        cos = torch.cat([cos, cos], dim=-1)
        sin = freqs.sin()
        sin = torch.cat([-sin, sin], dim=-1)
        return cos.to(self.dtype).unsqueeze(1), sin.to(self.dtype).unsqueeze(1)

    @torch.inference_mode()
    def forward(self, input_ids: Tensor, positions: Tensor, attn: AttentionMetadata, kv_caches: KVCache) -> Tensor:
        """Float32 hidden states after the final norm, ``[T, hidden_size]``; writes this step's K/V."""
        plan = AttentionPlan.build(attn, kv_caches[0][0].shape[1])
        cos, sin = self.rotary(positions)
        # The residual stream stays float32 whatever the matmul dtype: 60 bfloat16 additions cost
        # ~1 point of top-1 agreement with the float32 reference on SmolLM2, float32 costs nothing.
        h = self.embed_tokens.embed(input_ids).float()  # a fresh tensor: the layers add into it in place
        return self.norm(self.layers(h, cos, sin, plan, kv_caches))

    def _float32_rows(self, ids: Tensor) -> Tensor:
        """Rows of the output projection in float32 (exact when the head's ``embed`` takes a dtype;
        wrappers that do not, e.g. tensor-parallel ones, give compute-dtype rows)."""
        head = self.lm_head
        if self._head_takes_dtype[0] is not head:
            self._head_takes_dtype = (head, "dtype" in inspect.signature(head.embed).parameters)
        return head.embed(ids, torch.float32) if self._head_takes_dtype[1] else head.embed(ids).float()

    @torch.inference_mode()
    def compute_logits(self, hidden: Tensor) -> Tensor:
        """Float32 logits ``[S, vocab_size]`` for the rows of ``hidden`` that sample.

        With bfloat16 activations the packed kernels return bfloat16 logits: at magnitudes 8-32 that
        rounding alone (up to 0.06) moved SmolLM2's top-1 on 3 % of positions. So the
        ``LOGIT_REFINE_TOP_K`` best candidates are recomputed exactly in float32 from the stored
        weight rows (cheap: ``k`` rows, not the vocabulary); the tail keeps bfloat16 precision.
        """
        logits = self.lm_head(hidden.to(self.dtype))
        if logits.dtype == torch.float32:
            return logits
        return self.refine_logits(logits.float(), hidden)

    def refine_logits(self, logits: Tensor, hidden: Tensor) -> Tensor:
        """``logits`` (float32, in place) with their ``LOGIT_REFINE_TOP_K`` best recomputed in
        float32 from ``hidden`` and the stored head rows."""
        k = min(LOGIT_REFINE_TOP_K, logits.shape[1])
        if k:
            candidates = logits.topk(k, dim=-1).indices  # [S, k]
            rows = self._float32_rows(candidates.view(-1)).view(*candidates.shape, -1)  # [S, k, D]
            exact = torch.bmm(rows, hidden.float().unsqueeze(-1)).squeeze(-1)
            logits.scatter_(1, candidates, exact)
        return logits

"""``ModelConfig``: the architecture facts of a Llama-family model, read from GGUF metadata or a
Hugging Face ``config.json``.

Supported architectures: ``llama`` (SmolLM, TinyLlama, Llama 2/3 including Llama 3 rope scaling),
``mistral`` (full attention; a sliding window is recorded but only exact while the context fits
in it), ``qwen2`` (bias on q/k/v) and ``qwen3`` (an RMSNorm over each head of q and of k before
the rotary embedding) and ``phi3`` (q/k/v and gate/up stored fused; its 128k variants' ``longrope``
scaling is refused), and two mixtures of experts (``moe.SparseMoE`` in place of every layer's MLP):
``mixtral`` (llama attention; softmax over the router's logits, top-k, renormalised; GGUF writes it
as ``llama`` with an ``expert_count``) and ``qwen3_moe`` (qwen3 attention; renormalised only with
``norm_topk_prob``; GGUF ``qwen3moe``; checkpoints with dense layers among the sparse ones,
``mlp_only_layers`` or ``decoder_sparse_step`` > 1, are refused). For those ``intermediate_size`` is
one expert's. Anything else is an ``UnsupportedModelError``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec

from gateway.errors import ConfigError

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "mixtral", "qwen3_moe")
_GGUF_ARCHITECTURES = {"qwen3moe": "qwen3_moe"}  # GGUF's name -> ours where they differ
_MOE = ("mixtral", "qwen3_moe")


class UnsupportedModelError(ConfigError):
    """The model file uses an architecture, tensor type or layout the engine cannot run."""


class RopeScaling(msgspec.Struct, frozen=True, kw_only=True):
    """Rotary-embedding frequency scaling. ``kind``: ``"linear"`` or ``"llama3"``."""

    kind: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


class ModelConfig(msgspec.Struct, frozen=True, kw_only=True):
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool = False  # bias on the q/k/v projections (qwen2)
    qk_norm: bool = False  # an RMSNorm over each head of q and of k, before the rotary embedding (qwen3)
    rope_scaling: RopeScaling | None = None
    sliding_window: int | None = None  # recorded, not applied (see module docstring)
    num_experts: int = 0  # > 0: every layer's MLP is a mixture of this many experts (moe.py)
    num_experts_per_tok: int = 0  # experts each token is routed to (top-k)
    norm_topk_prob: bool = False  # the top-k routing weights renormalised to sum to 1

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_gguf_metadata(cls, metadata: Mapping[str, Any], *, has_output_tensor: bool) -> ModelConfig:
        """Build from decoded GGUF key/values. ``has_output_tensor``: whether ``output.weight`` exists
        (GGUF ties embeddings by leaving it out)."""
        arch = str(metadata.get("general.architecture", ""))
        if _GGUF_ARCHITECTURES.get(arch, arch) not in ARCHITECTURES:
            raise UnsupportedModelError(
                f"GGUF architecture '{arch}' is not supported (supported: {', '.join(ARCHITECTURES)})"
            )
        if arch == "phi3" and metadata.get(f"{arch}.rope.scaling.original_context_length") is not None:
            raise UnsupportedModelError("phi3 with longrope scaling (the 128k-context variants) is not supported")

        def key(name: str, default: Any = None) -> Any:
            value = metadata.get(f"{arch}.{name}", default)
            if value is None:
                raise UnsupportedModelError(f"GGUF metadata lacks '{arch}.{name}'")
            return value

        hidden = int(key("embedding_length"))
        num_heads = int(key("attention.head_count"))
        num_kv_heads = int(key("attention.head_count_kv", num_heads))
        head_dim = int(metadata.get(f"{arch}.attention.key_length") or hidden // num_heads)
        vocab = metadata.get(f"{arch}.vocab_size")
        if vocab is None:
            vocab = len(metadata.get("tokenizer.ggml.tokens") or ())
        scaling = None
        if metadata.get(f"{arch}.rope.scaling.type") == "linear":
            scaling = RopeScaling(kind="linear", factor=float(key("rope.scaling.factor")))
        # Llama 3 scaling travels in GGUF as a ``rope_freqs.weight`` tensor, applied by the loader.
        num_experts = int(metadata.get(f"{arch}.expert_count") or 0)
        name = _GGUF_ARCHITECTURES.get(arch, arch)
        if num_experts and name == "llama":
            name = "mixtral"  # llama.cpp writes Mixtral as llama with experts
        elif num_experts and name != "qwen3_moe":
            raise UnsupportedModelError(f"GGUF architecture '{arch}' with experts is not supported (mixtral, qwen3moe)")
        ffn = metadata.get(f"{arch}.expert_feed_forward_length") if num_experts else None
        return cls(
            architecture=name,
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(ffn or key("feed_forward_length")),
            num_layers=int(key("block_count")),
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(key("attention.layer_norm_rms_epsilon")),
            rope_theta=float(metadata.get(f"{arch}.rope.freq_base", 10000.0)),
            max_position_embeddings=int(key("context_length")),
            tie_word_embeddings=not has_output_tensor,
            attention_bias=arch == "qwen2",
            qk_norm=name in ("qwen3", "qwen3_moe"),
            rope_scaling=scaling,
            num_experts=num_experts,
            num_experts_per_tok=int(key("expert_used_count")) if num_experts else 0,
            # llama.cpp renormalises Mixtral's and Qwen3-MoE's top-k weights (both published ones do)
            norm_topk_prob=bool(metadata.get(f"{arch}.expert_weights_norm", True)) if num_experts else False,
        )

    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any]) -> ModelConfig:
        """Build from a parsed ``config.json`` (transformers 4.x ``rope_scaling`` or 5.x ``rope_parameters``)."""
        arch = str(cfg.get("model_type", ""))
        if arch not in ARCHITECTURES:
            raise UnsupportedModelError(
                f"model_type '{arch}' is not supported (supported: {', '.join(ARCHITECTURES)})"
            )
        if cfg.get("hidden_act", "silu") != "silu":
            raise UnsupportedModelError(f"hidden_act '{cfg.get('hidden_act')}' is not supported (silu only)")
        hidden = int(cfg["hidden_size"])
        num_heads = int(cfg["num_attention_heads"])
        rope = dict(cfg.get("rope_parameters") or {})
        if float(cfg.get("partial_rotary_factor") or rope.get("partial_rotary_factor") or 1.0) != 1.0:
            raise UnsupportedModelError("a partial rotary embedding (partial_rotary_factor < 1) is not supported")
        rope.update(cfg.get("rope_scaling") or {})
        theta = float(cfg.get("rope_theta") or rope.get("rope_theta") or 10000.0)
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        scaling = None
        if rope_type == "llama3":
            scaling = RopeScaling(
                kind="llama3",
                factor=float(rope["factor"]),
                low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
                high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
                original_max_position_embeddings=int(rope.get("original_max_position_embeddings", 8192)),
            )
        elif rope_type == "linear":
            scaling = RopeScaling(kind="linear", factor=float(rope["factor"]))
        elif rope_type not in ("default", None):
            raise UnsupportedModelError(f"rope scaling '{rope_type}' is not supported (linear, llama3)")
        window = cfg.get("sliding_window")
        if arch in ("qwen2", "qwen3", "qwen3_moe") and not cfg.get("use_sliding_window", False):
            window = None
        num_experts = int(cfg.get("num_local_experts") or cfg.get("num_experts") or 0) if arch in _MOE else 0
        if arch == "qwen3_moe" and (cfg.get("mlp_only_layers") or int(cfg.get("decoder_sparse_step") or 1) != 1):
            raise UnsupportedModelError("qwen3_moe with dense layers (mlp_only_layers, decoder_sparse_step > 1) is not supported")
        if arch in _MOE and (num_experts < 1 or int(cfg.get("num_experts_per_tok") or 0) < 1):
            raise UnsupportedModelError(f"{arch} config.json lacks its expert counts (num_local_experts, num_experts_per_tok)")
        return cls(
            architecture=arch,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["moe_intermediate_size"] if arch == "qwen3_moe" else cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
            head_dim=int(cfg.get("head_dim") or hidden // num_heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=arch == "qwen2" or bool(cfg.get("attention_bias", False)),
            qk_norm=arch in ("qwen3", "qwen3_moe"),
            rope_scaling=scaling,
            sliding_window=int(window) if window else None,
            num_experts=num_experts,
            num_experts_per_tok=int(cfg["num_experts_per_tok"]) if num_experts else 0,
            norm_topk_prob=bool(num_experts) and (arch == "mixtral" or bool(cfg.get("norm_topk_prob", False))),
        )

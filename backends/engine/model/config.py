"""``ModelConfig``: the architecture facts of a Llama-family model, read from GGUF metadata or a
Hugging Face ``config.json``.

Supported architectures: ``llama`` (SmolLM, TinyLlama, Llama 2/3 including Llama 3 rope scaling),
``mistral`` (full attention; a sliding window is recorded but only exact while the context fits
in it), ``qwen2`` (bias on q/k/v) and ``qwen3`` (an RMSNorm over each head of q and of k before
the rotary embedding) and ``phi3`` (q/k/v and gate/up stored fused; its 128k variants' ``longrope``
scaling is refused), and with their own forward (``gemma.py``) ``gemma2`` (embedding scaled by
``sqrt(hidden)``, GeGLU, norms after attention and MLP too, soft-capped attention scores and
logits, sliding-window layers alternating with global ones, applied exactly) and ``gemma3``
(the text model, ``Gemma3ForCausalLM`` / ``gemma3_text``: per-head q/k norms, five sliding-window
layers to one global, the sliding ones with their own unscaled rotary base), and two mixtures of
experts (``moe.SparseMoE`` in place of every layer's MLP): ``mixtral`` (llama attention; softmax over the router's logits, top-k, renormalised; GGUF writes it
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

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3", "mixtral", "qwen3_moe")
GEMMA = ("gemma2", "gemma3")  # run by gemma.GemmaCausalLM
_HF_MODEL_TYPES = {"gemma3_text": "gemma3"}  # HF model_type -> architecture, where they differ
# gemma defaults where a file leaves a key out (transformers' for config.json, llama.cpp's for GGUF):
# (attention softcap, final softcap, sliding window, layers per sliding pattern)
_GEMMA_DEFAULTS = {"gemma2": (50.0, 30.0, 4096, 2), "gemma3": (None, None, 4096, 6)}
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}  # see _gemma_gguf
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
    sliding_window: int | None = None  # applied on ``sliding_layers`` (gemma); elsewhere recorded, not applied
    # gemma2 / gemma3 (gemma.py)
    sliding_layers: tuple[int, ...] = ()  # layers whose queries see only the last ``sliding_window`` positions
    query_pre_attn_scalar: float | None = None  # attention scale ``this ** -0.5`` (None: head_dim's)
    attn_logit_softcap: float | None = None  # attention scores ``cap * tanh(scores / cap)``
    final_logit_softcap: float | None = None  # logits likewise
    local_rope_theta: float | None = None  # gemma3: the sliding layers' rotary base (never scaled)
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
        gemma = _gemma_gguf(metadata, arch, hidden // num_heads, head_dim) if arch in GEMMA else {}
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
            qk_norm=name in ("qwen3", "qwen3_moe", "gemma3"),
            rope_scaling=scaling,
            **gemma,
            num_experts=num_experts,
            num_experts_per_tok=int(key("expert_used_count")) if num_experts else 0,
            # llama.cpp renormalises Mixtral's and Qwen3-MoE's top-k weights (both published ones do)
            norm_topk_prob=bool(metadata.get(f"{arch}.expert_weights_norm", True)) if num_experts else False,
        )

    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any]) -> ModelConfig:
        """Build from a parsed ``config.json`` (transformers 4.x ``rope_scaling`` or 5.x ``rope_parameters``)."""
        model_type = str(cfg.get("model_type", ""))
        if model_type == "gemma3":
            raise UnsupportedModelError(
                "gemma3 multimodal checkpoints (Gemma3ForConditionalGeneration) are not supported: "
                "only the text model (model_type gemma3_text, Gemma3ForCausalLM)"
            )
        arch = _HF_MODEL_TYPES.get(model_type, model_type)
        if arch not in ARCHITECTURES:
            raise UnsupportedModelError(
                f"model_type '{model_type}' is not supported (supported: {', '.join(ARCHITECTURES)}, gemma3_text)"
            )
        if arch in GEMMA:
            act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh"
            if act != "gelu_pytorch_tanh":
                raise UnsupportedModelError(f"{arch} hidden_activation '{act}' is not supported (gelu_pytorch_tanh)")
        elif cfg.get("hidden_act", "silu") != "silu":
            raise UnsupportedModelError(f"hidden_act '{cfg.get('hidden_act')}' is not supported (silu only)")
        hidden = int(cfg["hidden_size"])
        num_heads = int(cfg["num_attention_heads"])
        gemma = _gemma_hf(cfg, arch, int(cfg["num_hidden_layers"])) if arch in GEMMA else {}
        rope = dict(cfg.get("rope_parameters") or {})
        if arch == "gemma3" and "full_attention" in rope:  # transformers 5: one set per layer type
            rope = dict(rope["full_attention"] or {})
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
            qk_norm=arch in ("qwen3", "qwen3_moe", "gemma3"),
            rope_scaling=scaling,
            sliding_window=int(window) if window else None,
            **gemma,
            num_experts=num_experts,
            num_experts_per_tok=int(cfg["num_experts_per_tok"]) if num_experts else 0,
            norm_topk_prob=bool(num_experts) and (arch == "mixtral" or bool(cfg.get("norm_topk_prob", False))),
        )


def _gemma_hf(cfg: Mapping[str, Any], arch: str, num_layers: int) -> dict[str, Any]:
    """The gemma fields of a ``config.json`` (transformers 4.x or 5.x spellings)."""
    if cfg.get("use_bidirectional_attention"):
        raise UnsupportedModelError(f"{arch} with bidirectional attention (an embedding model) is not supported")
    attn_cap, final_cap, _, pattern = _GEMMA_DEFAULTS[arch]
    types = cfg.get("layer_types") or [
        "full_attention" if (i + 1) % int(cfg.get("sliding_window_pattern") or pattern) == 0 else "sliding_attention"
        for i in range(num_layers)
    ]
    unknown = set(types) - {"sliding_attention", "full_attention"}
    if unknown or len(types) != num_layers:
        raise UnsupportedModelError(f"{arch} layer_types {sorted(unknown) or len(types)} are not supported")
    fields: dict[str, Any] = {
        "sliding_layers": tuple(i for i, t in enumerate(types) if t == "sliding_attention")
        if cfg.get("sliding_window")
        else (),
        "query_pre_attn_scalar": float(cfg.get("query_pre_attn_scalar") or 256),
        "attn_logit_softcap": _float_or_none(cfg.get("attn_logit_softcapping", attn_cap)),
        "final_logit_softcap": _float_or_none(cfg.get("final_logit_softcapping", final_cap)),
    }
    if arch == "gemma3":
        local = dict((cfg.get("rope_parameters") or {}).get("sliding_attention") or {})
        if local.get("rope_type", "default") != "default":
            raise UnsupportedModelError(f"gemma3 sliding-layer rope scaling '{local['rope_type']}' is not supported")
        fields["local_rope_theta"] = float(local.get("rope_theta") or cfg.get("rope_local_base_freq") or 10000.0)
    return fields


def _gemma_gguf(metadata: Mapping[str, Any], arch: str, hidden_per_head: int, head_dim: int) -> dict[str, Any]:
    """The gemma fields of GGUF metadata, as llama.cpp reads them: keys it may leave out take
    llama.cpp's defaults. The file carries no ``query_pre_attn_scalar``: llama.cpp scales by
    ``hidden / heads`` for the 27B models (told apart by their layer count) and by ``head_dim``
    otherwise, which is what their configs say."""
    attn_cap, final_cap, window, pattern = _GEMMA_DEFAULTS[arch]
    num_layers = int(metadata[f"{arch}.block_count"])
    window = metadata.get(f"{arch}.attention.sliding_window", window if arch == "gemma2" else None)
    pattern = metadata.get(f"{arch}.attention.sliding_window_pattern", pattern)
    if isinstance(pattern, int):  # llama.cpp: layer i slides unless it is the last of each group
        sliding = [i % pattern < pattern - 1 for i in range(num_layers)]
    else:  # one bool per layer
        sliding = [bool(x) for x in pattern]
    fields: dict[str, Any] = {
        "sliding_window": int(window) if window else None,
        "sliding_layers": tuple(i for i, s in enumerate(sliding) if s) if window else (),
        "query_pre_attn_scalar": float(hidden_per_head if num_layers == _GEMMA_27B_LAYERS[arch] else head_dim),
        "attn_logit_softcap": _float_or_none(metadata.get(f"{arch}.attn_logit_softcapping", attn_cap)),
        "final_logit_softcap": _float_or_none(metadata.get(f"{arch}.final_logit_softcapping", final_cap)),
    }
    if arch == "gemma3":
        fields["attn_logit_softcap"] = None  # llama.cpp's gemma3 graph has none
        fields["local_rope_theta"] = float(metadata.get(f"{arch}.rope.freq_base_swa", 10000.0))
    return fields


def _float_or_none(value: Any) -> float | None:
    return float(value) if value else None

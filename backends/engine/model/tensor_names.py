"""The engine's canonical tensor names (``embed``, ``lm_head``, ``norm``, ``layers.{i}.q`` … see
``loader.py``) and how each file format's names map onto them: ``GGUF_NAMES``, ``HF_NAMES`` (used
by the loaders and by ``memory``, which reads only the headers)."""

from __future__ import annotations

from collections.abc import Mapping

import msgspec


class TensorNames(msgspec.Struct, frozen=True, kw_only=True):
    """One format's naming: ``whole_model`` maps full names (``output_norm.weight`` -> ``norm``);
    a layer's tensor is ``{layer_prefix}{i}.{suffix}`` with ``per_layer`` mapping the suffix; an
    expert's (mixtures of experts stored one tensor per expert) ``{layer_prefix}{i}.{expert_prefix}
    {e}.{suffix}``, ``per_expert`` mapping the suffix to ``layers.{i}.experts.{e}.{short}``."""

    whole_model: Mapping[str, str]
    layer_prefix: str
    per_layer: Mapping[str, str]
    expert_prefixes: tuple[str, ...] = ()
    per_expert: Mapping[str, str] = {}

    def canonical(self, name: str) -> str | None:
        """The canonical name of file tensor ``name``; None for a tensor the engine does not use."""
        if name in self.whole_model:
            return self.whole_model[name]
        if name.startswith(self.layer_prefix):
            layer, rest = name[len(self.layer_prefix) :].split(".", 1)
            short = self.per_layer.get(rest)
            if short is not None:
                return f"layers.{layer}.{short}"
            for prefix in self.expert_prefixes:
                if rest.startswith(prefix):
                    expert, _, tail = rest[len(prefix) :].partition(".")
                    short = self.per_expert.get(tail)
                    if short is not None and expert.isdigit():
                        return f"layers.{layer}.experts.{expert}.{short}"
        return None


GGUF_NAMES = TensorNames(
    layer_prefix="blk.",
    per_layer={
        "attn_q.weight": "q",
        "attn_k.weight": "k",
        "attn_v.weight": "v",
        "attn_output.weight": "o",
        "attn_q.bias": "q.bias",
        "attn_k.bias": "k.bias",
        "attn_v.bias": "v.bias",
        "attn_output.bias": "o.bias",
        "ffn_gate.weight": "gate",
        "ffn_up.weight": "up",
        "ffn_down.weight": "down",
        "attn_norm.weight": "attn_norm",
        "ffn_norm.weight": "ffn_norm",
        "attn_q_norm.weight": "q_norm",
        "attn_k_norm.weight": "k_norm",
        "attn_qkv.weight": "qkv",  # phi3: q/k/v fused (its ffn_up holds gate and up: loader._build)
        "post_attention_norm.weight": "post_attn_norm",  # gemma2/3
        "post_ffw_norm.weight": "post_ffn_norm",
        # mixtures of experts: the router, and every expert's weights stacked in one 3-D tensor
        # (gguf_loader hands out one expert's rows as layers.{i}.experts.{e}.{gate,up,down})
        "ffn_gate_inp.weight": "router",
        "ffn_gate_exps.weight": "gate_exps",
        "ffn_up_exps.weight": "up_exps",
        "ffn_down_exps.weight": "down_exps",
    },
    whole_model={
        "token_embd.weight": "embed",
        "output.weight": "lm_head",
        "output_norm.weight": "norm",
        "rope_freqs.weight": "rope_freqs",
    },
)


HF_NAMES = TensorNames(
    layer_prefix="model.layers.",
    per_layer={
        "self_attn.q_proj.weight": "q",
        "self_attn.k_proj.weight": "k",
        "self_attn.v_proj.weight": "v",
        "self_attn.o_proj.weight": "o",
        "self_attn.q_proj.bias": "q.bias",
        "self_attn.k_proj.bias": "k.bias",
        "self_attn.v_proj.bias": "v.bias",
        "self_attn.o_proj.bias": "o.bias",
        "mlp.gate_proj.weight": "gate",
        "mlp.up_proj.weight": "up",
        "mlp.down_proj.weight": "down",
        "input_layernorm.weight": "attn_norm",
        "post_attention_layernorm.weight": "ffn_norm",
        "self_attn.q_norm.weight": "q_norm",
        "self_attn.k_norm.weight": "k_norm",
        "self_attn.qkv_proj.weight": "qkv",  # phi3: stored fused
        "mlp.gate_up_proj.weight": "gate_up",
        "block_sparse_moe.gate.weight": "router",  # mixtral
        "mlp.gate.weight": "router",  # qwen3_moe
    },
    expert_prefixes=("block_sparse_moe.experts.", "mlp.experts."),
    per_expert={
        "w1.weight": "gate",  # mixtral
        "w3.weight": "up",
        "w2.weight": "down",
        "gate_proj.weight": "gate",  # qwen3_moe
        "up_proj.weight": "up",
        "down_proj.weight": "down",
    },
    whole_model={
        "model.embed_tokens.weight": "embed",
        "lm_head.weight": "lm_head",
        "model.norm.weight": "norm",
    },
)


#: gemma2/3 checkpoints: ``post_attention_layernorm`` is the norm of the attention output (llama's
#: pre-MLP norm), ``pre_feedforward_layernorm`` the pre-MLP one.
HF_GEMMA_NAMES = TensorNames(
    layer_prefix=HF_NAMES.layer_prefix,
    per_layer={
        **HF_NAMES.per_layer,
        "post_attention_layernorm.weight": "post_attn_norm",
        "pre_feedforward_layernorm.weight": "ffn_norm",
        "post_feedforward_layernorm.weight": "post_ffn_norm",
    },
    whole_model=HF_NAMES.whole_model,
)


def hf_names(architecture: str) -> TensorNames:
    """The naming of an HF checkpoint of ``architecture`` (``ModelConfig.architecture``)."""
    return HF_GEMMA_NAMES if architecture in ("gemma2", "gemma3") else HF_NAMES


#: The GGUF tensor types the loader decodes, and the form each is held in (``float``; ``int4``:
#: groups of 32; ``int8g``: per-group int8, groups of 32; ``int8g16``: groups of 16; ``int8gz``,
#: ``int8gz16``: the same with a float32 offset per group), losslessly
#: (``gguf_blocks.py``). Here, beside the names, so the memory estimate reads it without torch.
GGUF_WEIGHT_KINDS = {
    "F32": "float", "F16": "float", "BF16": "float", "Q4_0": "int4", "Q4_1": "int4", "Q4_K": "int4",
    "Q5_0": "int8g", "Q8_0": "int8g", "Q3_K": "int8g16", "Q6_K": "int8g16",
    "Q5_1": "int8gz", "Q5_K": "int8gz", "Q2_K": "int8gz16", "IQ4_NL": "int8g", "IQ4_XS": "int8g",
}  # fmt: skip

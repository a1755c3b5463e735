"""Random-weight Llama checkpoints of any shape, written as an HF directory.

For checks and benchmarks that cannot have the real weights (a device machine reaches no package
index; speed depends on shapes, not values) and for tests that need a model the engine can serve.
Needs only torch, safetensors and tokenizers: no transformers.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def write_random_llama(
    path: Path,
    *,
    hidden: int,
    intermediate: int,
    layers: int,
    heads: int,
    kv_heads: int,
    vocab: int,
    seed: int = 0,
    std: float = 0.08,
    rope_theta: float = 10000.0,
    max_positions: int = 1024,
    tokenizer: bool = False,
) -> Path:
    """``config.json`` + ``model.safetensors`` of a tied-embedding llama with normal(0, ``std``)
    weights and norm weights in [1, 1.2); with ``tokenizer``, a byte-level tokenizer too."""
    from safetensors.torch import save_file

    head_dim = hidden // heads
    gen = torch.Generator().manual_seed(seed)

    def weight(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * std

    def norm() -> torch.Tensor:
        return 1 + 0.2 * torch.rand(hidden, generator=gen)

    tensors = {"model.embed_tokens.weight": weight(vocab, hidden), "model.norm.weight": norm()}
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors |= {
            p + "self_attn.q_proj.weight": weight(heads * head_dim, hidden),
            p + "self_attn.k_proj.weight": weight(kv_heads * head_dim, hidden),
            p + "self_attn.v_proj.weight": weight(kv_heads * head_dim, hidden),
            p + "self_attn.o_proj.weight": weight(hidden, heads * head_dim),
            p + "mlp.gate_proj.weight": weight(intermediate, hidden),
            p + "mlp.up_proj.weight": weight(intermediate, hidden),
            p + "mlp.down_proj.weight": weight(hidden, intermediate),
            p + "input_layernorm.weight": norm(),
            p + "post_attention_layernorm.weight": norm(),
        }
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
        "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "rms_norm_eps": 1e-5,
        "rope_theta": rope_theta, "max_position_embeddings": max_positions, "tie_word_embeddings": True,
        "hidden_act": "silu", "torch_dtype": "float32",
    }  # fmt: skip
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(path / "model.safetensors"))
    if tokenizer:
        write_byte_tokenizer(path)
    return path


def write_byte_tokenizer(path: Path) -> None:
    """A byte-level vocabulary (256 tokens + ``<eos>``, id 256): enough for the engine to run
    requests on a model with a vocabulary of at least 257."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<eos>"])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>"}))

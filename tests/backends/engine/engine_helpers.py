"""Helpers for the engine's model tests: tiny random-weight HF models, the same weights written as
GGUF, and a small paged-cache runner that drives ``CausalLM`` like the model runner does."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QT

from backends.engine.model.attention import AttentionMetadata, allocate_kv_cache
from backends.engine.model.loader import LoadedModel, load_model

TINY = dict(
    vocab_size=256,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
)


def make_hf_model(arch: str, seed: int = 0, **overrides: object) -> torch.nn.Module:
    """A random-weight ``LlamaForCausalLM`` / ``MistralForCausalLM`` / ``Qwen2ForCausalLM`` / ``Qwen3ForCausalLM`` in float32
    with lively weights."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Phi3Config,
        Phi3ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    torch.manual_seed(seed)
    kwargs = {**TINY, "initializer_range": 0.08, **overrides}
    if arch in ("mixtral", "qwen3_moe"):  # 4 experts, top-2
        return _make_moe_model(arch, kwargs)
    if arch == "qwen2":
        kwargs.setdefault("tie_word_embeddings", True)
        model = Qwen2ForCausalLM(Qwen2Config(**kwargs))
    elif arch == "qwen3":  # per-head q/k norms; a head_dim that is not hidden / heads, as Qwen3's
        kwargs.setdefault("tie_word_embeddings", True)
        kwargs.setdefault("head_dim", 48)
        model = Qwen3ForCausalLM(Qwen3Config(**kwargs))
    elif arch == "phi3":  # q/k/v and gate/up stored fused; no sliding window at these lengths
        kwargs.setdefault("sliding_window", None)
        kwargs.setdefault("pad_token_id", 0)
        model = Phi3ForCausalLM(Phi3Config(**kwargs))
    elif arch == "mistral":
        model = MistralForCausalLM(MistralConfig(**kwargs))
    elif arch in ("gemma2", "gemma3"):
        model = _make_gemma(arch, kwargs)
    else:
        model = LlamaForCausalLM(LlamaConfig(**kwargs))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and arch in ("gemma2", "gemma3"):  # stored as an offset from 1
                p.uniform_(-0.4, 0.4)
            elif "norm" in name:
                p.uniform_(0.6, 1.4)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.3)
    return model.eval()


def _make_gemma(arch: str, kwargs: dict) -> torch.nn.Module:
    """A tiny gemma2 / gemma3 whose every difference shows at the test lengths: a sliding window of
    4 (prompts of 13+ tokens), soft-caps small enough to bite (gemma2), a global layer between
    local ones with its own linearly scaled rotary base (gemma3: 7 layers, the default 5:1
    pattern). ``query_pre_attn_scalar`` is ``head_dim`` as in gemma's 2B-12B models, what a GGUF implies."""
    from transformers import Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig

    kwargs.setdefault("head_dim", 32)
    kwargs.setdefault("query_pre_attn_scalar", kwargs["head_dim"])
    kwargs.setdefault("sliding_window", 4)
    kwargs.setdefault("pad_token_id", 0)
    if arch == "gemma2":
        kwargs.setdefault("attn_logit_softcapping", 2.0)
        kwargs.setdefault("final_logit_softcapping", 3.0)
        return Gemma2ForCausalLM(Gemma2Config(**kwargs))
    kwargs["num_hidden_layers"] = max(int(kwargs["num_hidden_layers"]), 7)  # layer 5 global, 6 local again
    kwargs.setdefault(
        "rope_parameters",
        {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
         "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0}},
    )  # fmt: skip
    return Gemma3ForCausalLM(Gemma3TextConfig(**kwargs))


def _make_moe_model(arch: str, kwargs: dict) -> torch.nn.Module:
    """A mixture of experts: ``MixtralForCausalLM`` or ``Qwen3MoeForCausalLM`` (qwen3's per-head
    q/k norms, experts narrower than the dense width, ``norm_topk_prob`` on as in Qwen3-30B-A3B).
    The router's weights are drawn wide (std 0.5) so that routing differs from token to token and
    no top-k choice is a near tie on these tiny widths."""
    from transformers import MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    kwargs.setdefault("num_experts_per_tok", 2)
    if arch == "mixtral":
        kwargs.setdefault("num_local_experts", 4)
        kwargs.setdefault("sliding_window", None)
        model = MixtralForCausalLM(MixtralConfig(**kwargs))
    else:
        kwargs.setdefault("num_experts", 4)
        kwargs.setdefault("moe_intermediate_size", 128)
        kwargs.setdefault("head_dim", 48)
        kwargs.setdefault("norm_topk_prob", True)
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**kwargs))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.6, 1.4)
            elif is_router(name):
                p.normal_(0.0, 0.5)
    return model.eval()


def is_router(name: str) -> bool:
    """Whether HF parameter ``name`` is a mixture of experts' router (kept float32 by the loader)."""
    return name.endswith("mlp.gate.weight")


def save_hf(model: torch.nn.Module, path: Path) -> Path:
    model.save_pretrained(path, safe_serialization=True)
    return path


def _llama_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter permutation of q/k rows (half-rotation -> interleaved pairs)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def quant_roundtrip(w: np.ndarray, qtype: QT) -> np.ndarray:
    """What a tensor stored as ``qtype`` decodes to (float32)."""
    if qtype == QT.F32:
        return w.astype(np.float32)
    if qtype == QT.F16:
        return w.astype(np.float16).astype(np.float32)
    return gguf.quants.dequantize(quantize(w, qtype), qtype).reshape(w.shape)


def quantize(w: np.ndarray, qtype: QT) -> np.ndarray:
    """``w`` as ``qtype`` blocks: the ``gguf`` package's quantizer, or ours where it has none."""
    from bench.kquant import QUANTIZERS

    if qtype.name in QUANTIZERS:
        return QUANTIZERS[qtype.name](w.astype(np.float32))
    return gguf.quants.quantize(w.astype(np.float32), qtype)


def write_gguf(model: torch.nn.Module, path: Path, qtype: QT, *, embed_type: QT | None = None) -> Path:
    """Write ``model``'s weights as a GGUF file the way llama.cpp's converter lays them out:
    2-D weights in ``qtype`` (the embedding in ``embed_type``), norms and biases F32; a mixture
    of experts' router F32 and its experts stacked as ``ffn_{gate,up,down}_exps`` in ``qtype``
    (Mixtral written as ``llama`` with an expert count, Qwen3-MoE as ``qwen3moe``)."""
    cfg = model.config
    arch = {"gemma3_text": "gemma3", "mixtral": "llama", "qwen3_moe": "qwen3moe"}.get(cfg.model_type, cfg.model_type)
    gemma = arch in ("gemma2", "gemma3")
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    num_experts = getattr(cfg, "num_local_experts", 0)
    if num_experts:
        w.add_expert_count(num_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
        if cfg.model_type == "qwen3_moe":
            w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    head_dim = getattr(cfg, "head_dim", None)
    if head_dim and (gemma or head_dim != cfg.hidden_size // cfg.num_attention_heads):  # qwen3's, gemma's
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    rope = cfg.rope_parameters.get("full_attention", cfg.rope_parameters)  # gemma3: its global layers'
    w.add_rope_freq_base(float(rope["rope_theta"]))
    if gemma:  # the keys llama.cpp's converter writes (no pattern, no local base: llama.cpp's defaults)
        w.add_sliding_window(cfg.sliding_window)
        if cfg.attn_logit_softcapping:
            w.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
        if cfg.final_logit_softcapping:
            w.add_final_logit_softcapping(cfg.final_logit_softcapping)
        if rope.get("rope_type") == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(rope["factor"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    if gemma:  # llama.cpp's converter stores gemma's norms as the multiplier 1 + weight
        sd = {k: v + 1 if k.endswith("norm.weight") else v for k, v in sd.items()}

    def put(name: str, arr: np.ndarray, kind: QT) -> None:
        if arr.ndim == 1 or kind == QT.F32:
            w.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float32))
        elif kind == QT.F16:
            w.add_tensor(name, arr.astype(np.float16))
        else:  # 3-D (stacked experts): quantized as the 2-D stack of their rows
            blocks = quantize(arr.reshape(-1, arr.shape[-1]), kind)
            w.add_tensor(name, blocks.reshape(*arr.shape[:-1], blocks.shape[-1]), raw_dtype=kind)

    put("token_embd.weight", sd["model.embed_tokens.weight"], embed_type or qtype)
    if not cfg.tie_word_embeddings:
        put("output.weight", sd["lm_head.weight"], qtype)
    put("output_norm.weight", sd["model.norm.weight"], QT.F32)
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        if p + "self_attn.qkv_proj.weight" in sd:  # phi3: fused, as llama.cpp's converter keeps it
            put(f"blk.{i}.attn_qkv.weight", sd[p + "self_attn.qkv_proj.weight"], qtype)
        else:
            q, k = sd[p + "self_attn.q_proj.weight"], sd[p + "self_attn.k_proj.weight"]
            if arch == "llama":  # and Mixtral
                q, k = _llama_permute(q, heads), _llama_permute(k, kv_heads)
            put(f"blk.{i}.attn_q.weight", q, qtype)
            put(f"blk.{i}.attn_k.weight", k, qtype)
            put(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"], qtype)
        put(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"], qtype)
        for short in ("q", "k", "v"):
            bias = sd.get(p + f"self_attn.{short}_proj.bias")
            if bias is not None:
                put(f"blk.{i}.attn_{short}.bias", bias, QT.F32)
        if num_experts:  # HF holds gate|up as [E, 2I, D], down as [E, D, I]
            put(f"blk.{i}.ffn_gate_inp.weight", sd[p + "mlp.gate.weight"], QT.F32)
            gate, up = np.split(sd[p + "mlp.experts.gate_up_proj"], 2, axis=1)
            put(f"blk.{i}.ffn_gate_exps.weight", gate, qtype)
            put(f"blk.{i}.ffn_up_exps.weight", up, qtype)
            put(f"blk.{i}.ffn_down_exps.weight", sd[p + "mlp.experts.down_proj"], qtype)
        else:
            if p + "mlp.gate_up_proj.weight" in sd:  # phi3: gate and up in one ffn_up, gate rows first
                put(f"blk.{i}.ffn_up.weight", sd[p + "mlp.gate_up_proj.weight"], qtype)
            else:
                put(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"], qtype)
                put(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"], qtype)
            put(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"], qtype)
        for short in ("q", "k"):  # qwen3
            norm = sd.get(p + f"self_attn.{short}_norm.weight")
            if norm is not None:
                put(f"blk.{i}.attn_{short}_norm.weight", norm, QT.F32)
        put(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"], QT.F32)
        if gemma:
            put(f"blk.{i}.post_attention_norm.weight", sd[p + "post_attention_layernorm.weight"], QT.F32)
            put(f"blk.{i}.ffn_norm.weight", sd[p + "pre_feedforward_layernorm.weight"], QT.F32)
            put(f"blk.{i}.post_ffw_norm.weight", sd[p + "post_feedforward_layernorm.weight"], QT.F32)
        else:
            put(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"], QT.F32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def roundtrip_model(model: torch.nn.Module, qtype: QT, *, embed_type: QT | None = None) -> torch.nn.Module:
    """A copy of ``model`` whose weights are what a ``qtype`` GGUF of it decodes to (a router
    stays float32; stacked experts round-trip row by row, as the file stores them)."""
    import copy

    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if p.ndim >= 2 and not is_router(name):
                kind = (embed_type or qtype) if "embed_tokens" in name else qtype
                rows = p.reshape(-1, p.shape[-1]).numpy()
                p.copy_(torch.from_numpy(quant_roundtrip(rows, kind)).view(p.shape))
    return ref


def hf_logits(model: torch.nn.Module, tokens: Sequence[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([list(tokens)])).logits[0].float()


class PagedRunner:
    """Drives ``CausalLM`` over steps of ``(seq_id, new_tokens)`` with a shuffled block pool."""

    def __init__(self, model, config, *, num_blocks: int = 64, block_size: int = 4, dtype=torch.float32, seed: int = 0):
        self.model = model
        self.block_size = block_size
        self.kv = allocate_kv_cache(config, num_blocks, block_size, dtype)
        self.free = list(range(num_blocks))
        random.Random(seed).shuffle(self.free)
        self.tables: dict[int, list[int]] = {}
        self.lens: dict[int, int] = {}

    def step(self, batch: Sequence[tuple[int, Sequence[int]]]) -> list[torch.Tensor]:
        """Run one flattened step; returns each sequence's float32 logits ``[q_len, V]``."""
        ids, positions, q_lens, seq_lens, tables = [], [], [], [], []
        for seq_id, tokens in batch:
            start = self.lens.get(seq_id, 0)
            end = start + len(tokens)
            table = self.tables.setdefault(seq_id, [])
            while len(table) * self.block_size < end:
                table.append(self.free.pop())
            self.lens[seq_id] = end
            ids.extend(tokens)
            positions.extend(range(start, end))
            q_lens.append(len(tokens))
            seq_lens.append(end)
            tables.append(table)
        attn = AttentionMetadata.from_lists(
            query_lens=q_lens, seq_lens=seq_lens, block_tables=tables, block_size=self.block_size
        )
        hidden = self.model(torch.tensor(ids), torch.tensor(positions), attn, self.kv)
        logits = self.model.compute_logits(hidden)
        out, row = [], 0
        for n in q_lens:
            out.append(logits[row : row + n])
            row += n
        return out


def default_kernels():  # type: ignore[no-untyped-def]
    """The native kernels as an engine with default options loads them (None where this machine
    builds none, or ``TAXIWAY_NATIVE_KERNELS=0``)."""
    from backends.engine.builder import EngineOptions, load_kernels

    return load_kernels(EngineOptions())


def load_fused(path: Path, kernels=None, **kwargs) -> LoadedModel:  # type: ignore[no-untyped-def]
    """``load_model`` then ``native.fuse.fuse``, as ``build_engine`` does: the engine's fast path
    (``kernels``: default ``default_kernels()``)."""
    from backends.engine.native.fuse import fuse

    kernels = default_kernels() if kernels is None else kernels
    loaded = load_model(path, kernels=kernels, **kwargs)
    fuse(loaded.model, kernels)
    return loaded


def run_paged_steps(model, config, seqs: dict, steps: list, dtype=torch.float32) -> dict[int, tuple[list[int], torch.Tensor]]:
    """Feed ``steps`` (each a list of ``(seq_id, new tokens)``) through a ``PagedRunner``: per
    sequence, every token fed and the logits of every step, concatenated."""
    runner = PagedRunner(model, config, dtype=dtype)
    tokens: dict[int, list[int]] = {i: [] for i in seqs}
    logits: dict[int, list[torch.Tensor]] = {i: [] for i in seqs}
    for step in steps:
        for (seq_id, new), out in zip(step, runner.step(step)):
            tokens[seq_id].extend(new)
            logits[seq_id].append(out)
    return {i: (tokens[i], torch.cat(logits[i])) for i in seqs}

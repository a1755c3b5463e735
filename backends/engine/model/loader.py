"""``load_model``: a GGUF file or an HF directory onto a meta-built ``CausalLM``.

Sources (``gguf_loader.GGUFSource``, ``hf_loader.HFSource``) hand out one tensor at a time by
canonical name: ``embed``, ``lm_head``, ``norm``, ``rope_freqs`` and per layer
``layers.{i}.{q,k,v,o,gate,up,down,attn_norm,ffn_norm}`` (+ ``.bias`` on q/k/v/o; gemma's
``post_attn_norm``, ``post_ffn_norm``; norms are the multipliers, gemma's ``1 + weight``); a mixture of
experts has ``layers.{i}.router`` and ``layers.{i}.experts.{e}.{gate,up,down}`` instead of
gate/up/down (quantized as any linear; the router kept dense float32). Each is
turned into its final form (packed, requantized or cast) before the next is read, so no
full-precision copy of a quantized model ever exists.

``quantization``:
- ``None``: keep what the file has: GGUF Q4_0/Q4_1 -> int4 (``Int4Linear``), Q8_0 -> per-group int8
  kept exactly (``Int8GroupLinear``); float tensors stay dense.
- ``"int4"`` / ``"int8"``: float linear weights are quantized at load (int4 groupwise with group 32,
  int8 per channel); the embedding and an untied lm_head become int8 per channel. GGUF tensors that
  are already quantized keep their own format.
- ``"none"``: everything dense in ``dtype`` (GGUF quantized tensors dequantised one at a time).

A pre-quantized HF checkpoint (AWQ, GPTQ) hands out its linears as ``Int4Data``, kept as they are
(``"none"`` dequantises them); GPTQ ``desc_act`` ones as ``InputPermutedData``, whose layer
gathers its input (``quant/permuted.py``).

``kernels`` (the loaded native kernels, or None): quantized weights that the native matmuls can
run are packed in their layouts. The rest of the native path is ``native.fuse.fuse``'s step.
"""

from __future__ import annotations

import ctypes
import gc
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import torch
from torch import Tensor, nn

from backends.engine.model.config import GEMMA, ModelConfig, UnsupportedModelError
from backends.engine.model.gemma import GemmaCausalLM
from backends.engine.model.llama import CausalLM, rope_inv_freq
from backends.engine.model.quant import (
    DEFAULT_GROUP_SIZE,
    ConcatLinear,
    WeightData,
    cat_rows,
    make_linear,
    quantize_int4,
    quantize_int8,
    same_kind,
)
from backends.engine.model.quant.permuted import InputPermutedData, permuted_linear

if TYPE_CHECKING:
    from backends.engine.native.ckernels import Kernels

QUANTIZATIONS = (None, "int4", "int8", "none")
_CHUNK_ROWS = 4096  # rows of a vocabulary-sized tensor converted at a time: bounds the peak


class LoadedModel(msgspec.Struct, frozen=True, kw_only=True):
    """A model ready to run, with what the rest of the engine needs to know about it."""

    model: Any  # CausalLM
    config: ModelConfig
    metadata: Mapping[str, Any]  # GGUF key/values (gguf_loader.GGUFMetadata), or the parsed config.json
    path: Path
    format: str  # "gguf" | "hf"
    dtype: Any  # torch.dtype of activations and KV cache
    device: Any  # torch.device
    tensor_types: dict[str, str]  # canonical tensor name -> type in the file (e.g. "Q4_1")


def load_model(
    path: str | Path,
    *,
    quantization: str | None = None,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    threads: int | None = None,
    kernels: Kernels | None = None,
) -> LoadedModel:
    """Load a ``.gguf`` file or an HF model directory. ``threads`` sets torch's intra-op threads;
    ``kernels``: the native kernels whose layouts the quantized weights take (None: torch's)."""
    if quantization not in QUANTIZATIONS:
        raise UnsupportedModelError(f"quantization must be one of int4, int8, none (got {quantization!r})")
    if dtype not in (torch.float32, torch.bfloat16):
        raise UnsupportedModelError(f"activation dtype {dtype} is not supported (float32, bfloat16)")
    if threads:
        torch.set_num_threads(threads)
    path = Path(path)
    device = torch.device(device)
    if path.is_dir():
        from backends.engine.model.hf_loader import HFSource

        source: Any = HFSource(path)
    elif path.is_file():
        from backends.engine.model.gguf_loader import GGUFSource

        source = GGUFSource(path)
    else:
        raise UnsupportedModelError(f"model path '{path}' does not exist")
    return_freed_memory()
    try:
        model = _build(source, _Builder(source, quantization, dtype, device, kernels))
    finally:
        source.close()
    return_freed_memory()
    return LoadedModel(
        model=model,
        config=source.config,
        metadata=source.metadata,
        path=path,
        format=source.format,
        dtype=dtype,
        device=device,
        tensor_types=dict(source.tensor_types),
    )


class _Builder:
    def __init__(
        self, source: Any, quantization: str | None, dtype: torch.dtype, device: torch.device, kernels: Kernels | None
    ) -> None:
        self.source = source
        self.quantization = quantization
        self.dtype = dtype
        self.device = device
        self.kernels = kernels

    def make_linear(self, data: WeightData, bias: Tensor | None = None) -> nn.Module:
        return make_linear(data, bias=bias, dtype=self.dtype, device=self.device, kernels=self.kernels)

    def prepare(self, data: WeightData, *, vocab: bool = False) -> WeightData:
        """Apply the quantization policy to one tensor (row-chunked for the vocabulary)."""
        q = self.quantization
        if q == "none":
            return data if isinstance(data, Tensor) else data.dequantize()
        if isinstance(data, Tensor):
            if q == "int8" or (q == "int4" and vocab):
                return quantize_int8(data)
            if q == "int4":
                return quantize_int4(data, DEFAULT_GROUP_SIZE)
            return data
        return data

    def vocab(self, name: str) -> nn.Module:
        """The embedding / lm_head: read, converted and freed a row chunk at a time."""
        rows = self.source.num_rows(name)
        pieces = []
        for r in range(0, rows, _CHUNK_ROWS):
            pieces.append(self.prepare(self.source.get(name, rows=slice(r, r + _CHUNK_ROWS)), vocab=True))
            return_freed_memory(collect=False)  # glibc does not reuse the chunk's temporaries: +230 MB peak without
        data = cat_rows(pieces) if len(pieces) > 1 else pieces[0]
        del pieces
        return self.make_linear(data)

    def linear(self, names: list[str]) -> nn.Module:
        """One module for the (row-concatenated) weights ``names``; biases attached when present."""
        parts = [self.prepare(self.source.get(n)) for n in names]
        biases = [self.source.get(f"{n}.bias") if self.source.has(f"{n}.bias") else None for n in names]
        if all(b is None for b in biases):
            biases = [None] * len(parts)
        else:  # a part without bias gets zeros, so the fused bias lines up with the fused rows
            biases = [b.float() if b is not None else torch.zeros(_rows(p)) for b, p in zip(biases, parts)]
        if any(isinstance(p, InputPermutedData) for p in parts):
            return permuted_linear(parts, biases, self.make_linear)
        if len(parts) == 1 or same_kind(parts):
            bias = None if biases[0] is None else torch.cat(biases)
            return self.make_linear(cat_rows(parts), bias)
        # Mixed formats (e.g. a Q8_0 attn_v among Q4_1 q/k): separate matmuls, outputs concatenated.
        return ConcatLinear([self.make_linear(p, bias) for p, bias in zip(parts, biases)])

    def make_router(self, name: str) -> nn.Module:
        """A mixture of experts' router: dense float32 whatever the policy (``moe.py`` says why)."""
        data = self.source.get(name)
        weight = data if isinstance(data, Tensor) else data.dequantize()
        return make_linear(weight, dtype=torch.float32, device=self.device)

    def vector(self, name: str) -> Tensor:
        data = self.source.get(name)
        assert isinstance(data, Tensor)
        return data.to(device=self.device, dtype=torch.float32)


def _build(source: Any, b: _Builder) -> CausalLM:
    config: ModelConfig = source.config
    with torch.device("meta"):
        model = (GemmaCausalLM if config.architecture in GEMMA else CausalLM)(config, b.dtype)
    # The vocabulary-sized tensors first, while the heap is empty: their transients are the largest.
    model.embed_tokens = b.vocab("embed")
    model.lm_head = model.embed_tokens if config.tie_word_embeddings else b.vocab("lm_head")
    for i, layer in enumerate(model.layers):
        p = f"layers.{i}"
        layer.attn_norm.set_weight(b.vector(f"{p}.attn_norm"))
        layer.ffn_norm.set_weight(b.vector(f"{p}.ffn_norm"))
        for norm in ("post_attn_norm", "post_ffn_norm"):  # gemma's, on the attention and MLP outputs
            if hasattr(layer, norm):
                getattr(layer, norm).set_weight(b.vector(f"{p}.{norm}"))
        if config.qk_norm:
            layer.self_attn.q_norm = b.vector(f"{p}.q_norm")
            layer.self_attn.k_norm = b.vector(f"{p}.k_norm")
        # phi3 stores q/k/v fused, and gate/up (GGUF: in its ffn_up, gate rows first): as is
        qkv = [f"{p}.qkv"] if source.has(f"{p}.qkv") else [f"{p}.q", f"{p}.k", f"{p}.v"]
        layer.self_attn.qkv_proj = b.linear(qkv)
        layer.self_attn.o_proj = b.linear([f"{p}.o"])
        if config.is_moe:  # the router, then one expert at a time (each as a dense layer's MLP)
            layer.mlp.router = b.make_router(f"{p}.router")
            for e, expert in enumerate(layer.mlp.experts):
                expert.gate_up_proj = b.linear([f"{p}.experts.{e}.gate", f"{p}.experts.{e}.up"])
                expert.down_proj = b.linear([f"{p}.experts.{e}.down"])
        else:
            if source.has(f"{p}.gate_up"):
                gate_up = [f"{p}.gate_up"]
            else:
                gate_up = [f"{p}.gate", f"{p}.up"] if source.has(f"{p}.gate") else [f"{p}.up"]
            layer.mlp.gate_up_proj = b.linear(gate_up)
            layer.mlp.down_proj = b.linear([f"{p}.down"])
        return_freed_memory(collect=False)  # glibc keeps freed temporaries otherwise: peak RSS grows per layer
    model.norm.set_weight(b.vector("norm"))
    rope_freqs = source.get("rope_freqs") if source.has("rope_freqs") else None
    model.inv_freq = rope_inv_freq(config, rope_freqs).to(b.device)
    if config.local_rope_theta is not None:  # gemma3's sliding layers: their own base, never scaled
        local = msgspec.structs.replace(config, rope_theta=config.local_rope_theta, rope_scaling=None)
        model.local_inv_freq = rope_inv_freq(local).to(b.device)
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise UnsupportedModelError(f"weights missing after load: {', '.join(leftover)}")
    return model.eval()


def _rows(data: WeightData | InputPermutedData) -> int:
    if isinstance(data, InputPermutedData):
        return data.data.q.shape[0]
    return data.shape[0] if isinstance(data, Tensor) else data.q.shape[0]


def return_freed_memory(*, collect: bool = True) -> None:
    """Hand freed temporaries back to the OS (glibc keeps them otherwise): the loader's, and the
    unsharded weights tensor parallelism drops. ``collect``: a garbage collection first, for
    what only a reference cycle still holds. The loader's per-layer calls skip it: its temporaries
    are freed by their last reference, and a full collection costs ~0.2 s in a process holding a
    tokenizer's vocabulary (44 of them were 7.5 of a SmolLM2 load's 14.6 CPU seconds; the same
    peak RSS without)."""
    if collect:
        gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


__all__ = ["QUANTIZATIONS", "LoadedModel", "load_model", "return_freed_memory"]

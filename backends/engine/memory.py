"""What an engine model will hold in memory, declared before it loads (``estimate_memory``).

Read from the model file's header alone (a GGUF tensor table, or ``config.json`` and the
safetensors headers) and the options: no weight is read and torch is not imported, so it takes
milliseconds. Three parts:

- ``weights``: every tensor in the form the loader keeps it (``model/loader.py``'s policy): int4
  packed at half a byte a weight plus a scale and a zero per group of 32 in the compute dtype, rows
  padded to 64; GGUF Q8_0 kept as per-group int8 (a byte a weight plus a scale per 32); int8 per
  channel (a byte a weight plus a scale per row); float tensors dense in the compute dtype; norms in
  float32, twice (``RMSNorm.weight2``). A tied lm_head is the embedding, counted once. AWQ / GPTQ
  linears are int4 in the engine's groups for them (``int4g128``: usually 128); the channel order
  a GPTQ ``desc_act`` layer keeps (8 bytes an input channel) is not counted.
  A mixture of experts counts every expert (each a dense layer's gate|up and down), its router float32.
- ``kv_cache``: the paged cache ``builder.kv_cache_layout`` sizes (zero-filled at start: resident).
- ``overhead``: the rest a running model holds, stated rather than measured: ``BASE_OVERHEAD``
  (tokenizer, scheduler, the allocator's slack) plus one step's activations at
  ``max_num_batched_tokens`` and the logits of ``max_num_seqs`` rows (with float32 activations
  over quantized weights, the dequantised copy of the largest weight too).

Not included: the engine's runtime itself (torch, the native kernels' library), paid once per
process by the first engine model whatever it is. Measured against a real load in
tests/backends/engine/test_memory.py (figures in docs/configuration.md).
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable
from pathlib import Path

import msgspec

from backends.engine.builder import EngineOptions, kv_cache_layout
from backends.engine.model.config import ModelConfig, UnsupportedModelError
from backends.engine.model.gguf_reader import read_gguf
from backends.engine.model.prequant_config import PrequantConfig, packed_name
from backends.engine.model.tensor_names import GGUF_NAMES, GGUF_WEIGHT_KINDS, hf_names

#: tokenizer (a 49k vocabulary's Python objects), scheduler state and the allocator's slack
BASE_OVERHEAD = 48 * 2**20

GROUP = 32  # int4 and Q8_0 group size (model/quant/data.py's DEFAULT_GROUP_SIZE, GGUF's block)
ROW_BLOCK = 64  # packed int4 rows are padded to this (model/quant/layouts.py's CPU_BLOCK_N)


_VOCAB = ("embed", "lm_head")
_FUSED = (("q", "k", "v", "qkv"), ("o",), ("gate", "up", "gate_up"), ("down",))  # one module each (loader._build; phi3 stores qkv, gate_up)


class MemoryEstimate(msgspec.Struct, frozen=True, kw_only=True):
    """Bytes a loaded model holds: ``weights`` + ``kv_cache`` + ``overhead`` = ``total``."""

    weights: int
    kv_cache: int
    overhead: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.overhead


class TensorEntry(msgspec.Struct, frozen=True):
    """A tensor as the file holds it: canonical name, kind (``float``/``int4``/``int4g128`` (AWQ,
    GPTQ)/``int8g``/``int8g16``/``int8gz``/``int8gz16``), shape as ``(rows, cols)`` (``(n, 1)`` for a vector)."""

    name: str
    kind: str
    rows: int
    cols: int


def estimate_memory(path: Path, options: EngineOptions) -> MemoryEstimate:
    """The memory the model at ``path`` (a ``.gguf`` file or an HF directory) will hold when served
    with ``options``. ``UnsupportedModelError`` (a ``ConfigError``) when the header cannot be read
    or names what the engine cannot load: the load would fail the same way."""
    config, tensors = _read_gguf(path) if path.is_file() else _read_hf(path)
    dtype_bytes = 2 if options.dtype == "bfloat16" else 4
    weights = weight_bytes(tensors, config, options.quantization, dtype_bytes)
    layout = kv_cache_layout(config, options, dtype_bytes)
    tokens = options.num_batched_tokens(layout.max_model_len)
    # one step's live activations in float32: hidden states and residual, q/k/v, gate|up, and
    # the logits of every sequence sampling in it
    mlp = 3 * config.intermediate_size
    if config.is_moe:  # each token's row gathered for each of its top-k experts, their outputs
        mlp = config.num_experts_per_tok * (mlp + 2 * config.hidden_size)
    per_token = 4 * (3 * config.hidden_size + config.q_size + 2 * config.kv_size + mlp)
    step = tokens * per_token + options.max_num_seqs * config.vocab_size * 4 * 2
    if dtype_bytes == 4 and _quantized(tensors, options.quantization):
        # float32 activations take quantized weights' dequantise path: a float32 copy of the largest
        # (the vocabulary) while it runs, and glibc's arenas keep about as much again (measured on
        # SmolLM2 Q4_1: +230 MB resident after a step, its vocabulary being 113 MB in float32)
        step += 2 * 4 * max(t.rows * t.cols for t in tensors)
    return MemoryEstimate(weights=weights, kv_cache=layout.num_tokens * layout.bytes_per_token, overhead=BASE_OVERHEAD + step)


def read_config(path: Path) -> ModelConfig:
    """The model's config from its header (``.gguf`` file or HF directory), no weight read."""
    return read_header(path)[0]


def read_header(path: Path) -> tuple[ModelConfig, list[TensorEntry]]:
    """The model's config and its tensors as stored, from the header alone (``taxiway show``)."""
    return _read_gguf(path) if path.is_file() else _read_hf(path)


def weight_bytes(tensors: Iterable[TensorEntry], config: ModelConfig, quantization: str | None, dtype_bytes: int) -> int:
    """Bytes of the weights as the loader keeps them (see the module docstring)."""
    by_name = {t.name: t for t in tensors}
    if config.tie_word_embeddings:
        by_name.pop("lm_head", None)
    total = 0
    for name in _VOCAB:
        if name in by_name:
            total += _linear_bytes([by_name[name]], quantization, dtype_bytes, vocab=True)
    for i in range(config.num_layers):
        for group in _layer_groups(config):
            parts = [by_name[f"layers.{i}.{n}"] for n in group if f"layers.{i}.{n}" in by_name]
            total += _linear_bytes(parts, quantization, dtype_bytes, vocab=False)
            total += sum(by_name[b].rows * dtype_bytes for n in group if (b := f"layers.{i}.{n}.bias") in by_name)
        total += 2 * 8 * config.hidden_size  # attn_norm, ffn_norm: weight2, float32
        total += 4 * config.num_experts * config.hidden_size  # a mixture of experts' router, float32
    return total + 8 * config.hidden_size  # the final norm


def _layer_groups(config: ModelConfig, num_experts: int | None = None) -> list[tuple[str, ...]]:
    """A layer's linear modules as canonical name groups (``_FUSED``; a mixture of experts' MLP as
    each of its first ``num_experts`` experts' gate|up and down, all of them by default)."""
    if not config.is_moe:
        return list(_FUSED)
    experts = range(config.num_experts if num_experts is None else num_experts)
    moe = [g for e in experts for g in ((f"experts.{e}.gate", f"experts.{e}.up"), (f"experts.{e}.down",))]
    return [*_FUSED[:2], *moe]


class LinearShape(msgspec.Struct, frozen=True):
    """One linear module as the loader builds it: storage form (``dense``, ``int8`` per channel,
    ``int4``, ``int8g``, ``int8g16``), ``[rows, cols]`` and bytes held."""

    form: str
    rows: int
    cols: int
    bytes: int


def decode_linears(tensors: Iterable[TensorEntry], config: ModelConfig, quantization: str | None, dtype_bytes: int) -> list[LinearShape]:
    """The linear modules one decode step runs, in order: each layer's (fused as ``_FUSED``), then
    the head (the embedding's rows when tied). ``taxiway plan`` times these for its decode estimate."""
    by_name = {t.name: t for t in tensors}
    shapes: list[LinearShape] = []

    def add(parts: list[TensorEntry], vocab: bool) -> None:
        forms = {_form(p, quantization, vocab) for p in parts}
        if len(forms) > 1:
            for p in parts:
                add([p], vocab)
            return
        nbytes = _linear_bytes(parts, quantization, dtype_bytes, vocab=vocab)
        shapes.append(LinearShape(forms.pop(), sum(p.rows for p in parts), parts[0].cols, nbytes))

    for i in range(config.num_layers):  # a mixture of experts: a token's top-k experts' weights
        for group in _layer_groups(config, config.num_experts_per_tok):
            parts = [by_name[f"layers.{i}.{n}"] for n in group if f"layers.{i}.{n}" in by_name]
            if parts:
                add(parts, vocab=False)
    head = by_name.get("embed" if config.tie_word_embeddings or "lm_head" not in by_name else "lm_head")
    if head is not None:
        add([head], vocab=True)
    return shapes


def _quantized(tensors: Iterable[TensorEntry], quantization: str | None) -> bool:
    return quantization in ("int4", "int8") or (quantization is None and any(t.kind != "float" for t in tensors))


def _form(entry: TensorEntry, quantization: str | None, vocab: bool) -> str:
    """The loader's policy (``loader._Builder.prepare`` then ``make_linear``)."""
    if quantization == "none":
        return "dense"
    if entry.kind != "float":
        return entry.kind
    if quantization == "int8" or (quantization == "int4" and vocab):
        return "int8"
    return "int4" if quantization == "int4" else "dense"


def group_size(form: str) -> int:
    """The group size of a quantized storage form: ``int4g{N}`` (AWQ / GPTQ) N, ``*16`` 16, else 32."""
    if form.startswith("int4g"):
        return int(form[len("int4g") :])
    return 16 if form.endswith("16") else GROUP


def _linear_bytes(parts: list[TensorEntry], quantization: str | None, dtype_bytes: int, *, vocab: bool) -> int:
    """One linear module of the row-concatenated ``parts`` (separate modules when their forms differ)."""
    if not parts:
        return 0
    forms = {_form(p, quantization, vocab) for p in parts}
    if len(forms) > 1:
        return sum(_linear_bytes([p], quantization, dtype_bytes, vocab=vocab) for p in parts)
    form = forms.pop()
    n, k = sum(p.rows for p in parts), parts[0].cols
    if form == "dense":
        return n * k * dtype_bytes
    if form == "int8":  # per channel
        return n * k + n * dtype_bytes
    padded = n + (-n) % ROW_BLOCK
    groups = k // group_size(form)
    if form.startswith("int4"):  # packed nibbles + [G, N, 2] scales and zeros (Q4_0 on the native
        return padded * k // 2 + groups * padded * 2 * dtype_bytes  # kernels: float16 scales alone)
    # int8g: the native kernel's bytes + float32 scales (float16 for Q8_0: counted high), or two
    # nibbles + scales and zeros;
    # int8gz: and a float32 offset per group (quant.Int8OffsetLinear)
    offsets = groups * n * 4 if form.startswith("int8gz") else 0
    return padded * k + groups * padded * max(4, 2 * dtype_bytes) + offsets


# -- headers ---------------------------------------------------------------------------------------


def _read_gguf(path: Path) -> tuple[ModelConfig, list[TensorEntry]]:
    try:
        header = read_gguf(path, max_array=0)  # the vocabulary is not needed: its size is embed's rows
    except (ValueError, OSError) as exc:
        raise UnsupportedModelError(f"cannot read GGUF file '{path}': {exc}") from exc
    tensors = []
    for t in header.tensors:
        name = GGUF_NAMES.canonical(t.name)
        if name is None:
            continue
        kind = GGUF_WEIGHT_KINDS.get(t.qtype.name)
        if kind is None:
            raise UnsupportedModelError(
                f"GGUF tensor '{t.name}' has type {t.qtype.name}, which the engine cannot load "
                f"(supported: {', '.join(GGUF_WEIGHT_KINDS)})"
            )
        tensors.append(TensorEntry(name, kind, math.prod(t.shape[1:]), t.shape[0]))  # GGUF: columns first
    metadata = dict(header.metadata)
    arch = metadata.get("general.architecture")
    embed = next((t for t in tensors if t.name == "embed"), None)
    if embed is not None:
        metadata.setdefault(f"{arch}.vocab_size", embed.rows)
    has_output = any(t.name == "lm_head" for t in tensors)
    config = ModelConfig.from_gguf_metadata(metadata, has_output_tensor=has_output)
    return config, _split_experts(tensors, config.num_experts)


def _split_experts(tensors: list[TensorEntry], num_experts: int) -> list[TensorEntry]:
    """Stacked experts (``layers.{i}.gate_exps``, rows of every expert) as one entry per expert,
    named as the loader reads them (``layers.{i}.experts.{e}.gate``)."""
    if not num_experts:  # not a mixture of experts: the loader reads no stacked tensor
        return tensors
    out = []
    for t in tensors:
        if not t.name.endswith("_exps"):
            out.append(t)
            continue
        layer, _, kind = t.name.rpartition(".")
        rows = t.rows // num_experts
        out += [TensorEntry(f"{layer}.experts.{e}.{kind.removesuffix('_exps')}", t.kind, rows, t.cols) for e in range(num_experts)]
    return out


def _read_hf(path: Path) -> tuple[ModelConfig, list[TensorEntry]]:
    config_path = path / "config.json"
    if not config_path.is_file():
        raise UnsupportedModelError(f"model directory '{path}' has no config.json")
    metadata = json.loads(config_path.read_text())
    config = ModelConfig.from_hf_config(metadata)
    prequant = PrequantConfig.from_hf(metadata)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise UnsupportedModelError(f"model directory '{path}' has no *.safetensors files")
    tensors = []
    for file in files:
        for key, info in _safetensors_header(file).items():
            name = hf_names(config.architecture).canonical(key)
            if not isinstance(info, dict) or "shape" not in info:  # e.g. __metadata__
                continue
            shape = info["shape"]
            if name is None and prequant is not None and (packed := packed_name(key)) and packed[1] == "qweight":
                rows, cols = prequant.weight_shape(shape)
                kind = f"int4g{prequant.engine_group_size(key, cols)}"
                tensors.append(TensorEntry(packed[0], "int4" if kind == f"int4g{GROUP}" else kind, rows, cols))
            if name is None:
                continue
            tensors.append(TensorEntry(name, "float", int(shape[0]), int(shape[1]) if len(shape) > 1 else 1))
    if not config.tie_word_embeddings and not any(t.name == "lm_head" for t in tensors):
        config = msgspec.structs.replace(config, tie_word_embeddings=True)  # as hf_loader decides
    return config, tensors


def _safetensors_header(file: Path) -> dict[str, object]:
    """The JSON header of a safetensors file: a little-endian u64 length, then the JSON."""
    try:
        with open(file, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            return json.loads(f.read(size))
    except (OSError, ValueError, struct.error) as exc:
        raise UnsupportedModelError(f"cannot read the safetensors header of '{file}': {exc}") from exc

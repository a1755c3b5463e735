"""An encoder model directory (or the catalogue's ``model.zip`` of one) → ``EncoderModel``.

A directory holds a Hugging Face ``config.json``, ``model.safetensors``, ``tokenizer.json`` and,
for a sentence-transformers model, ``modules.json`` (+ ``1_Pooling/config.json``) and
``sentence_bert_config.json`` (``max_seq_length``). A ``.zip`` of one (how the catalogue ships
all-MiniLM-L6-v2) is unpacked once beside itself, atomically, and the directory used from then on.

The model is built on the meta device and the safetensors weights assigned in place (mmap'd, no
copy for float32), the ``query``/``key``/``value`` matrices concatenated into one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tokenizers import Tokenizer
from torch import Tensor

from backends.engine.encoder.model import ClassificationHead, Encoder, EncoderConfig
from backends.engine.encoder.pooling import read_pipeline
from backends.engine.encoder.quant import quantize_linears
from backends.engine.encoder.runtime import EncoderModel
from gateway.errors import ConfigError

_MODEL_TYPES = {"bert": 0, "roberta": None, "xlm-roberta": None, "camembert": None}  # position offset (None: pad+1)
MODEL_TYPES = tuple(_MODEL_TYPES)  # the config.json model_types this loader reads
QUANTIZATIONS = ("none", "int8")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def resolve_dtype(dtype: str) -> str:
    """``"auto"``: bfloat16 where the CPU multiplies it natively (AVX-512 BF16 or AMX on x86, BF16
    on Arm), where it ran the encoder's matmuls 2.5-3.5x faster than float32; else float32 (an
    emulated bfloat16 matmul is slower than float32's)."""
    if dtype != "auto":
        return dtype
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "float32"
    flags = {flag for line in text.splitlines() if line.startswith(("flags", "Features")) for flag in line.split()}
    return "bfloat16" if flags & {"avx512_bf16", "amx_bf16", "bf16"} else "float32"


def unpack(path: Path) -> Path:
    """The model directory for ``path``: itself, or a ``.zip``'s contents unpacked beside it."""
    if path.is_dir():
        return path
    if path.suffix.lower() != ".zip":
        raise ConfigError(f"encoder model '{path}' is neither a model directory nor a .zip of one")
    target = path.with_suffix("")
    if (target / "config.json").is_file():
        return target
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=path.parent))
    try:
        with zipfile.ZipFile(path) as archive:
            archive.extractall(tmp)
        os.replace(tmp, target)  # atomic: a directory in place is always whole
    except FileExistsError:
        shutil.rmtree(tmp, ignore_errors=True)  # another process unpacked it first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def read_config(model_dir: Path) -> EncoderConfig:
    try:
        raw = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"encoder model '{model_dir}': cannot read config.json: {exc}") from exc
    model_type = raw.get("model_type", "")
    if model_type not in _MODEL_TYPES:
        raise ConfigError(
            f"encoder model '{model_dir}': model_type {model_type!r} is not supported "
            f"(supported: {', '.join(_MODEL_TYPES)})"
        )
    offset = _MODEL_TYPES[model_type]
    pad = int(raw.get("pad_token_id", 0) or 0)
    fields = {k: raw[k] for k in EncoderConfig.__struct_fields__ if k in raw}
    fields["model_type"] = model_type
    fields["pad_token_id"] = pad
    fields["position_offset"] = pad + 1 if offset is None else offset
    if any(str(a).endswith("ForSequenceClassification") for a in raw.get("architectures") or ()):
        fields["labels"] = _labels(raw, model_dir)
    return EncoderConfig(**fields)


def _labels(raw: dict[str, Any], model_dir: Path) -> tuple[str, ...]:
    """A classifier's labels in logit order: ``id2label``, else ``LABEL_i`` for ``num_labels``."""
    id2label = raw.get("id2label") or {}
    try:
        by_id = {int(k): str(v) for k, v in id2label.items()}
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"encoder model '{model_dir}': config.json id2label keys must be integers") from exc
    count = int(raw.get("num_labels") or len(by_id) or 2)
    return tuple(by_id.get(i, f"LABEL_{i}") for i in range(count))


def max_length(model_dir: Path, config: EncoderConfig) -> int:
    """The longest input in tokens: sentence-transformers' ``max_seq_length`` where the model
    sets one (what it was trained for, and where sentence-transformers truncates), else what the
    position table holds."""
    st_config = model_dir / "sentence_bert_config.json"
    limit = config.max_positions
    if st_config.is_file():
        value = json.loads(st_config.read_text(encoding="utf-8")).get("max_seq_length")
        if value:
            limit = min(limit, int(value))
    return limit


def load_tokenizer(model_dir: Path) -> Tokenizer:
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise ConfigError(f"encoder model '{model_dir}' has no tokenizer.json")
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.no_truncation()  # over-length is the backend's decision (400, or truncate = true)
    tokenizer.no_padding()
    return tokenizer


def load_encoder(path: Path, *, quantization: str = "none", dtype: str = "float32") -> EncoderModel:
    """Load ``path`` (a directory or a ``.zip`` of one) for serving; ``quantization`` ``"int8"``
    keeps the linear layers' weights int8 (``quant.py``); ``dtype`` ``"bfloat16"`` runs the
    layers' matmuls and attention in bfloat16 (``model.py``), ``"auto"`` where the CPU has it."""
    if quantization not in QUANTIZATIONS:
        raise ConfigError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, not {quantization!r}")
    dtype = resolve_dtype(dtype)
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be auto or one of {', '.join(DTYPES)}, not {dtype!r}")
    compute = DTYPES[dtype]
    model_dir = unpack(Path(path))
    config = read_config(model_dir)
    pooling = read_pipeline(model_dir)
    tokenizer = load_tokenizer(model_dir)
    with torch.device("meta"):
        encoder = Encoder(config)
    encoder.load_state_dict(_state_dict(model_dir, config), assign=True, strict=True)
    encoder.eval().requires_grad_(False)
    head = _head(model_dir, config) if config.labels else None
    if quantization == "int8":
        quantize_linears(encoder.layers, compute_dtype=compute)
    else:
        for layer in encoder.layers:
            for linear in (layer.qkv, layer.attn_out, layer.ffn_in, layer.ffn_out):
                linear.to(compute)
    return EncoderModel(
        encoder, tokenizer, pooling, max_length=max_length(model_dir, config), quantization=quantization, dtype=dtype,
        head=head,
    )  # fmt: skip


#: the classification head's weights by name: BERT (pooler + classifier), RoBERTa (classifier.dense + out_proj)
_HEAD_NAMES = (
    {"dense": "{p}pooler.dense", "out": "classifier"},
    {"dense": "classifier.dense", "out": "classifier.out_proj"},
)


def _head(model_dir: Path, config: EncoderConfig) -> ClassificationHead:
    """The sequence-classification head of a ``*ForSequenceClassification`` checkpoint, float32."""
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
        prefix = next((p for p in ("bert.", "roberta.", "") if f"{p}embeddings.word_embeddings.weight" in names), "")
        for layout in _HEAD_NAMES:
            places = {k: v.format(p=prefix) for k, v in layout.items()}
            if all(f"{place}.weight" in names for place in places.values()):
                head = ClassificationHead(config)
                state = {f"{k}.{kind}": f.get_tensor(f"{place}.{kind}").float() for k, place in places.items()
                         for kind in ("weight", "bias")}  # fmt: skip
                try:
                    head.load_state_dict(state, strict=True)
                except RuntimeError as exc:
                    raise ConfigError(f"encoder model '{model_dir}': its classification head does not fit: {exc}") from exc
                return head.eval().requires_grad_(False)
    raise ConfigError(
        f"encoder model '{model_dir}' is a sequence classifier (config.json architectures) but its weights have "
        f"no classification head (pooler.dense + classifier, or classifier.dense + classifier.out_proj)"
    )


def _state_dict(model_dir: Path, config: EncoderConfig) -> dict[str, Tensor]:
    weights = model_dir / "model.safetensors"
    if not weights.is_file():
        raise ConfigError(f"encoder model '{model_dir}' has no model.safetensors")
    with safe_open(str(weights), framework="pt") as f:
        names = set(f.keys())
        # BertModel saves bare names; BertForMaskedLM and friends prefix them ("bert.", "roberta.")
        prefix = next((p for p in ("", "bert.", "roberta.", "model.") if f"{p}embeddings.word_embeddings.weight" in names), None)
        if prefix is None:
            raise ConfigError(f"encoder model '{model_dir}': no BERT-style weights (embeddings.word_embeddings.weight)")

        def get(name: str) -> Tensor:
            return f.get_tensor(prefix + name).float()

        state: dict[str, Tensor] = {
            "word_embeddings.weight": get("embeddings.word_embeddings.weight"),
            "position_embeddings.weight": get("embeddings.position_embeddings.weight"),
            "embed_norm.weight": get("embeddings.LayerNorm.weight"),
            "embed_norm.bias": get("embeddings.LayerNorm.bias"),
        }
        if f"{prefix}embeddings.token_type_embeddings.weight" in names:
            state["token_type_embeddings.weight"] = get("embeddings.token_type_embeddings.weight")
        else:
            state["token_type_embeddings.weight"] = torch.zeros(max(config.type_vocab_size, 1), config.hidden_size)
        for i in range(config.num_hidden_layers):
            src, dst = f"encoder.layer.{i}.", f"layers.{i}."
            for kind in ("weight", "bias"):
                state[dst + f"qkv.{kind}"] = torch.cat(
                    [get(src + f"attention.self.{m}.{kind}") for m in ("query", "key", "value")]
                )
                state[dst + f"attn_out.{kind}"] = get(src + f"attention.output.dense.{kind}")
                state[dst + f"attn_norm.{kind}"] = get(src + f"attention.output.LayerNorm.{kind}")
                state[dst + f"ffn_in.{kind}"] = get(src + f"intermediate.dense.{kind}")
                state[dst + f"ffn_out.{kind}"] = get(src + f"output.dense.{kind}")
                state[dst + f"ffn_norm.{kind}"] = get(src + f"output.LayerNorm.{kind}")
    return state

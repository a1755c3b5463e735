"""Tokenizers for the engine: built from GGUF metadata, or loaded from a Hugging Face directory.

A GGUF file carries no ``tokenizer.json``; it stores the vocabulary under llama.cpp's keys
(``tokenizer.ggml.*``). We rebuild an HF ``tokenizers.Tokenizer`` from them:

- ``tokenizer.ggml.model = "gpt2"``: byte-level BPE from ``tokens`` + ``merges``; the split regex
  depends on ``tokenizer.ggml.pre`` (the vocabulary's merges were learned on text split that way).
- ``tokenizer.ggml.model = "llama"``: SentencePiece-style BPE. Merges are derived from the token
  scores, unknown bytes fall back to ``<0xNN>`` tokens, spaces are spelled ``▁`` and, with
  ``add_space_prefix``, one ``▁`` is prepended to the text.

The reference is what HF transformers builds from the same GGUF (``gguf_file=``) and, where the
two disagree, the model's own ``tokenizer.json``/llama.cpp:
- ``smollm``/``starcoder``-style vocabularies split digits one by one (their tokenizer.json
  does; transformers' GGUF conversion uses plain GPT-2 splitting, which tokenizes the same because
  those vocabularies have no multi-digit tokens).
- ``llama-bpe`` (Llama 3) sets ``ignore_merges``: a pre-token that is itself in the vocabulary is
  one token (Llama 3's tokenizer.json and llama.cpp both do this).
- ``add_space_prefix = false`` is honoured for SentencePiece vocabularies (llama.cpp does;
  transformers' conversion always prepends).

Control tokens (GGUF token type 3) become special added tokens: they are matched whole in text,
and skipped by ``decode(..., skip_special_tokens=True)``. User-defined tokens (type 4) are added
as non-special tokens.

No torch here.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import structlog
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors

from backends.engine.model.config import UnsupportedModelError

log = structlog.get_logger(__name__)

# GGUF token types (llama.cpp's llama_token_type).
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

# Token texts that end a turn or a document. Like llama.cpp, a special token with one of these
# texts stops generation even when the file names another token as EOS: SmolLM2 must stop on
# <|endoftext|> as well as on <|im_end|>, Llama 3 Instruct on <|eot_id|> and <|eom_id|>.
END_OF_GENERATION_TEXTS = frozenset(
    {
        "</s>",
        "<|endoftext|>",
        "<|im_end|>",
        "<|eot_id|>",
        "<|eom_id|>",
        "<|end_of_text|>",
        "<|end|>",
        "<end_of_turn>",
        "<|return|>",
        "<EOT>",
        "<｜end▁of▁sentence｜>",
    }
)

# Split regexes of byte-level vocabularies, keyed by ``tokenizer.ggml.pre``. These are the
# patterns the models' own tokenizer.json files use (llama.cpp lists the same ones).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_REGEX_SPLITS = {
    "llama-bpe": _LLAMA3_SPLIT,
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "falcon3": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
}
# GPT-2's own regex after splitting every digit apart (StarCoder-family vocabularies).
_DIGIT_SPLIT_PRES = frozenset({"smollm", "starcoder", "refact", "codeshell", "command-r"})
_GPT2_PRES = frozenset({"gpt2", "default", "gpt-2", ""})
_IGNORE_MERGES_PRES = frozenset({"llama-bpe", "llama3", "llama-v3"})


@cache
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable spelling of each byte, used by byte-level BPE vocabularies."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    spelling = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in spelling:
            spelling[b] = chr(256 + extra)
            extra += 1
    return spelling


@cache
def _unicode_to_byte() -> dict[str, int]:
    return {c: b for b, c in byte_to_unicode().items()}


class Tokenizer:
    """Our tokenizer: an HF ``tokenizers.Tokenizer`` plus the model facts the engine needs.

    ``encode(text, add_special_tokens=True)`` adds BOS/EOS as the model asks (a completion
    prompt); chat prompts rendered from a template already spell their special tokens, so
    encode them with ``add_special_tokens=False``. Special-token text in the input is always
    matched as the special token (as HF and llama.cpp's server do).
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token_id: int | None,
        eos_token_id: int | None,
        extra_eos_token_ids: Iterable[int] = (),
        chat_template: str | None = None,
        byte_encoding: str = "utf-8",
    ) -> None:
        """``byte_encoding`` says how a token's text maps to bytes: ``"byte_level"`` (GPT-2
        alphabet), ``"sentencepiece"`` (``▁`` is a space, ``<0xNN>`` is a byte) or ``"utf-8"``."""
        assert byte_encoding in ("byte_level", "sentencepiece", "utf-8")
        self.backend = backend
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.chat_template = chat_template
        self.byte_encoding = byte_encoding
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        added = backend.get_added_tokens_decoder()
        self.special_token_ids: frozenset[int] = frozenset(i for i, t in added.items() if t.special)
        eog = {i for i in self.special_token_ids if added[i].content in END_OF_GENERATION_TEXTS}
        eog.update(extra_eos_token_ids)
        if eos_token_id is not None:
            eog.add(eos_token_id)
        self.eos_token_ids: frozenset[int] = frozenset(eog)
        #: ``decode`` drops one leading space of its text (SentencePiece with a space prefix).
        spec = _decoder_spec(backend)
        self.strips_leading_space = '"Strip"' in spec or ('"Metaspace"' in spec and '"never"' not in spec)
        self._token_bytes: list[bytes] | None = None

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """From a ``.gguf`` file or a Hugging Face model directory."""
        path = Path(path)
        return cls.from_hf_dir(path) if path.is_dir() else cls.from_gguf(path)

    @classmethod
    def from_gguf(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Read the ``tokenizer.*`` metadata of a GGUF file and build from it.

        When the file is open anyway (the loader's ``GGUFReader``), pass its decoded metadata
        to ``from_gguf_metadata`` instead of reading the file twice.
        """
        return cls.from_gguf_metadata(read_gguf_metadata(path, prefix="tokenizer."))

    @classmethod
    def from_gguf_metadata(cls, metadata: Mapping[str, Any]) -> Tokenizer:
        """Build from GGUF metadata as plain values (``"tokenizer.ggml.tokens"`` -> list[str] …)."""
        kind = metadata.get("tokenizer.ggml.model")
        tokens: list[str] = list(metadata["tokenizer.ggml.tokens"])
        token_types = [int(k) for k in _array(metadata, "tokenizer.ggml.token_type", [TOKEN_NORMAL] * len(tokens))]
        if kind == "gpt2":
            backend = _byte_level_backend(metadata, tokens, token_types)
            byte_encoding = "byte_level"
            add_bos_default = False
        elif kind == "llama":
            backend = _sentencepiece_backend(metadata, tokens, token_types)
            byte_encoding = "sentencepiece"
            add_bos_default = True  # llama.cpp's default for SentencePiece vocabularies
        else:
            raise UnsupportedModelError(f"unsupported GGUF tokenizer model {kind!r} (supported: 'gpt2', 'llama')")

        bos = metadata.get("tokenizer.ggml.bos_token_id")
        eos = metadata.get("tokenizer.ggml.eos_token_id")
        add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", add_bos_default)) and bos is not None
        add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
        backend.post_processor = _post_processor(
            (tokens[bos], bos) if add_bos else None, (tokens[eos], eos) if add_eos else None
        )
        extra_eos = [
            metadata[key]
            for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
            if metadata.get(key) is not None
        ]
        return cls(
            backend,
            bos_token_id=bos,
            eos_token_id=eos,
            extra_eos_token_ids=extra_eos,
            chat_template=metadata.get("tokenizer.chat_template"),
            byte_encoding=byte_encoding,
        )

    @classmethod
    def from_hf_dir(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """From ``tokenizer.json`` (+ ``tokenizer_config.json``, ``generation_config.json``,
        ``chat_template.jinja``) in a Hugging Face model directory."""
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise UnsupportedModelError(
                f"model directory '{path}' has no tokenizer.json (a tokenizer.model alone is not supported)"
            )
        backend = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
        config = _read_json(path / "tokenizer_config.json")
        generation = _read_json(path / "generation_config.json")

        def token_id(value: Any) -> int | None:
            if isinstance(value, dict):
                value = value.get("content")
            return backend.token_to_id(value) if isinstance(value, str) else None

        bos = token_id(config.get("bos_token"))
        eos = token_id(config.get("eos_token"))
        if "add_bos_token" in config or "add_eos_token" in config:
            # transformers rebuilds the post-processor from these flags (Llama/Gemma tokenizers).
            add_bos, add_eos = bool(config.get("add_bos_token")), bool(config.get("add_eos_token"))
            backend.post_processor = _post_processor(
                (backend.id_to_token(bos), bos) if add_bos and bos is not None else None,
                (backend.id_to_token(eos), eos) if add_eos and eos is not None else None,
            )
        gen_eos = generation.get("eos_token_id")
        extra_eos = gen_eos if isinstance(gen_eos, list) else [gen_eos] if isinstance(gen_eos, int) else []
        if bos is None and isinstance(generation.get("bos_token_id"), int):
            bos = generation["bos_token_id"]
        if eos is None and extra_eos:
            eos = extra_eos[0]
        return cls(
            backend,
            bos_token_id=bos,
            eos_token_id=eos,
            extra_eos_token_ids=extra_eos,
            chat_template=_hf_chat_template(path, config),
            byte_encoding=_hf_byte_encoding(backend),
        )

    # -- use ----------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str:
        """The token as the vocabulary spells it (``Ġworld``, ``▁world``, ``<0x0A>``)."""
        token = self.backend.id_to_token(token_id)
        if token is None:
            raise IndexError(f"token id {token_id} is outside the vocabulary ({self.vocab_size})")
        return token

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes this token stands for in decoded text (a special token: its text).

        A token may hold part of a UTF-8 character; this is what logprob ``bytes`` report. An id
        past the vocabulary (a model's padded embedding rows) has no bytes.
        """
        table = self.token_bytes_table
        return table[token_id] if 0 <= token_id < len(table) else b""

    @property
    def token_bytes_table(self) -> Sequence[bytes]:
        """``token_bytes`` for every id, built once (for per-token loops)."""
        table = self._token_bytes
        if table is None:
            table = self._token_bytes = self._build_token_bytes()
        return table

    def token_text(self, token_id: int) -> str:
        """The token's text for logprobs: its bytes decoded, partial characters as U+FFFD."""
        return self.token_bytes(token_id).decode("utf-8", errors="replace")

    @property
    def bos_token(self) -> str:
        return self.id_to_token(self.bos_token_id) if self.bos_token_id is not None else ""

    @property
    def eos_token(self) -> str:
        return self.id_to_token(self.eos_token_id) if self.eos_token_id is not None else ""

    def _build_token_bytes(self) -> list[bytes]:
        # Mirrors the decoders (added tokens go through them too): joining these bytes and
        # decoding as UTF-8 gives ``decode`` (before a SentencePiece leading-space strip).
        vocab = self.backend.get_vocab(with_added_tokens=True)
        table = [b""] * max(self.vocab_size, max(vocab.values(), default=-1) + 1)
        to_byte = _unicode_to_byte()
        for token, index in vocab.items():
            if self.byte_encoding == "byte_level" and all(c in to_byte for c in token):
                table[index] = bytes(to_byte[c] for c in token)
            elif self.byte_encoding == "sentencepiece" and _is_byte_token(token):
                table[index] = bytes([int(token[3:5], 16)])
            elif self.byte_encoding == "sentencepiece":
                table[index] = token.replace("▁", " ").encode("utf-8")
            else:
                table[index] = token.encode("utf-8")
        return table


def _is_byte_token(token: str) -> bool:
    """SentencePiece's byte-fallback spelling ``<0xNN>``."""
    return len(token) == 6 and token.startswith("<0x") and token.endswith(">")


# -- GGUF metadata ---------------------------------------------------------------------------

# GGUF value types -> struct format (little-endian); 8 is a string, 9 an array.
_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_GGUF_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}


def read_gguf_metadata(path: str | os.PathLike[str], prefix: str = "") -> dict[str, Any]:
    """The key/values of a GGUF file whose key starts with ``prefix``, as Python values.

    Reads the header only (not the tensor table). ``gguf.GGUFReader`` builds a numpy view per
    array element, seconds for a 150k-token vocabulary; this walks the bytes once.
    """
    import mmap
    import struct

    import numpy as np

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            raise ValueError(f"'{path}' is not a GGUF file")
        version, _, kv_count = struct.unpack_from("<IQQ", buf, 4)
        if version not in (2, 3):
            raise ValueError(f"'{path}': unsupported GGUF version {version} (a big-endian file?)")
        pos = 24

        def string() -> str:
            nonlocal pos
            (size,) = struct.unpack_from("<Q", buf, pos)
            pos += 8 + size
            return buf[pos - size : pos].decode("utf-8", errors="replace")

        def value(kind: int, keep: bool) -> Any:
            nonlocal pos
            if kind == 8:
                return string()
            if kind == 9:
                item_kind, count = struct.unpack_from("<IQ", buf, pos)
                pos += 12
                if item_kind in _GGUF_NUMPY:
                    dtype = np.dtype(_GGUF_NUMPY[item_kind])
                    start, pos = pos, pos + dtype.itemsize * count
                    return np.frombuffer(buf, dtype, count, start).tolist() if keep else None
                return [value(item_kind, keep) for _ in range(count)]
            fmt = _GGUF_SCALARS[kind]
            (out,) = struct.unpack_from(fmt, buf, pos)
            pos += struct.calcsize(fmt)
            return out

        metadata: dict[str, Any] = {}
        for _ in range(kv_count):
            key = string()
            (kind,) = struct.unpack_from("<I", buf, pos)
            pos += 4
            keep = key.startswith(prefix)
            item = value(kind, keep)
            if keep:
                metadata[key] = item
        return metadata


# -- GGUF builders ---------------------------------------------------------------------------


def _array(metadata: Mapping[str, Any], key: str, default: list[Any]) -> Sequence[Any]:
    """A metadata array (a list or a numpy array), or ``default`` when absent."""
    value = metadata.get(key)
    return default if value is None else value


def _byte_level_backend(metadata: Mapping[str, Any], tokens: list[str], token_types: list[int]) -> tokenizers.Tokenizer:
    pre = str(metadata.get("tokenizer.ggml.pre") or "default")
    alphabet = set(byte_to_unicode().values())
    spelling = byte_to_unicode()
    # A token outside the byte alphabet (a mislabelled added token) is respelled from its UTF-8.
    vocab = {
        (t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))): i
        for i, t in enumerate(tokens)
    }
    merges = [tuple(m.split(" ", 1)) for m in _array(metadata, "tokenizer.ggml.merges", [])]
    backend = tokenizers.Tokenizer(
        models.BPE(vocab=vocab, merges=merges, ignore_merges=pre in _IGNORE_MERGES_PRES)
    )
    backend.normalizer = None
    backend.pre_tokenizer = _byte_level_pre_tokenizer(pre)
    backend.decoder = decoders.ByteLevel()
    # Control tokens spelled outside the byte alphabet are llama.cpp mislabels: not added, so
    # the vocabulary keeps the size the model's embedding expects.
    _add_gguf_tokens(backend, tokens, token_types, keep=lambda t: set(t) <= alphabet)
    return backend


def _byte_level_pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    if pre in _REGEX_SPLITS:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_REGEX_SPLITS[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    if pre in _DIGIT_SPLIT_PRES:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    if pre not in _GPT2_PRES:
        log.warning("tokenizer.unknown_pre_tokenizer", pre=pre, fallback="gpt2")
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _sentencepiece_backend(
    metadata: Mapping[str, Any], tokens: list[str], token_types: list[int]
) -> tokenizers.Tokenizer:
    scores = [float(x) for x in _array(metadata, "tokenizer.ggml.scores", [-float(i) for i in range(len(tokens))])]
    vocab = {t: i for i, t in enumerate(tokens)}
    unk_id = metadata.get("tokenizer.ggml.unknown_token_id")
    if unk_id is None:
        unk_id = next((i for i, k in enumerate(token_types) if k == TOKEN_UNKNOWN), None)
    mergeable = [
        (t, s) for t, s, k in zip(tokens, scores, token_types, strict=True) if k in (TOKEN_NORMAL, TOKEN_USER_DEFINED)
    ]
    backend = tokenizers.Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=_merges_from_scores(mergeable, vocab),
            unk_token=tokens[unk_id] if unk_id is not None else None,
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    add_space_prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
    backend.normalizer = None
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if add_space_prefix else "never", split=False
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    _add_gguf_tokens(backend, tokens, token_types, keep=lambda t: True)
    return backend


def _merges_from_scores(mergeable: list[tuple[str, float]], vocab: Mapping[str, int]) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece's highest-score-first pair merging.

    Every split of a token into two vocabulary pieces is a merge ranked by the token's score
    (higher first); ties keep vocabulary order.
    """
    ranked: list[tuple[float, int, int, str, str]] = []
    for token, score in mergeable:
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                ranked.append((-score, vocab[token], cut, left, right))
    ranked.sort()
    return [(left, right) for _, _, _, left, right in ranked]


def _add_gguf_tokens(backend: tokenizers.Tokenizer, tokens: list[str], token_types: list[int], *, keep) -> None:  # type: ignore[no-untyped-def]
    special = [
        AddedToken(t, special=True, normalized=False)
        for t, k in zip(tokens, token_types, strict=True)
        if k in (TOKEN_CONTROL, TOKEN_UNKNOWN) and keep(t)
    ]
    user = [
        AddedToken(t, special=False, normalized=False)
        for t, k in zip(tokens, token_types, strict=True)
        if k == TOKEN_USER_DEFINED and keep(t)
    ]
    if special:
        backend.add_special_tokens(special)
    if user:
        backend.add_tokens(user)


def _post_processor(bos: tuple[str, int] | None, eos: tuple[str, int] | None) -> processors.TemplateProcessing:
    single = ["$A"]
    pair = ["$A", "$B:1"]
    specials = []
    if bos is not None:
        single.insert(0, bos[0])
        pair.insert(0, bos[0])
        specials.append(bos)
    if eos is not None:
        single.append(eos[0])
        pair.append(eos[0])
        specials.append(eos)
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=list(dict(specials).items()))


# -- Hugging Face directories ----------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with path.open(encoding="utf-8") as f:
        value = json.load(f)
    return value if isinstance(value, dict) else {}


def _hf_chat_template(path: Path, config: Mapping[str, Any]) -> str | None:
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": "…"}, …]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is None:
        legacy = _read_json(path / "chat_template.json").get("chat_template")
        template = legacy if isinstance(legacy, str) else None
    return template if isinstance(template, str) else None


def _decoder_spec(backend: tokenizers.Tokenizer) -> str:
    """The decoder's JSON description ("" when there is none)."""
    decoder = backend.decoder
    return decoder.__getstate__().decode("utf-8") if decoder is not None else ""


def _hf_byte_encoding(backend: tokenizers.Tokenizer) -> str:
    spec = _decoder_spec(backend)
    if '"ByteLevel"' in spec:
        return "byte_level"
    if '"ByteFallback"' in spec or "▁" in spec or '"Metaspace"' in spec:
        return "sentencepiece"
    return "utf-8"

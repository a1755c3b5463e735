"""The vocabulary of a GGUF file as an HF ``tokenizers.Tokenizer``.

A GGUF file carries no ``tokenizer.json``; it stores the vocabulary under llama.cpp's keys
(``tokenizer.ggml.*``). ``gguf_vocabulary`` rebuilds a ``tokenizers.Tokenizer`` from them:

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

from collections.abc import Mapping, Sequence
from functools import cache
from typing import Any

import msgspec
import structlog
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors

from backends.engine.model.config import UnsupportedModelError

log = structlog.get_logger(__name__)

# GGUF token types (llama.cpp's llama_token_type).
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

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
def unicode_to_byte() -> dict[str, int]:
    """The inverse of ``byte_to_unicode``."""
    return {c: b for b, c in byte_to_unicode().items()}




class GGUFVocabulary(msgspec.Struct, frozen=True, kw_only=True):
    """What a GGUF file says about its tokenizer. ``byte_encoding``: see ``Tokenizer``."""

    backend: tokenizers.Tokenizer
    byte_encoding: str
    bos_token_id: int | None
    eos_token_id: int | None
    extra_eos_token_ids: tuple[int, ...]
    chat_template: str | None


def gguf_vocabulary(metadata: Mapping[str, Any]) -> GGUFVocabulary:
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
    backend.post_processor = post_processor(
        (tokens[bos], bos) if add_bos else None, (tokens[eos], eos) if add_eos else None
    )
    extra_eos = tuple(
        metadata[key]
        for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
        if metadata.get(key) is not None
    )
    return GGUFVocabulary(
        backend=backend,
        byte_encoding=byte_encoding,
        bos_token_id=bos,
        eos_token_id=eos,
        extra_eos_token_ids=extra_eos,
        chat_template=metadata.get("tokenizer.chat_template"),
    )


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


def post_processor(bos: tuple[str, int] | None, eos: tuple[str, int] | None) -> processors.TemplateProcessing:
    """Add ``bos`` before and ``eos`` after the text, each ``(token, id)`` or None."""
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

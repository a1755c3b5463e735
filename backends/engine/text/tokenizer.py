"""``Tokenizer``: the engine's tokenizer, built from GGUF metadata (``gguf_vocab``) or loaded from
a Hugging Face directory (``tokenizer.json`` and its companions).

No torch here.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import tokenizers

from backends.engine.model.config import UnsupportedModelError
from backends.engine.model.gguf_reader import read_gguf_metadata
from backends.engine.text.gguf_vocab import gguf_vocabulary, post_processor, unicode_to_byte

# The Rust tokenizer's rayon pool (one spinning worker per core) starved the event loop: five
# 100 kB prompts encoded on pooled threads held /health for 157 ms with it, 20 ms without, and
# took 3.3 s instead of 0.3 s on 2 cores. Each prompt is encoded on a thread of its own anyway.
# (Read by the library at each call; an explicit setting wins.)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

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


class TooManyTokens(Exception):
    """``encode_at_most``: the text has ``num_tokens`` tokens (``at_least``: at least that many),
    more than the limit."""

    def __init__(self, num_tokens: int, *, at_least: bool) -> None:
        super().__init__(f"{'at least ' if at_least else ''}{num_tokens} tokens")
        self.num_tokens = num_tokens
        self.at_least = at_least


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
        self._max_token_chars: int | None = None

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """From a ``.gguf`` file or a Hugging Face model directory."""
        path = Path(path)
        return cls.from_hf_dir(path) if path.is_dir() else cls.from_gguf(path)

    @classmethod
    def from_gguf(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Read the ``tokenizer.*`` metadata of a GGUF file and build from it.

        When the metadata is at hand anyway (the loader's ``GGUFSource.metadata``), pass it to
        ``from_gguf_metadata`` instead of reading the file twice.
        """
        return cls.from_gguf_metadata(read_gguf_metadata(path, prefix="tokenizer."))

    @classmethod
    def from_gguf_metadata(cls, metadata: Mapping[str, Any]) -> Tokenizer:
        """Build from GGUF metadata as plain values (``"tokenizer.ggml.tokens"`` -> list[str] …)."""
        vocab = gguf_vocabulary(metadata)
        return cls(
            vocab.backend,
            bos_token_id=vocab.bos_token_id,
            eos_token_id=vocab.eos_token_id,
            extra_eos_token_ids=vocab.extra_eos_token_ids,
            chat_template=vocab.chat_template,
            byte_encoding=vocab.byte_encoding,
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
            backend.post_processor = post_processor(
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

    def encode_at_most(self, text: str, max_tokens: int, add_special_tokens: bool = True) -> list[int]:
        """``encode(text)``, or ``TooManyTokens`` when it would be longer than ``max_tokens``.

        Made to run on a thread beside the event loop on prompts of megabytes. The Rust
        tokenizer's ``encode`` holds the GIL throughout (0.35 s for 300 k characters: every other
        thread stops); ``encode_batch`` releases it while it encodes. The ``Encoding`` it returns
        is still freed, and its ids listed, with the GIL held (~0.2 s for 4 M tokens), so a text
        that cannot fit (``min_tokens``) is refused before it is encoded, and a long one's ids are
        not listed past the count.
        """
        bound = self.min_tokens(text)
        if bound > max_tokens:
            raise TooManyTokens(bound, at_least=True)
        (encoding,) = self.backend.encode_batch([text], add_special_tokens=add_special_tokens)
        if len(encoding) > max_tokens:
            raise TooManyTokens(len(encoding), at_least=False)
        return encoding.ids

    def min_tokens(self, text: str) -> int:
        """A lower bound on ``len(encode(text))``: no token covers more characters than the
        longest token's bytes. 0 (no bound) where a normalizer may shorten the text or an unknown
        token may swallow a run of characters (WordPiece; BPE fusing unknowns without byte
        fallback)."""
        limit = self._max_token_chars
        if limit is None:
            model = self.backend.model
            boundable = (
                self.backend.normalizer is None
                and isinstance(model, tokenizers.models.BPE)
                and (model.byte_fallback or not model.fuse_unk)
            )
            limit = self._max_token_chars = max(map(len, self.token_bytes_table), default=0) if boundable else 0
        return -(-len(text) // limit) if limit > 0 else 0

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
        to_byte = unicode_to_byte()
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

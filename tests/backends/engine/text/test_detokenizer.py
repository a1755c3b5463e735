"""Incremental detokenisation (whole characters only, same text as ``decode``) and stop strings."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backends.engine.text.detokenizer import IncrementalDetokenizer, StopMatcher
from backends.engine.text.gguf_vocab import byte_to_unicode
from backends.engine.text.tokenizer import Tokenizer

# -- small in-memory vocabularies -------------------------------------------------------------

_TEXTS = [
    "Hello world", "  two  spaces", "naïve café", "日本語のテキスト", "😀 👨‍👩‍👧 🇫🇷", "Привет", "x = [1, 2]\n",
    "\tTabbed\r\n", "ｆｕｌｌ", "e\u0301", "மொழி", "END", "the end of the story",
]  # fmt: skip


def _byte_level() -> Tokenizer:
    """Byte-level BPE whose merges build tokens that end mid-character (é, 日, 😀 prefixes)."""
    spell = byte_to_unicode()
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [spell[b] for b in range(256)]
    merges: list[str] = []
    for word in ["Hello", " world", " café", "日本", "😀", "Привет", " the", " end"]:
        pieces = [spell[b] for b in word.encode()]
        while len(pieces) > 1:  # left-to-right merges: every prefix becomes a token
            merges.append(f"{pieces[0]} {pieces[1]}")
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
            if pieces[0] not in tokens:
                tokens.append(pieces[0])
    return Tokenizer.from_gguf_metadata(
        {
            "tokenizer.ggml.model": "gpt2",
            "tokenizer.ggml.pre": "gpt2",
            "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": [3, 3, 3] + [1] * (len(tokens) - 3),
            "tokenizer.ggml.merges": merges,
            "tokenizer.ggml.bos_token_id": 1,
            "tokenizer.ggml.eos_token_id": 2,
        }
    )


def _sentencepiece() -> Tokenizer:
    words = ["▁Hello", "▁world", "▁the", "▁end", "▁of", "▁story", "▁two", "▁spaces", "▁na", "ï", "ve", "▁caf", "é"]
    # Every prefix of a word and every single character: merges grow words left to right.
    pieces = sorted({w[:i] for w in words for i in range(1, len(w) + 1)} | {c for w in words for c in w}, key=len)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    return Tokenizer.from_gguf_metadata(
        {
            "tokenizer.ggml.model": "llama",
            "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": [2, 3, 3] + [6] * 256 + [1] * len(pieces),
            "tokenizer.ggml.scores": [0.0] * 259 + [-float(len(p)) for p in pieces],
            "tokenizer.ggml.bos_token_id": 1,
            "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.ggml.unknown_token_id": 0,
        }
    )


BYTE_LEVEL = _byte_level()
SENTENCEPIECE = _sentencepiece()
TOKENIZERS = pytest.mark.parametrize("tok", [BYTE_LEVEL, SENTENCEPIECE], ids=["byte_level", "sentencepiece"])


def _stream(tok: Tokenizer, ids: list[int], prompt: list[int] = (), **kwargs) -> list[str]:  # type: ignore[assignment]
    detok = IncrementalDetokenizer(tok, prompt, **kwargs)
    return [detok.add(i) for i in ids] + [detok.flush()]


# -- detokenizer --------------------------------------------------------------------------------


@TOKENIZERS
@pytest.mark.parametrize("text", _TEXTS)
def test_stream_equals_decode_and_holds_only_partial_characters(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text, add_special_tokens=False)
    pieces = _stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids) == (text[1:] if tok.strips_leading_space and text[0] == " " else text)
    assert "\ufffd" not in "".join(pieces)
    # After each token, everything whose bytes are complete has been emitted.
    raw = b""
    emitted = ""
    for i, piece in zip(ids, pieces, strict=False):
        raw += tok.token_bytes(i)
        emitted += piece
        whole = raw.decode("utf-8", errors="ignore")
        if tok.strips_leading_space and whole.startswith(" "):
            whole = whole[1:]
        assert emitted == whole


def test_byte_level_tokens_really_split_characters() -> None:
    ids = BYTE_LEVEL.encode("日本語😀", add_special_tokens=False)
    assert any(BYTE_LEVEL.token_bytes(i).decode("utf-8", "replace") != BYTE_LEVEL.token_bytes(i).decode("utf-8", "ignore") for i in ids)
    assert "" in _stream(BYTE_LEVEL, ids)[:-1]  # some token completed no character


@TOKENIZERS
def test_special_tokens_skipped_by_default(tok: Tokenizer) -> None:
    eos = tok.eos_token_id
    ids = tok.encode("Hello", add_special_tokens=False) + [eos]
    assert "".join(_stream(tok, ids)) == tok.decode(ids, skip_special_tokens=True)
    shown = "".join(_stream(tok, ids, skip_special_tokens=False))
    assert shown == tok.decode(ids, skip_special_tokens=False)
    assert shown.endswith(tok.eos_token)


@TOKENIZERS
@pytest.mark.parametrize("prompt_text", ["", "<bos>", "The prompt", "日本"])
@pytest.mark.parametrize("skip", [True, False])
def test_stream_continues_the_prompt_like_decode(tok: Tokenizer, prompt_text: str, skip: bool) -> None:
    """decode(prompt + generated) == decode(prompt) + streamed text (SentencePiece space rules)."""
    prompt = [tok.bos_token_id] if prompt_text == "<bos>" else tok.encode(prompt_text)
    for text in _TEXTS:
        gen = tok.encode(text, add_special_tokens=False)
        streamed = "".join(_stream(tok, gen, prompt, skip_special_tokens=skip))
        full = tok.decode(prompt + gen, skip_special_tokens=skip)
        assert tok.decode(prompt, skip_special_tokens=skip) + streamed == full, (prompt_text, text)


def test_sentencepiece_leading_space_rules() -> None:
    tok = SENTENCEPIECE
    hello = tok.encode("Hello", add_special_tokens=False)
    assert tok.id_to_token(hello[0]) == "▁Hello"
    assert "".join(_stream(tok, hello)) == "Hello"
    assert "".join(_stream(tok, hello, [tok.bos_token_id])) == "Hello"
    assert "".join(_stream(tok, hello, tok.encode("the end"))) == " Hello"
    assert "".join(_stream(tok, hello, [tok.bos_token_id], skip_special_tokens=False)) == " Hello"


def test_byte_fallback_characters_complete_across_tokens() -> None:
    tok = SENTENCEPIECE
    ids = tok.encode("▁日", add_special_tokens=False)  # ▁ then three <0xNN> byte tokens
    assert [tok.id_to_token(i) for i in ids][-3:] == ["<0xE6>", "<0x97>", "<0xA5>"]
    assert _stream(tok, ids[-3:], tok.encode("the")) == ["", "", "日", ""]


def test_ids_past_the_vocabulary_have_no_text() -> None:
    # Models pad their embeddings (e.g. Qwen2: 151,936 rows for 151,665 tokens).
    past = BYTE_LEVEL.vocab_size + 3
    assert BYTE_LEVEL.token_bytes(past) == b""
    assert _stream(BYTE_LEVEL, [*BYTE_LEVEL.encode("Hi", add_special_tokens=False), past]) == ["H", "i", "", ""]


def test_incomplete_character_at_the_end_becomes_replacement() -> None:
    lone = BYTE_LEVEL.backend.token_to_id(byte_to_unicode()[0xE6])  # first byte of 日
    assert _stream(BYTE_LEVEL, [lone]) == ["", "\ufffd"]
    assert _stream(BYTE_LEVEL, [lone, lone]) == ["", "\ufffd", "\ufffd"]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, BYTE_LEVEL.vocab_size - 1), max_size=40))
def test_random_byte_level_ids_match_lossy_decode(ids: list[int]) -> None:
    assert "".join(_stream(BYTE_LEVEL, ids)) == BYTE_LEVEL.decode(ids)


@pytest.mark.slow
def test_real_model_stream_matches_decode(smollm2_path) -> None:  # type: ignore[no-untyped-def]
    tok = Tokenizer.from_gguf(smollm2_path)
    rng = random.Random(5)
    for _ in range(300):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 30))]
        assert "".join(_stream(tok, ids)) == tok.decode(ids)
        assert "".join(_stream(tok, ids, skip_special_tokens=False)) == tok.decode(ids, skip_special_tokens=False)
    text = "Grüße 👋🏽 — 東京タワー is 333 m tall.\n"
    ids = tok.encode(text)
    assert "".join(_stream(tok, ids)) == text


# -- stop strings -----------------------------------------------------------------------------


def _run(stops: list[str], chunks: list[str]) -> tuple[list[str], bool, str]:
    matcher = StopMatcher(stops)
    out = []
    stopped = False
    for chunk in chunks:
        text, stopped = matcher.feed(chunk)
        out.append(text)
        if stopped:
            break
    tail = matcher.flush()
    return out, stopped, tail


def test_stop_inside_one_chunk() -> None:
    assert _run(["END"], ["Hello END world"]) == (["Hello "], True, "")


def test_stop_across_chunks_holds_only_possible_prefixes() -> None:
    out, stopped, tail = _run(["END"], ["Hel", "lo E", "N", "D more"])
    assert out == ["Hel", "lo ", "", ""] and stopped and tail == ""
    out, stopped, tail = _run(["END"], ["Hello E", "Nx", "!"])
    assert out == ["Hello ", "ENx", "!"] and not stopped and tail == ""
    out, stopped, tail = _run(["END"], ["the E"])
    assert out == ["the "] and tail == "E"  # released at the end of the stream


def test_earliest_stop_wins_and_stops_can_overlap() -> None:
    assert _run(["ab", "b"], ["xab"])[0] == ["x"]
    # "b" completes first: generation stops there, before "abc" could complete.
    assert _run(["b", "abc"], ["a", "b", "c"])[0] == ["", "a"]
    assert _run(["bc", "abcd"], ["ab", "cd"])[0] == ["", ""]
    matcher = StopMatcher(["\n\n", "User:"])
    assert matcher.feed("Sure.\n") == ("Sure.", False)
    assert matcher.feed("\nUser: hi") == ("", True)
    assert matcher.matched == "\n\n"
    assert matcher.feed("more") == ("", True)


def test_no_stops_passes_through() -> None:
    matcher = StopMatcher(["", ""])
    assert matcher.feed("anything") == ("anything", False)
    assert matcher.flush() == ""


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.text(alphabet="abc\n", min_size=1, max_size=3), min_size=1, max_size=3),
    st.lists(st.text(alphabet="abc\n", max_size=6), max_size=12),
)
def test_stop_matcher_properties(stops: list[str], chunks: list[str]) -> None:
    # Generation stops at the first chunk (token) that completes a stop string; the text is cut
    # where the earliest stop occurrence then starts.
    expected = "".join(chunks)
    seen = ""
    for chunk in chunks:
        seen += chunk
        hits = [seen.find(s) for s in stops if s in seen]
        if hits:
            expected = seen[: min(hits)]
            break
    matcher = StopMatcher(stops)
    seen, emitted = "", ""
    for chunk in chunks:
        piece, stopped = matcher.feed(chunk)
        seen += chunk
        emitted += piece
        assert expected.startswith(emitted)
        if stopped:
            break
        # Held back: exactly the longest suffix that could still grow into a stop string.
        held = len(seen) - len(emitted)
        could = [k for k in range(1, len(seen) + 1) if any(len(s) > k and s.startswith(seen[-k:]) for s in stops)]
        assert held == max(could, default=0)
    emitted += matcher.flush()
    assert emitted == expected


def test_detokenizer_and_stop_strings_together() -> None:
    tok = BYTE_LEVEL
    ids = tok.encode("Hello 日本 the end", add_special_tokens=False)
    detok, matcher = IncrementalDetokenizer(tok), StopMatcher(["本 the"])
    out = ""
    for i in ids:
        text, stopped = matcher.feed(detok.add(i))
        out += text
        if stopped:
            break
    assert stopped and out == "Hello 日"

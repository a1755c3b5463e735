"""Streaming detokenisation and stop strings, one token at a time.

Both run in the engine's hot loop for every sequence, so each step is a few dictionary/list
lookups and short string operations — no re-decoding of the text so far.

``IncrementalDetokenizer`` turns token ids into text that only ever holds whole characters: a
token's bytes (``Tokenizer.token_bytes``) go through an incremental UTF-8 decoder, which keeps an
incomplete character (a byte-level BPE token or ``<0xNN>`` byte tokens can end mid-character)
until the bytes that complete it arrive. The concatenated output equals ``Tokenizer.decode`` of
the same ids for any ids that decode to valid UTF-8. For invalid byte sequences both give U+FFFD,
but not always the same number of them: ``decode`` of SentencePiece byte tokens writes one per
byte of an invalid run, we write one per maximal invalid subpart (as Python and Rust's lossy
UTF-8 decoding do).

``StopMatcher`` stops at the first fed chunk (a token's text) that completes any stop string,
across token boundaries, and cuts the text where the earliest complete stop occurrence starts;
the stop string is not emitted, and text is held back only while it could still be the
beginning of a stop string.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable, Sequence

from backends.engine.text.tokenizer import Tokenizer


class IncrementalDetokenizer:
    """Text for one sequence's generated tokens.

    ``prompt_ids`` give the context: with a SentencePiece vocabulary that prepends a space,
    ``decode`` drops the leading space of a text, so a first generated token ``▁Hello`` is
    ``"Hello"`` after an empty prompt (or one of only skipped special tokens) but ``" Hello"``
    after a prompt with text.
    """

    __slots__ = ("_table", "_skip", "_decoder", "_strip_next")

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: Iterable[int] = (),
        *,
        skip_special_tokens: bool = True,
    ) -> None:
        self._table = tokenizer.token_bytes_table
        self._skip = tokenizer.special_token_ids if skip_special_tokens else frozenset()
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        # Whether the next non-empty text is the start of the decoded text (strip one space).
        self._strip_next = tokenizer.strips_leading_space and all(
            i in self._skip or not self._table[i] for i in prompt_ids
        )

    def add(self, token_id: int) -> str:
        """Append one token; return the text it completes (possibly "")."""
        if token_id in self._skip:
            return ""
        try:
            raw = self._table[token_id]
        except IndexError:  # a padded embedding row past the vocabulary: no text
            return ""
        text = self._decoder.decode(raw)
        if self._strip_next and text:
            self._strip_next = False
            if text[0] == " ":
                return text[1:]
        return text

    def add_many(self, token_ids: Iterable[int]) -> str:
        return "".join([self.add(i) for i in token_ids])

    def flush(self) -> str:
        """End of sequence: an incomplete trailing character becomes U+FFFD."""
        text = self._decoder.decode(b"", final=True)
        if self._strip_next and text:
            self._strip_next = False
        return text


class StopMatcher:
    """Cuts a stream of text at the first occurrence of any of ``stops``.

    ``feed(text)`` returns ``(text_to_emit, stopped)``. Once stopped, the text from the stop
    string on is dropped and further input is ignored; ``matched`` names the stop string.
    """

    __slots__ = ("_stops", "_first_chars", "_held", "stopped", "matched")

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(dict.fromkeys(s for s in stops if s))  # deduplicated, order kept
        self._first_chars = frozenset(s[0] for s in self._stops)
        self._held = ""
        self.stopped = False
        self.matched: str | None = None

    def feed(self, text: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        if not self._held and not any(c in text for c in self._first_chars):
            return text, False  # fast path: no stop can start in this text
        buf = self._held + text
        # The earliest stop occurrence wins (OpenAI: the text up to the first stop).
        cut, matched = -1, None
        for stop in self._stops:
            at = buf.find(stop)
            if at != -1 and (cut == -1 or at < cut):
                cut, matched = at, stop
        if matched is not None:
            self._held = ""
            self.stopped, self.matched = True, matched
            return buf[:cut], True
        hold = self._partial_stop_len(buf)
        self._held = buf[len(buf) - hold :]
        return buf[: len(buf) - hold], False

    def flush(self) -> str:
        """End of stream without a stop: release the held-back text."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _partial_stop_len(self, buf: str) -> int:
        """Length of the longest suffix of ``buf`` that is a proper prefix of a stop string."""
        best = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(buf)), best, -1):
                if buf.endswith(stop[:k]):
                    best = k
                    break
        return best

"""``GrammarCompiler``: a request's ``StructuredOutput`` → an llguidance grammar over the model's
vocabulary, checked at admission (a schema feature llguidance cannot enforce is a 400 naming it).

Why llguidance, not xgrammar: on SmolLM2's 49,152-token vocabulary its mask costs about the
same per token and it compiles a schema far faster (scripts/grammar_cost.py; the figures are in
docs/benchmarks.md), it rejects the keywords it cannot enforce by name ("Unimplemented keys:
["uniqueItems"]") instead of ignoring them, and it takes our tokenizer as plain token bytes.

JSON is compiled compact (no free whitespace between tokens, ", " and ": " as separators): with
flexible whitespace a small model may emit newlines until ``max_tokens``.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from gateway.errors import InvalidRequestError
from gateway.interface import StructuredOutput

if TYPE_CHECKING:
    import llguidance

    from backends.engine.text.tokenizer import Tokenizer

#: llguidance's JSON compiler options: compact JSON, the separators models write.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
#: compiled grammars kept (by schema text); a matcher is a deep copy of the cached one
MAX_CACHED = 256


class _TokenizerView:
    """What ``llguidance.TokenizerWrapper`` reads of a tokenizer: token bytes, EOS, an encoder.

    A special token's bytes start with 0xFF (llguidance's convention, never valid UTF-8): as
    plain text ``<|im_end|>`` would be allowed inside a JSON string, and end the output there.
    """

    def __init__(self, tokenizer: Tokenizer, vocab_size: int) -> None:
        table = tokenizer.token_bytes_table
        special = tokenizer.special_token_ids | tokenizer.eos_token_ids
        self.tokens = [
            (b"\xff" + table[i] if i in special else table[i]) if i < len(table) else b"" for i in range(vocab_size)
        ]
        self.eos_token_id = tokenizer.eos_token_id
        self.bos_token_id = tokenizer.bos_token_id
        self.special_token_ids = sorted(special)
        self._tokenizer = tokenizer

    def __call__(self, text: bytes) -> list[int]:
        return self._tokenizer.encode(text.decode("utf-8", errors="replace"), add_special_tokens=False)


class GrammarCompiler:
    """Compiles and caches grammars for one tokenizer; thread-safe (the event loop checks
    requests, the step thread makes matchers). The llguidance tokenizer is built on first use
    (~0.15 s for SmolLM2)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._lltokenizer: llguidance.LLTokenizer | None = None
        self._cache: OrderedDict[tuple[str, tuple[str, str] | None, bool], llguidance.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def lltokenizer(self) -> llguidance.LLTokenizer:
        if self._lltokenizer is None:
            import llguidance

            view = _TokenizerView(self.tokenizer, self.vocab_size)
            self._lltokenizer = llguidance.LLTokenizer(
                llguidance.TokenizerWrapper(view), n_vocab=self.vocab_size, eos_token=sorted(self.tokenizer.eos_token_ids)
            )
        return self._lltokenizer

    def json_schema(self, schema: dict[str, Any] | str, *, param: str) -> str:
        """The grammar of JSON valid against ``schema``; ``InvalidRequestError`` naming ``param``
        and what llguidance cannot enforce."""
        import llguidance

        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
        except ValueError as exc:
            raise InvalidRequestError(f"'{param}' is not a valid JSON schema: {exc}", param=param) from None
        self._validate(grammar, param)
        return grammar

    def structured(self, spec: StructuredOutput) -> str:
        """The grammar of ``spec``: its schema, or its schema's values between ``spec.wrap``."""
        if spec.wrap is None:
            return self.json_schema(spec.json_schema, param=spec.param)
        import llguidance

        self.json_schema(spec.json_schema, param=spec.param)  # its own errors name the schema
        open_, close = (json.dumps(part) for part in spec.wrap)
        repeat = ' ("\\n" item)*' if spec.multiple else ""
        schema = {**json.loads(spec.json_schema), "x-guidance": JSON_OPTIONS}  # the options inside lark
        lark = f"start: item{repeat}\nitem: {open_} value {close}\nvalue: %json {json.dumps(schema)}\n"
        grammar = llguidance.LLMatcher.grammar_from_lark(lark)
        self._validate(grammar, spec.param)
        return grammar

    def check(self, spec: StructuredOutput) -> None:
        """Raise the 400 ``spec`` gets if its grammar cannot be enforced; caches the grammar."""
        self.matcher(spec)

    def matcher(self, spec: StructuredOutput) -> llguidance.LLMatcher:
        """A fresh matcher at the start of ``spec``'s grammar (a copy of a cached one)."""
        import llguidance

        key = (spec.json_schema, spec.wrap, spec.multiple)
        with self._lock:
            proto = self._cache.get(key)
            if proto is not None:
                self._cache.move_to_end(key)
                return proto.deep_copy()
        grammar = self.structured(spec)
        proto = llguidance.LLMatcher(self.lltokenizer, grammar, log_level=0)
        if proto.is_error():
            raise InvalidRequestError(
                f"'{spec.param}' cannot be enforced: {proto.get_error()}", param=spec.param
            )
        with self._lock:
            self._cache[key] = proto
            while len(self._cache) > MAX_CACHED:
                self._cache.popitem(last=False)
        return proto.deep_copy()

    def _validate(self, grammar: str, param: str) -> None:
        import llguidance

        error = llguidance.LLMatcher.validate_grammar(grammar, self.lltokenizer)
        if error:
            raise InvalidRequestError(f"'{param}' uses what constrained decoding cannot enforce: {error}", param=param)

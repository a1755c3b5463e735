"""CPU cost per token of a grammar library's token mask on SmolLM2's vocabulary: llguidance vs
xgrammar, on two JSON schemas. Why the engine constrains with llguidance (docs/benchmarks.md).

    .venv/bin/python scripts/grammar_cost.py            # llguidance only
    PYTHONPATH=/tmp/xgr_site .venv/bin/python scripts/grammar_cost.py   # and xgrammar, where importable

Each schema: compile once (timed), then walk a valid document's tokens, timing mask + advance per
token (the work the sampler's step adds per constrained row). A tool, not product.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SCHEMAS = {
    "person": (
        {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "age": {"type": "integer", "minimum": 0},
                "email": {"type": "string"},
                "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
            },
            "required": ["name", "age", "email", "tags"],
            "additionalProperties": False,
        },
        {"name": "Ada Lovelace", "age": 36, "email": "ada@example.com", "tags": ["math", "poetry", "engines"]},
    ),
    "order": (
        {
            "type": "object",
            "properties": {
                "id": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
                "status": {"enum": ["open", "shipped", "delivered"]},
                "items": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {"sku": {"type": "string"}, "qty": {"type": "integer"}, "price": {"type": "number"}},
                        "required": ["sku", "qty", "price"],
                        "additionalProperties": False,
                    },
                },
                "note": {"anyOf": [{"type": "string"}, {"type": "null"}]},
            },
            "required": ["id", "status", "items", "note"],
            "additionalProperties": False,
        },
        {
            "id": "ABC-1234",
            "status": "shipped",
            "items": [{"sku": "kettle", "qty": 2, "price": 19.99}, {"sku": "mug", "qty": 6, "price": 4.5}],
            "note": None,
        },
    ),
}


def main() -> None:
    import torch

    from backends.engine.catalogue import default_home, pull
    from backends.engine.text.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_gguf(pull("smollm2-135m-instruct", home=default_home(os.environ), progress=False))
    print(f"vocabulary: {tokenizer.vocab_size} tokens; torch threads {torch.get_num_threads()}")
    for name, (schema, doc) in SCHEMAS.items():
        ids = tokenizer.encode(json.dumps(doc), add_special_tokens=False)
        _llguidance(tokenizer, name, schema, ids)
        _xgrammar(tokenizer, name, schema, ids)


def _report(lib: str, name: str, compile_s: float, per_token: list[float]) -> None:
    print(
        f"{lib:10s} {name:7s} compile {compile_s * 1e3:7.1f} ms   mask+advance per token: "
        f"mean {statistics.mean(per_token) * 1e6:6.0f} us  median {statistics.median(per_token) * 1e6:6.0f} us  "
        f"max {max(per_token) * 1e6:6.0f} us  ({len(per_token)} tokens)"
    )


def _llguidance(tokenizer, name, schema, ids) -> None:  # type: ignore[no-untyped-def]
    from backends.engine.structured.grammar import GrammarCompiler
    from gateway.interface import StructuredOutput

    compiler = GrammarCompiler(tokenizer, len(tokenizer.token_bytes_table))
    compiler.lltokenizer  # built once per engine, not per schema
    t0 = time.perf_counter()
    matcher = compiler.matcher(StructuredOutput(json_schema=json.dumps(schema)))
    compile_s = time.perf_counter() - t0
    import llguidance.torch as lt

    bitmask = lt.allocate_token_bitmask(1, compiler.vocab_size)
    times = []
    for token in ids:
        t0 = time.perf_counter()
        lt.fill_next_token_bitmask(matcher, bitmask, 0)
        assert matcher.consume_token(token), matcher.get_error()
        times.append(time.perf_counter() - t0)
    _report("llguidance", name, compile_s, times)


def _xgrammar(tokenizer, name, schema, ids) -> None:  # type: ignore[no-untyped-def]
    try:
        import xgrammar as xgr
    except ImportError:
        print("xgrammar   not importable here (pip install xgrammar --no-deps into a side directory)")
        return
    info = xgr.TokenizerInfo(
        list(tokenizer.token_bytes_table), vocab_type=xgr.VocabType.RAW, vocab_size=len(tokenizer.token_bytes_table),
        stop_token_ids=sorted(tokenizer.eos_token_ids),
    )
    compiler = xgr.GrammarCompiler(info, cache_enabled=False)
    t0 = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)
    matcher = xgr.GrammarMatcher(compiled)
    compile_s = time.perf_counter() - t0
    bitmask = xgr.allocate_token_bitmask(1, info.vocab_size)
    times = []
    for token in ids:
        t0 = time.perf_counter()
        matcher.fill_next_token_bitmask(bitmask, 0)
        assert matcher.accept_token(token)
        times.append(time.perf_counter() - t0)
    _report("xgrammar", name, compile_s, times)


if __name__ == "__main__":
    main()

"""Constrained decoding on the real default model: 200 random schemas, every completed output
valid; constrained and free rows sharing steps give each what it gets alone; ``max_tokens`` ends
a constrained output with ``length`` and the text so far."""

from __future__ import annotations

import json

import jsonschema
import pytest

from backends.engine.builder import EngineOptions, build_engine
from backends.engine.text.chat_template import ChatTemplate
from gateway.errors import InvalidRequestError
from gateway.interface import ChatMessage, Delta, SamplingParams, StructuredOutput
from tests.backends.engine.structured.schemas import random_schemas

pytestmark = pytest.mark.slow

FREE_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three colors.",
    "Say hello in French.",
    "Why is the sky blue?",
    "What does a CPU do?",
    "How many legs does a spider have?",
    "Tell me a fun fact about octopuses.",
]
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


def _engine(path, **overrides):  # type: ignore[no-untyped-def]
    options = dict(model=str(path), threads=2, max_num_seqs=16, max_num_batched_tokens=256, kv_cache_tokens=8192)
    options.update(overrides)
    return build_engine(EngineOptions(**options))


def _prompt_ids(engine, text: str) -> list[int]:  # type: ignore[no-untyped-def]
    prompt = ChatTemplate.from_tokenizer(engine.tokenizer).render([ChatMessage(role="user", content=text)])
    return engine.tokenizer.encode(prompt, add_special_tokens=False)


def _run(engine, requests):  # type: ignore[no-untyped-def]
    """``{id: (text, finish_reason, token_ids)}`` for ``{id: (prompt_ids, params)}`` run together."""
    for request_id, (ids, params) in requests.items():
        engine.check_request(len(ids), params, param="messages")
        engine.add_request(request_id, ids, params)
    text = {r: "" for r in requests}
    tokens: dict[str, list[int]] = {r: [] for r in requests}
    finish: dict[str, str] = {}
    while engine.has_unfinished():
        for output in engine.step():
            for item in output.items:
                if isinstance(item, Delta):
                    text[output.request_id] += item.text
                    tokens[output.request_id].extend(item.token_ids)
                    if item.finish_reason:
                        finish[output.request_id] = item.finish_reason
    return {r: (text[r], finish[r], tokens[r]) for r in requests}


def _schema(schema: dict) -> StructuredOutput:  # type: ignore[type-arg]
    return StructuredOutput(json_schema=json.dumps(schema))


def test_random_schemas_validate(smollm2_path) -> None:  # type: ignore[no-untyped-def]
    """200 random schemas in one batch (64 at a time, sampled at temperature 0.7): every output
    that completes parses and validates with ``jsonschema``; most complete within 64 tokens.
    One short prompt for all (its prefix cached): the grammar alone carries each schema."""
    engine = _engine(smollm2_path, max_num_seqs=64, kv_cache_tokens=8192, max_waiting=256)
    schemas = random_schemas(200)
    ids = _prompt_ids(engine, "Reply with a short JSON value.")
    requests = {}
    for i, schema in enumerate(schemas):
        params = SamplingParams(max_tokens=64, temperature=0.7, seed=i, structured=_schema(schema))
        requests[f"s{i}"] = (ids, params)
    results = _run(engine, requests)
    completed = 0
    for i, schema in enumerate(schemas):
        text, finish, _ = results[f"s{i}"]
        if finish == "length":
            continue
        assert finish == "stop", (i, finish)
        value = json.loads(text)
        jsonschema.validate(value, schema)
        completed += 1
    assert completed >= 150, f"only {completed} of 200 completed within 64 tokens"


def test_mixed_batch_matches_alone(smollm2_path) -> None:  # type: ignore[no-untyped-def]
    """8 constrained + 8 free greedy requests sharing steps: each gets the tokens it gets alone
    (float32 activations, the engine's exact mode, as tests/backends/engine/test_engine.py)."""
    engine = _engine(smollm2_path, dtype="float32", max_num_batched_tokens=64, kv_cache_tokens=4096)
    requests = {}
    for i, text in enumerate(FREE_PROMPTS):
        requests[f"free{i}"] = (_prompt_ids(engine, text), SamplingParams(max_tokens=16, temperature=0))
        ask = f"Describe a person who likes this as JSON: {text}"
        params = SamplingParams(max_tokens=16, temperature=0, structured=_schema(PERSON))
        requests[f"json{i}"] = (_prompt_ids(engine, ask), params)
    together = _run(engine, requests)
    for request_id, request in requests.items():
        alone = _run(engine, {request_id: request})[request_id]
        assert together[request_id] == alone, request_id
    for i in range(8):
        text, finish, _ = together[f"json{i}"]
        if finish == "stop":
            jsonschema.validate(json.loads(text), PERSON)
    # the constraint did something: free answers to the same prompts are not JSON
    assert all(not together[f"free{i}"][0].startswith("{") for i in range(8))


@pytest.fixture(scope="module")
def engine(smollm2_path):  # type: ignore[no-untyped-def]
    return _engine(smollm2_path)


def test_length_is_not_success(engine) -> None:  # type: ignore[no-untyped-def]
    schema = {"type": "object", "properties": {"story": {"type": "string"}}, "required": ["story"]}
    ids = _prompt_ids(engine, "Tell me a long story as JSON.")
    text, finish, tokens = _run(engine, {"r": (ids, SamplingParams(max_tokens=5, temperature=0, structured=_schema(schema)))})["r"]
    assert finish == "length" and len(tokens) == 5
    assert text == engine.tokenizer.decode(tokens) and text.startswith('{"story": ')
    with pytest.raises(ValueError):
        json.loads(text)


def test_unsupported_schema_is_a_400(engine) -> None:  # type: ignore[no-untyped-def]
    for schema, keyword in (({"type": "array", "uniqueItems": True}, "uniqueItems"), ({"not": {"type": "string"}}, "not")):
        spec = StructuredOutput(json_schema=json.dumps(schema), param="response_format.json_schema.schema")
        with pytest.raises(InvalidRequestError) as info:
            engine.check_request(10, SamplingParams(structured=spec), param="messages")
        assert info.value.param == "response_format.json_schema.schema"
        assert keyword in info.value.message

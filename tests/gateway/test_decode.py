"""``normalize.decode`` and ``nesting.check_depth``: every way a body can be wrong is a 400 naming
the field or the byte, never an exception that escapes (a ``RecursionError`` was a 500)."""

from __future__ import annotations

import json

import msgspec
import pytest

from gateway import normalize, wire
from gateway.errors import InvalidRequestError
from gateway.nesting import MAX_JSON_DEPTH, TooDeep, check_depth

CHAT = msgspec.json.Decoder(wire.ChatCompletionRequest)
COMPLETION = msgspec.json.Decoder(wire.CompletionRequest)
_BASE = '{"model":"m","messages":[{"role":"user","content":"hi"}]'


def _deep(depth: int, open_: str = "[", close: str = "]") -> str:
    return open_ * depth + close * depth


def _error(body: bytes, decoder: msgspec.json.Decoder = CHAT) -> InvalidRequestError:  # type: ignore[type-arg]
    with pytest.raises(InvalidRequestError) as info:
        normalize.decode(body, decoder)
    assert info.value.status_code == 400
    return info.value


@pytest.mark.parametrize("field", ["tools", "metadata", "some_unknown_field", "response_format"])
@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 1000, 100_000])
def test_deep_json_anywhere_is_a_400_naming_the_field(field: str, depth: int) -> None:
    body = f'{_BASE},"{field}":{_deep(depth)}}}'.encode()
    error = _error(body)
    assert error.param == field and error.code == "json_too_deep"
    offset = body.index(b"[[")
    assert f"'{field}' nests deeper than {MAX_JSON_DEPTH} levels" in error.message
    assert f"(at byte {offset + MAX_JSON_DEPTH - 1})" in error.message  # the body itself is level 1


def test_deep_objects_in_messages_name_messages() -> None:
    inner = '{"a":' * 2000 + "1" + "}" * 2000
    error = _error(f'{{"model":"m","messages":[{{"role":"user","content":{inner}}}]}}'.encode())
    assert error.param == "messages"


def test_depth_at_the_limit_decodes() -> None:
    # MAX_JSON_DEPTH levels in all: the body object itself is the first
    req = normalize.decode(f'{_BASE},"metadata":{_deep(MAX_JSON_DEPTH - 1)}}}'.encode(), CHAT)
    assert req.model == "m"


def test_brackets_inside_strings_do_not_count() -> None:
    text = json.dumps("[" * 5000 + '\\"{' * 500)
    req = normalize.decode(f'{{"model":"m","prompt":{text}}}'.encode(), COMPLETION)
    assert req.prompt.startswith("[[[")
    check_depth(f'{{"a":{text},"b":[[1]]}}'.encode())


def test_a_top_level_array_has_no_field() -> None:
    with pytest.raises(TooDeep) as info:
        check_depth(_deep(MAX_JSON_DEPTH + 1).encode())
    assert info.value.field == "" and info.value.offset == MAX_JSON_DEPTH


def test_invalid_utf8_names_the_byte() -> None:
    body = _BASE.encode()[:-3] + b'\xff"}]}'  # in the content string
    offset = body.index(b"\xff")
    assert _error(body).message == f"The request body is not valid JSON: invalid UTF-8 at byte {offset}"


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ('"temperature":1e400', "temperature"),  # a float past float64
        ('"logit_bias":{"1":-1e999}', "logit_bias"),
        ('"stream_options":{"include_usage":"yes"}', "stream_options.include_usage"),  # wrong type, one level down
        ('"messages":[{"role":"user","content":[{"type":"text","text":"a"},{"type":7}]}]', "messages[0].content"),
    ],
)
def test_wrong_values_at_any_depth_name_the_field(extra: str, param: str) -> None:
    error = _error(f'{_BASE},{extra}}}'.encode())
    assert error.param is not None and error.param.startswith(param), error.message
    assert param in error.message


def test_malformed_json_names_the_byte() -> None:
    error = _error(b'{"model":"m",,}')
    assert "byte 13" in error.message and error.param is None


def test_many_shallow_brackets_and_escapes_in_strings() -> None:
    # more brackets than the limit (the slow path), none deep; escaped quotes and backslashes
    # in strings must not turn the string state around
    siblings = ",".join(['[[{"a":"\\"[[[","b":"x\\\\"}]]'] * 200)
    check_depth(f'{{"tools":[{siblings}]}}'.encode())
    deep = '"q\\\\":' + "[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1)
    with pytest.raises(TooDeep) as info:
        check_depth(f'{{"s":"\\\\\\"{{[", {deep}, "t":[{siblings}]}}'.encode())
    assert info.value.field == "q\\\\"
    json.loads(f'{{"s":"\\\\\\"{{[", {deep}, "t":[{siblings}]}}')  # the bodies are valid JSON

"""gateway.tools without a model: tool calls parsed out of streamed text however it is split,
the forced-call constraint, the fallback prompt, and request fields decoded with named 400s."""

from __future__ import annotations

import json

import pytest

from gateway import tools
from gateway.errors import InvalidRequestError
from gateway.interface import Capabilities, ChatMessage, Tool, ToolCall, ToolChoice

DECLARED = (Tool(name="f", parameters={"type": "object"}), Tool(name="g"))
TEXT = 'Sure.\n<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>\n<tool_call>\n{"name": "g", "arguments": {}}\n</tool_call>'


@pytest.mark.parametrize("size", [1, 3, 7, len(TEXT)])
def test_parser_any_split(size: int) -> None:
    parser = tools.ToolCallParser(DECLARED)
    content, calls = "", []
    for i in range(0, len(TEXT), size):
        text, new = parser.feed(TEXT[i : i + size])
        content += text
        calls += new
    content += parser.finish()
    assert content == "Sure.\n"
    assert [(c.index, c.name) for c in calls if c.id] == [(0, "f"), (1, "g")]
    args = {}
    for c in calls:
        args[c.index] = args.get(c.index, "") + c.arguments
    assert json.loads(args[0]) == {"a": 1} and json.loads(args[1]) == {}


def test_unknown_function_or_bad_json_stays_text() -> None:
    parser = tools.ToolCallParser(DECLARED)
    text = '<tool_call>\n{"name": "nope", "arguments": {}}\n</tool_call> and <tool_call>{oops</tool_call>'
    content, calls = parser.feed(text)
    assert calls == [] and content + parser.finish() == text


def test_constraint_for_forced_calls() -> None:
    assert tools.tool_constraint(DECLARED, ToolChoice(mode="auto"), parallel=True) is None
    named = tools.tool_constraint(DECLARED, ToolChoice(mode="function", name="g"), parallel=True)
    assert named is not None and not named.multiple and named.wrap == (tools.CALL_OPEN, tools.CALL_CLOSE)
    assert json.loads(named.json_schema)["properties"]["name"] == {"const": "g"}
    required = tools.tool_constraint(DECLARED, ToolChoice(mode="required"), parallel=True)
    assert required is not None and required.multiple and len(json.loads(required.json_schema)["anyOf"]) == 2


def test_fallback_messages() -> None:
    call = ToolCall(id="call_1", name="f", arguments='{"a": 1}')
    messages = [
        ChatMessage(role="user", content="hi"),
        ChatMessage(role="assistant", tool_calls=(call,)),
        ChatMessage(role="tool", content="42", tool_call_id="call_1"),
    ]
    out = tools.fallback_messages(messages, DECLARED)
    assert out[0].role == "system" and '"name": "f"' in out[0].content
    assert out[2].content == tools.call_text(call) and out[3] == ChatMessage(role="user", content="<tool_response>\n42\n</tool_response>")


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        ([{"type": "function", "function": {"name": "a b"}}], "tools[0].function.name"),
        ([{"type": "function", "function": {"name": "a"}}, {"type": "function", "function": {"name": "a"}}], "tools[1].function.name"),
        ([{"type": "function", "function": {"name": "a", "parameters": []}}], "tools[0].function.parameters"),
    ],
)  # fmt: skip
def test_tool_fields_name_the_field(raw, param) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidRequestError) as info:
        tools.tools(raw, Capabilities(tools=True))
    assert info.value.param == param

"""Structured output and function calling, backend-neutral: request fields → interface Structs
and the ``StructuredOutput`` a backend enforces; tools in a prompt; tool calls out of text.

The tool-call text format is the Hermes / Qwen one, which templates that render tools already
teach their models: each call is ``<tool_call>\\n{"name": …, "arguments": {…}}\\n</tool_call>``.
A template that does not mention tools (SmolLM2's) gets them in a system message instead
(``tools_system_prompt``), and ``tool`` messages as ``<tool_response>`` user turns
(``fallback_messages``). ``tool_choice`` ``required`` or a named function is enforced by a
grammar over that format against each tool's ``parameters`` (``tool_constraint``); ``auto`` lets
the model choose, and ``ToolCallParser`` turns whatever calls it wrote into ``tool_calls``.

No torch here: the gateway and every backend may use it.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import msgspec

from gateway.errors import InvalidRequestError, UnsupportedParameterError
from gateway.interface import (
    Capabilities,
    ChatMessage,
    Delta,
    ResponseFormat,
    StreamItem,
    StructuredOutput,
    Tool,
    ToolCall,
    ToolCallDelta,
    ToolChoice,
)

CALL_OPEN = "<tool_call>\n"
CALL_CLOSE = "\n</tool_call>"
_OPEN_TAG = "<tool_call>"
_CLOSE_TAG = "</tool_call>"
_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
#: the schema of ``json_object``: any JSON object
JSON_OBJECT_SCHEMA = '{"type": "object"}'
EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


# ---------------------------------------------------------------------------------------------
# requests


def response_format(raw: Any, caps: Capabilities) -> ResponseFormat | None:
    """``response_format`` as sent → ``ResponseFormat`` (None for absent or ``text``); 400s name
    the field; a backend without structured output is a 400 naming ``response_format``."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise InvalidRequestError("'response_format' must be an object", param="response_format")
    kind = raw.get("type")
    if kind == "text":
        return None
    if kind not in ("json_object", "json_schema"):
        raise InvalidRequestError(
            f"'response_format.type' must be 'text', 'json_object' or 'json_schema', got {kind!r}",
            param="response_format.type",
        )
    if not caps.structured_output:
        raise UnsupportedParameterError(
            f"'response_format' of type '{kind}' is not supported by this model", param="response_format"
        )
    if kind == "json_object":
        return ResponseFormat(type="json_object")
    spec = raw.get("json_schema")
    if not isinstance(spec, dict):
        raise InvalidRequestError(
            "'response_format.json_schema' must be an object with 'name' and 'schema'",
            param="response_format.json_schema",
        )
    name = spec.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise InvalidRequestError(
            "'response_format.json_schema.name' must be 1-64 letters, digits, '_' or '-'",
            param="response_format.json_schema.name",
        )
    schema = spec.get("schema", {})
    if not isinstance(schema, dict):
        raise InvalidRequestError(
            "'response_format.json_schema.schema' must be a JSON schema object",
            param="response_format.json_schema.schema",
        )
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise InvalidRequestError(
            "'response_format.json_schema.strict' must be a boolean", param="response_format.json_schema.strict"
        )
    description = spec.get("description")
    return ResponseFormat(type="json_schema", name=name, schema=schema, strict=strict,
                          description=description if isinstance(description, str) else None)  # fmt: skip


def format_constraint(fmt: ResponseFormat) -> StructuredOutput:
    """What the output must be under ``fmt``. ``strict`` or not, the schema is enforced: Taxiway
    fails closed (a schema it cannot enforce is a 400, never unconstrained output)."""
    if fmt.type == "json_object":
        return StructuredOutput(json_schema=JSON_OBJECT_SCHEMA, param="response_format")
    return StructuredOutput(json_schema=json.dumps(fmt.schema or {}), param="response_format.json_schema.schema")


def tools(raw: Any, caps: Capabilities) -> tuple[Tool, ...]:
    """``tools`` as sent → ``Tool``s; each malformed one a 400 naming ``tools[i]…``."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise InvalidRequestError("'tools' must be an array of tools", param="tools")
    if not raw:
        return ()
    if not caps.tools:
        raise UnsupportedParameterError("'tools' (function calling) is not supported by this model", param="tools")
    out: list[Tool] = []
    for i, item in enumerate(raw):
        where = f"tools[{i}]"
        if not isinstance(item, dict) or item.get("type") != "function":
            raise InvalidRequestError(f"'{where}.type' must be 'function'", param=f"{where}.type")
        fn = item.get("function")
        if not isinstance(fn, dict):
            raise InvalidRequestError(f"'{where}.function' must be an object", param=f"{where}.function")
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise InvalidRequestError(
                f"'{where}.function.name' must be 1-64 letters, digits, '_' or '-'", param=f"{where}.function.name"
            )
        if any(t.name == name for t in out):
            raise InvalidRequestError(f"'{where}.function.name': '{name}' is declared twice", param=f"{where}.function.name")
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise InvalidRequestError(
                f"'{where}.function.parameters' must be a JSON schema object", param=f"{where}.function.parameters"
            )
        description = fn.get("description")
        if description is not None and not isinstance(description, str):
            raise InvalidRequestError(f"'{where}.function.description' must be a string", param=f"{where}.function.description")
        strict = fn.get("strict")
        out.append(Tool(name=name, description=description, parameters=params, strict=strict if isinstance(strict, bool) else None))
    return tuple(out)


def tool_choice(raw: Any, declared: Sequence[Tool]) -> ToolChoice | None:
    """``tool_choice`` as sent → ``ToolChoice`` (None when absent: ``auto`` with tools, else ``none``)."""
    if raw is None:
        return None
    if raw in ("none", "auto", "required"):
        choice = ToolChoice(mode=raw)
    elif isinstance(raw, dict) and raw.get("type") == "function" and isinstance(raw.get("function"), dict):
        name = raw["function"].get("name")
        if not isinstance(name, str):
            raise InvalidRequestError("'tool_choice.function.name' must be a string", param="tool_choice.function.name")
        if not any(t.name == name for t in declared):
            raise InvalidRequestError(
                f"'tool_choice' names the function '{name}', which 'tools' does not declare",
                param="tool_choice.function.name",
            )
        choice = ToolChoice(mode="function", name=name)
    else:
        raise InvalidRequestError(
            "'tool_choice' must be 'none', 'auto', 'required' or {\"type\": \"function\", \"function\": {\"name\": …}}",
            param="tool_choice",
        )
    if choice.mode in ("required", "function") and not declared:
        raise InvalidRequestError(f"'tool_choice' {choice.mode!r} needs 'tools'", param="tool_choice")
    return choice


def calls_tools(declared: Sequence[Tool], choice: ToolChoice | None) -> bool:
    """Whether the model may call a tool: tools declared and ``tool_choice`` not ``none``."""
    return bool(declared) and (choice is None or choice.mode != "none")


def tool_constraint(declared: Sequence[Tool], choice: ToolChoice | None, *, parallel: bool) -> StructuredOutput | None:
    """The grammar's spec when ``tool_choice`` forces calls (``required``: any declared function,
    one or more when ``parallel``; a named one: exactly one call of it); None otherwise."""
    if choice is None or choice.mode not in ("required", "function"):
        return None
    chosen = [t for t in declared if choice.mode == "required" or t.name == choice.name]
    calls = [
        {
            "type": "object",
            "properties": {"name": {"const": t.name}, "arguments": t.parameters or EMPTY_PARAMETERS},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in chosen
    ]
    schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
    return StructuredOutput(
        json_schema=json.dumps(schema),
        param="tools",
        wrap=(CALL_OPEN, CALL_CLOSE),
        multiple=parallel and choice.mode == "required",
    )


def message_tool_calls(raw: Any, where: str) -> tuple[ToolCall, ...]:
    """An assistant message's ``tool_calls`` as sent → ``ToolCall``s (400s name ``messages[i]…``)."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise InvalidRequestError(f"'{where}.tool_calls' must be an array", param=f"{where}.tool_calls")
    out = []
    for j, call in enumerate(raw):
        at = f"{where}.tool_calls[{j}]"
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(call.get("id"), str):
            raise InvalidRequestError(f"'{at}' must have an 'id' and a 'function'", param=at)
        name, arguments = fn.get("name"), fn.get("arguments", "{}")
        if not isinstance(name, str) or not isinstance(arguments, str):
            raise InvalidRequestError(f"'{at}.function' must have a string 'name' and 'arguments'", param=f"{at}.function")
        out.append(ToolCall(id=call["id"], name=name, arguments=arguments))
    return tuple(out)


# ---------------------------------------------------------------------------------------------
# prompts


def openai_tools(declared: Sequence[Tool]) -> list[dict[str, Any]]:
    """The tools as OpenAI's request spells them (what templates that render tools read)."""
    out = []
    for t in declared:
        fn: dict[str, Any] = {"name": t.name, "parameters": t.parameters or EMPTY_PARAMETERS}
        if t.description:
            fn["description"] = t.description
        out.append({"type": "function", "function": fn})
    return out


def tools_system_prompt(declared: Sequence[Tool]) -> str:
    """Tools for a model whose template does not render them: the Hermes-style system text."""
    lines = "\n".join(json.dumps(t, ensure_ascii=False) for t in openai_tools(declared))
    return (
        "You may call one or more functions to assist with the user query.\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n"
        f"<tools>\n{lines}\n</tools>\n"
        "For each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\n"
        f'{CALL_OPEN}{{"name": <function-name>, "arguments": <args-json-object>}}{CALL_CLOSE}'
    )


def call_text(call: ToolCall) -> str:
    """An earlier call as the model writes it."""
    try:
        arguments: Any = json.loads(call.arguments)
    except ValueError:
        arguments = call.arguments
    return CALL_OPEN + json.dumps({"name": call.name, "arguments": arguments}, ensure_ascii=False) + CALL_CLOSE


def fallback_messages(messages: Sequence[ChatMessage], declared: Sequence[Tool]) -> list[ChatMessage]:
    """The conversation for a template that knows nothing of tools: the tools in the system
    message, assistant calls as their text, ``tool`` results as ``<tool_response>`` user turns."""
    out: list[ChatMessage] = []
    if declared:
        prompt = tools_system_prompt(declared)
        if messages and messages[0].role in ("system", "developer"):
            out.append(ChatMessage(role="system", content=messages[0].content + "\n\n" + prompt))
            messages = messages[1:]
        else:
            out.append(ChatMessage(role="system", content=prompt))
    for m in messages:
        if m.role == "tool":
            out.append(ChatMessage(role="user", content=f"<tool_response>\n{m.content}\n</tool_response>"))
        elif m.tool_calls:
            text = "\n".join(call_text(c) for c in m.tool_calls)
            out.append(ChatMessage(role=m.role, content=(m.content + "\n" if m.content else "") + text, name=m.name))
        else:
            out.append(m)
    return out


def message_dict(m: ChatMessage, *, decode_arguments: bool) -> dict[str, Any]:
    """A message as a plain dict: for an OpenAI-compatible upstream (``decode_arguments=False``:
    ``arguments`` stay the JSON string the wire carries, ``content`` is null beside tool calls) or
    for HF chat templates (``True``: ``arguments`` decoded, as templates iterate over them)."""
    out: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.name is not None:
        out["name"] = m.name
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    if m.tool_calls:
        calls = []
        for c in m.tool_calls:
            arguments: Any = c.arguments
            if decode_arguments:
                try:
                    arguments = json.loads(c.arguments)
                except ValueError:
                    pass
            calls.append({"id": c.id, "type": "function", "function": {"name": c.name, "arguments": arguments}})
        out["tool_calls"] = calls
        if not decode_arguments:
            out["content"] = m.content or None
    return out


def template_message(m: ChatMessage) -> dict[str, Any]:
    """A message as HF chat templates read it (``tool_calls`` with JSON-decoded ``arguments``)."""
    return message_dict(m, decode_arguments=True)


# ---------------------------------------------------------------------------------------------
# output


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


class ToolCallParser:
    """Splits one choice's streamed text into content and tool calls.

    ``feed(text)`` returns the content that can be sent now and the calls completed by this
    text; text that may be the start of ``<tool_call>`` is held back until it is not. A call
    whose JSON is not ``{"name": <a declared tool>, "arguments": {…}}`` stays content (in
    ``auto`` the model may write anything; under a grammar it cannot). ``finish()`` returns what
    is left (an unclosed call is content).
    """

    def __init__(self, declared: Sequence[Tool]) -> None:
        self._names = {t.name for t in declared}
        self._buffer = ""
        self._after_call = False
        self.num_calls = 0

    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        self._buffer += text
        content: list[str] = []
        calls: list[ToolCallDelta] = []
        while True:
            if self._after_call:  # the newline between calls is the format's, not content
                self._buffer = self._buffer.lstrip("\n")
                if not self._buffer:
                    break
                self._after_call = False
            start = self._buffer.find(_OPEN_TAG)
            if start < 0:
                keep = _partial_suffix(self._buffer, _OPEN_TAG)
                content.append(self._buffer[: len(self._buffer) - keep])
                self._buffer = self._buffer[len(self._buffer) - keep :]
                break
            end = self._buffer.find(_CLOSE_TAG, start)
            if end < 0:
                content.append(self._buffer[:start])
                self._buffer = self._buffer[start:]
                break
            call = self._parse(self._buffer[start + len(_OPEN_TAG) : end])
            if call is None:
                content.append(self._buffer[: end + len(_CLOSE_TAG)])
            else:
                content.append(self._buffer[:start])
                calls.extend(call)
                self._after_call = True
            self._buffer = self._buffer[end + len(_CLOSE_TAG) :]
        return "".join(content), calls

    def finish(self) -> str:
        rest, self._buffer = self._buffer, ""
        return rest

    def _parse(self, body: str) -> list[ToolCallDelta] | None:
        try:
            value = json.loads(body)
        except ValueError:
            return None
        if not isinstance(value, Mapping) or value.get("name") not in self._names:
            return None
        arguments = value.get("arguments", {})
        if not isinstance(arguments, Mapping):
            return None
        index = self.num_calls
        self.num_calls += 1
        # OpenAI's stream: the call's id and name with empty arguments, then the arguments
        return [
            ToolCallDelta(index=index, id=new_call_id(), name=str(value["name"]), arguments=""),
            ToolCallDelta(index=index, arguments=json.dumps(arguments, ensure_ascii=False)),
        ]


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of ``text`` that is a proper start of ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


async def parse_tool_calls(stream: AsyncIterator[StreamItem], declared: Sequence[Tool]) -> AsyncIterator[StreamItem]:
    """``stream`` with each choice's ``<tool_call>`` blocks turned into ``Delta.tool_calls``; a
    choice that called a tool and stopped finishes with ``tool_calls``."""
    parsers: dict[int, ToolCallParser] = {}
    async for item in stream:
        if not isinstance(item, Delta):
            yield item
            continue
        parser = parsers.get(item.index)
        if parser is None:
            parser = parsers[item.index] = ToolCallParser(declared)
        text, calls = parser.feed(item.text)
        reason = item.finish_reason
        if reason is not None:
            text += parser.finish()
            if reason == "stop" and parser.num_calls:
                reason = "tool_calls"
        yield msgspec.structs.replace(item, text=text, tool_calls=tuple(calls), finish_reason=reason)

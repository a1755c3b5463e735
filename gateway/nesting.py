"""How deep a JSON body nests, checked before it is decoded.

msgspec decodes nested arrays and objects by recursion, and everything after it that walks a
decoded value (tool schemas, grammars, re-encoding for an upstream) recurses too: a body nested
~1,000 levels deep inside ``tools``, ``metadata`` or an unknown field would end in a
``RecursionError`` somewhere past the decoder. So a body nesting deeper than ``MAX_JSON_DEPTH``
is refused up front, naming the top-level field it is in and the byte where the limit is crossed.

The common body costs two ``bytes.count`` calls: a body with fewer brackets than the limit
cannot nest past it. One with more (tools' schemas) has its strings dropped and its brackets
summed with bytes and itertools operations only (~10 µs for 30 tools); only a body that does nest
too deep is scanned token by token, to name where.
"""

from __future__ import annotations

import array
import itertools
import re

#: Deeper than any real request (a tool's JSON schema nests a few levels per object), and far
#: below the interpreter's recursion limit (1,000 frames, shared with the server's own stack).
MAX_JSON_DEPTH = 128

# A string (with its escapes) optionally followed by ':' (then it is a key), or a bracket.
_TOKENS = re.compile(rb'"(?:[^"\\]|\\.)*"(\s*:)?|[\[\]{}]', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_STEPS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")  # +1 and -1 as signed bytes


class TooDeep(Exception):
    """``field`` (the top-level key the nesting is under, "" at the top) passes ``MAX_JSON_DEPTH``
    at byte ``offset``."""

    def __init__(self, field: str, offset: int, max_depth: int) -> None:
        where = f"'{field}'" if field else "the body"
        super().__init__(f"{where} nests deeper than {max_depth} levels of arrays and objects (at byte {offset})")
        self.field = field
        self.offset = offset


def check_depth(body: bytes, max_depth: int = MAX_JSON_DEPTH) -> None:
    """Raise ``TooDeep`` when ``body`` nests arrays and objects deeper than ``max_depth``.

    Malformed JSON is left to the decoder; this only counts brackets outside strings.
    """
    if body.count(b"[") + body.count(b"{") <= max_depth:
        return
    if _deepest(body) <= max_depth:
        return
    depth = 0
    field = ""
    for match in _TOKENS.finditer(body):
        token = match.group()
        first = token[0]
        if first == 0x22:  # '"'
            colon = match.group(1)
            if depth == 1 and colon is not None:  # a key of the top-level object
                field = token[1 : -len(colon) - 1].decode("utf-8", "replace")
        elif first in (0x5B, 0x7B):  # '[' '{'
            depth += 1
            if depth > max_depth:
                raise TooDeep(field if depth > 1 else "", match.start(), max_depth)
        else:
            depth -= 1


def _deepest(body: bytes) -> int:
    """How deep ``body``'s arrays and objects nest. Escaped backslashes, then escaped quotes are
    dropped (backslashes occur only in strings), so every other '"' opens or closes a string:
    splitting on them leaves what is outside strings at even indexes."""
    unescaped = body.replace(b"\\\\", b"").replace(b'\\"', b"")
    outside = b"".join(unescaped.split(b'"')[::2])
    steps = array.array("b", outside.translate(None, _NOT_BRACKETS).translate(_STEPS))
    return max(itertools.accumulate(steps), default=0)

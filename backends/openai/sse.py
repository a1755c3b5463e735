"""Server-sent events parsing: bytes as they arrive → the ``data`` of each event."""

from __future__ import annotations

import re
from collections.abc import AsyncIterable, AsyncIterator

_LINE_END = re.compile(rb"\r\n|\r|\n")


async def iter_sse_data(chunks: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
    """Yield each event's data (its ``data:`` lines joined by newlines), as soon as it is complete.

    Follows the SSE framing rules that matter here: lines end in CRLF, LF or a lone CR, an empty
    line ends an event, comment lines (``:``) and other fields are skipped, one space after the
    colon is dropped. A CR that ends what has arrived so far waits for the next chunk: it may be
    the first half of a CRLF.
    """
    buffer = b""
    data: list[bytes] = []
    async for chunk in chunks:
        buffer += chunk
        start = 0
        for end in _LINE_END.finditer(buffer):
            if end.end() == len(buffer) and end.group() == b"\r":
                break  # perhaps a CRLF split across chunks
            line = buffer[start : end.start()]
            start = end.end()
            if not line:
                if data:
                    yield b"\n".join(data)
                    data = []
            elif line.startswith(b"data:"):
                value = line[5:]
                data.append(value[1:] if value.startswith(b" ") else value)
        buffer = buffer[start:]
    line = buffer.rstrip(b"\r")
    if line.startswith(b"data:"):
        data.append(line[6:] if line.startswith(b"data: ") else line[5:])
    if data:  # a stream cut without its last blank line still delivers what it had
        yield b"\n".join(data)

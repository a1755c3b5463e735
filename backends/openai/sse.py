"""Server-sent events parsing: bytes as they arrive → the ``data`` of each event."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator


async def iter_sse_data(chunks: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
    """Yield each event's data (its ``data:`` lines joined by newlines), as soon as it is complete.

    Follows the SSE framing rules that matter here: lines end in LF or CRLF, an empty line ends an
    event, comment lines (``:``) and other fields are skipped, one space after the colon is dropped.
    """
    buffer = b""
    data: list[bytes] = []
    async for chunk in chunks:
        buffer += chunk
        while True:
            end = buffer.find(b"\n")
            if end < 0:
                break
            line = buffer[:end]
            buffer = buffer[end + 1 :]
            if line.endswith(b"\r"):
                line = line[:-1]
            if not line:
                if data:
                    yield b"\n".join(data)
                    data = []
                continue
            if line.startswith(b"data:"):
                value = line[5:]
                data.append(value[1:] if value.startswith(b" ") else value)
    line = buffer.rstrip(b"\r")
    if line.startswith(b"data:"):
        data.append(line[6:] if line.startswith(b"data: ") else line[5:])
    if data:  # a stream cut without its last blank line still delivers what it had
        yield b"\n".join(data)

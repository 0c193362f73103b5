"""HTTP/1.1 by hand, for tests that must send what a polite client never would.

aiohttp's client normalises paths, encodes headers and frames bodies itself;
:func:`exchange` sends the exact bytes of a request over a fresh TCP
connection (``Connection: close``) and parses the reply just enough to check
it: status, headers (lower-case names) and the de-chunked body.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import attrs

__all__ = ["RawResponse", "build_request", "exchange"]


@attrs.frozen
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes


def build_request(
    method: str,
    target: bytes,
    headers: Sequence[tuple[bytes, bytes]],
    body: bytes | None,
    *,
    chunked: bool = False,
) -> bytes:
    """A complete request: the request line, ``Host``, the headers, and the framed body."""
    lines = [method.encode() + b" " + target + b" HTTP/1.1", b"Host: 127.0.0.1"]
    lines += [name + b": " + value for name, value in headers]
    lines.append(b"Connection: close")
    if body is None:
        return b"\r\n".join(lines) + b"\r\n\r\n"
    if not chunked:
        lines.append(b"Content-Length: " + str(len(body)).encode())
        return b"\r\n".join(lines) + b"\r\n\r\n" + body
    lines.append(b"Transfer-Encoding: chunked")
    framed = b"".join(
        f"{len(body[i : i + 4096]):x}\r\n".encode() + body[i : i + 4096] + b"\r\n"
        for i in range(0, len(body), 4096)
    )
    return b"\r\n".join(lines) + b"\r\n\r\n" + framed + b"0\r\n\r\n"


async def exchange(port: int, request: bytes, *, head: bool = False) -> RawResponse:
    """Send ``request`` to 127.0.0.1:``port`` and read the whole reply."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    chunks: list[bytes] = []
    try:
        try:
            writer.write(request)
            await writer.drain()
        except (ConnectionResetError, BrokenPipeError):
            pass  # the server may answer (e.g. 413) and close before reading everything
        async with asyncio.timeout(30):
            while data := await reader.read(65536):
                chunks.append(data)
    except ConnectionResetError:
        pass  # what arrived before the reset is the reply
    finally:
        writer.close()
    return _parse(b"".join(chunks), head=head)


def _parse(raw: bytes, *, head: bool) -> RawResponse:
    header_block, _, rest = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = header_block.decode("latin-1").split("\r\n")
    status = int(status_line.split(" ", 2)[1])
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if head:
        return RawResponse(status, headers, b"")
    if headers.get("transfer-encoding", "").lower() == "chunked":
        return RawResponse(status, headers, _dechunk(rest))
    length = int(headers.get("content-length", len(rest)))
    return RawResponse(status, headers, rest[:length])


def _dechunk(data: bytes) -> bytes:
    body = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        body, data = body + data[:size], data[size + 2 :]
    return body

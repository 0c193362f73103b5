"""Request bodies for :class:`~bridge_kit.client.HomeserverClient`: JSON, or raw and streamed.

A raw body is bytes, a file (opened for each attempt and read in chunks, so
it is never held in memory) or an async iterable of chunks (sent once only).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, AsyncIterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import aiohttp
import attrs

from bridge_kit.errors import HomeserverUnreachable

#: A raw request body: bytes, a file (read in chunks, never whole) or chunks from an iterable.
RawBody = bytes | Path | AsyncIterable[bytes]

_JSON_CONTENT: Final = {"Content-Type": "application/json"}


@attrs.frozen
class Raw:
    """A non-JSON request body and its ``Content-Type`` (and length, for an iterable)."""

    source: RawBody
    content_type: str
    size: int | None = None

    @property
    def reusable(self) -> bool:
        """Whether it can be sent again: bytes and files can, chunks of an iterable cannot."""
        return isinstance(self.source, bytes | Path)


def query_params(
    query: Mapping[str, str | Sequence[str]] | None, user_id: str | None
) -> dict[str, str | Sequence[str]]:
    """The query parameters of a request, with the ``user_id`` identity assertion if given."""
    params = dict(query or {})
    if user_id is not None:
        params["user_id"] = user_id
    return params


@contextlib.contextmanager
def prepared(
    data: bytes | Raw | None, headers: Mapping[str, str], timeout: float, stream: bool = False
) -> Iterator[tuple[Any, dict[str, str], dict[str, Any]]]:
    """The aiohttp ``data``, headers and extra keywords for one attempt with this body.

    A raw body (an upload, possibly long) gets a timeout on the connect and on
    each read instead of the session's total; so does a streamed download.
    """
    if not isinstance(data, Raw):
        json_headers = dict(headers) if data is None else {**headers, **_JSON_CONTENT}
        yield data, json_headers, streaming_timeout(timeout) if stream else {}
        return
    raw_headers = {**headers, "Content-Type": data.content_type}
    if data.size is not None and not isinstance(data.source, bytes | Path):
        raw_headers["Content-Length"] = str(data.size)
    if isinstance(data.source, Path):
        # aiohttp reads an open file in chunks (in a thread) and sends its size.
        with data.source.open("rb") as file:
            yield file, raw_headers, streaming_timeout(timeout)
    else:
        yield data.source, raw_headers, streaming_timeout(timeout)


def streaming_timeout(timeout: float) -> dict[str, Any]:
    """aiohttp keywords bounding the connect and each read by ``timeout``, not the total."""
    return {"timeout": aiohttp.ClientTimeout(total=None, sock_connect=timeout, sock_read=timeout)}


async def read_chunks(
    response: aiohttp.ClientResponse, where: str, chunk_size: int = 64 * 1024
) -> AsyncGenerator[bytes, None]:
    """Yield an open response's body in chunks, then release it (close it if cut short)."""
    finished = False
    try:
        async for chunk in response.content.iter_chunked(chunk_size):
            yield chunk
        finished = True
    except (aiohttp.ClientError, TimeoutError) as exc:
        detail = " ".join(f"{type(exc).__name__}: {exc}".split())
        raise HomeserverUnreachable(f"{where}: the reply broke off: {detail}") from exc
    finally:
        if finished:
            response.release()
        else:
            response.close()

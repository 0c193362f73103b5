"""Files between the remote network and Matrix, streamed, within size limits.

Remote → Matrix: :func:`upload_url` fetches a remote URL and uploads it;
:func:`upload_stream` uploads an async byte stream. Matrix → remote:
:func:`download_stream` yields an ``mxc://`` file's chunks, :func:`download`
returns it whole. Each takes an :class:`~bridge_kit.intent.Intent` (the ghost or
bot that uploads or downloads) and an optional ``max_size``: the bridge's own
limit, on top of the homeserver's ``m.upload.size``. A file over the limit is
refused with :class:`~bridge_kit.errors.MediaTooLarge` as soon as that is
known, and no file is ever held in memory whole (except by :func:`download`).
"""

from __future__ import annotations

import asyncio
import email.message
import posixpath
import tempfile
import urllib.parse
from collections.abc import AsyncGenerator, AsyncIterable
from pathlib import Path

import aiohttp
import attrs

from bridge_kit.errors import MediaTooLarge, MediaUnavailable
from bridge_kit.intent import Intent

__all__ = ["UploadedMedia", "download", "download_stream", "upload_stream", "upload_url"]

#: How much of a remote file is read at once.
CHUNK_SIZE = 64 * 1024
#: The longest a remote file's fetch may take, in seconds (the whole transfer).
DEFAULT_FETCH_TIMEOUT = 300.0
DEFAULT_CONTENT_TYPE = "application/octet-stream"


@attrs.frozen
class UploadedMedia:
    """A file now on the homeserver: its ``mxc://`` URI, size, type and name."""

    mxc: str
    size: int
    content_type: str
    filename: str | None = None


async def upload_limit(intent: Intent, max_size: int | None) -> int | None:
    """The smaller of the homeserver's ``m.upload.size`` and ``max_size``."""
    homeserver = (await intent.media_config()).upload_size
    limits = [limit for limit in (homeserver, max_size) if limit is not None]
    return min(limits) if limits else None


def _too_large(size: int, limit: int, what: str) -> MediaTooLarge:
    return MediaTooLarge(
        size, limit, f"{what} is over the limit of {limit} bytes (at least {size}); not uploaded"
    )


async def upload_url(
    intent: Intent,
    url: str,
    *,
    session: aiohttp.ClientSession | None = None,
    max_size: int | None = None,
    content_type: str | None = None,
    filename: str | None = None,
    fetch_timeout: float = DEFAULT_FETCH_TIMEOUT,
) -> UploadedMedia:
    """Fetch the remote file at ``url`` (``http``/``https``) and upload it as ``intent``.

    A ``Content-Length`` over the limit is refused before the body is read; a body
    that grows over it is cut off there. The file passes through a temporary
    file, never memory, and is uploaded only once it is whole (so that the
    upload can be retried). ``content_type`` and ``filename`` default to what the
    remote server says. ``session`` is the bridge's HTTP session for the remote
    side (a new one for this call when ``None``; never the homeserver's).

    Raises :class:`~bridge_kit.errors.MediaTooLarge` and
    :class:`~bridge_kit.errors.MediaUnavailable` (an error status, no answer, a
    broken transfer, not an http(s) URL).
    """
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise MediaUnavailable(f"{url!r}: not an http(s) URL")
    limit = await upload_limit(intent, max_size)
    if session is None:
        async with aiohttp.ClientSession() as own_session:
            return await _upload_url(
                intent, url, own_session, limit, content_type, filename, fetch_timeout
            )
    return await _upload_url(intent, url, session, limit, content_type, filename, fetch_timeout)


async def _upload_url(
    intent: Intent,
    url: str,
    session: aiohttp.ClientSession,
    limit: int | None,
    content_type: str | None,
    filename: str | None,
    fetch_timeout: float,
) -> UploadedMedia:
    with tempfile.TemporaryDirectory(prefix="bridge_kit_media_") as tmp:
        spooled = Path(tmp) / "file"
        try:
            async with session.get(
                url, timeout=aiohttp.ClientTimeout(total=fetch_timeout)
            ) as response:
                if response.status >= 300:
                    raise MediaUnavailable(
                        f"{url}: HTTP {response.status} {response.reason or ''}".rstrip()
                    )
                declared = response.content_length
                if limit is not None and declared is not None and declared > limit:
                    raise _too_large(declared, limit, f"the file at {url}")
                content_type = content_type or response.content_type or DEFAULT_CONTENT_TYPE
                filename = filename or _filename(response, url)
                chunks = response.content.iter_chunked(CHUNK_SIZE)
                size = await _spool(chunks, spooled, limit, f"the file at {url}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise MediaUnavailable(f"{url}: {_describe(exc)}") from exc
        mxc = await intent.upload_media(spooled, content_type, filename)
    return UploadedMedia(mxc, size, content_type, filename)


async def upload_stream(
    intent: Intent,
    chunks: AsyncIterable[bytes],
    content_type: str = DEFAULT_CONTENT_TYPE,
    *,
    filename: str | None = None,
    size: int | None = None,
    max_size: int | None = None,
) -> UploadedMedia:
    """Upload an async stream of chunks as ``intent``.

    With ``size`` (its length) the stream is sent as it comes, and sent once only;
    without, it is spooled to a temporary file first (the homeserver needs the
    length before the body). Over the limit: :class:`~bridge_kit.errors.MediaTooLarge`,
    before anything is sent when ``size`` says so.
    """
    limit = await upload_limit(intent, max_size)
    if size is not None:
        if limit is not None and size > limit:
            raise _too_large(size, limit, "the stream")
        mxc = await intent.upload_media(
            _capped(chunks, size, "the stream (longer than its stated size)"),
            content_type,
            filename,
            size=size,
        )
        return UploadedMedia(mxc, size, content_type, filename)
    with tempfile.TemporaryDirectory(prefix="bridge_kit_media_") as tmp:
        spooled = Path(tmp) / "file"
        written = await _spool(chunks, spooled, limit, "the stream")
        mxc = await intent.upload_media(spooled, content_type, filename)
    return UploadedMedia(mxc, written, content_type, filename)


async def download_stream(
    intent: Intent, mxc: str, *, max_size: int | None = None
) -> AsyncGenerator[bytes, None]:
    """The chunks of the ``mxc://`` file, as ``intent`` downloads them.

    Past ``max_size`` bytes the download stops with
    :class:`~bridge_kit.errors.MediaTooLarge` (chunks already yielded stay yielded:
    a sender should not commit the remote upload before the end).
    """
    chunks = intent.download_media_stream(mxc)
    try:
        async for chunk in _capped(chunks, max_size, mxc):
            yield chunk
    finally:
        await chunks.aclose()


async def download(intent: Intent, mxc: str, *, max_size: int | None = None) -> bytes:
    """The whole ``mxc://`` file (for small files), at most ``max_size`` bytes."""
    parts = [chunk async for chunk in download_stream(intent, mxc, max_size=max_size)]
    return b"".join(parts)


async def _capped(
    chunks: AsyncIterable[bytes], limit: int | None, what: str
) -> AsyncGenerator[bytes, None]:
    seen = 0
    async for chunk in chunks:
        seen += len(chunk)
        if limit is not None and seen > limit:
            raise MediaTooLarge(
                seen, limit, f"{what} is over the limit of {limit} bytes; transfer stopped"
            )
        yield chunk


async def _spool(chunks: AsyncIterable[bytes], path: Path, limit: int | None, what: str) -> int:
    """Write ``chunks`` to ``path``, stopping past ``limit``; the size written."""
    written = 0
    with path.open("wb") as file:
        async for chunk in chunks:
            written += len(chunk)
            if limit is not None and written > limit:
                raise _too_large(written, limit, what)
            # A thread, as a slow disk must not stall the event loop.
            await asyncio.to_thread(file.write, chunk)
    return written


def _filename(response: aiohttp.ClientResponse, url: str) -> str | None:
    disposition = response.headers.get("Content-Disposition")
    if disposition:
        message = email.message.Message()
        message["Content-Disposition"] = disposition
        name = message.get_filename()
        if name:
            return posixpath.basename(name) or None
    path = urllib.parse.unquote(urllib.parse.urlsplit(url).path)
    return posixpath.basename(path) or None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__

"""Media calls of :class:`~bridge_kit.intent.Intent` (authenticated media, Matrix v1.11+)."""

from __future__ import annotations

import asyncio
import os
import tempfile
import weakref
from collections.abc import AsyncGenerator, AsyncIterable, Mapping
from pathlib import Path
from typing import Any

from bridge_kit.client.homeserver import HomeserverClient, quote_segment, structure_reply
from bridge_kit.errors import InvalidMxc, MediaTooLarge
from bridge_kit.intent._actor import Actor, device_query
from bridge_kit.types.converter import converter
from bridge_kit.types.media import MediaConfig, MediaInfo, MediaMessage, UploadResponse

MEDIA_V1 = "/_matrix/client/v1/media"
UPLOAD = "/_matrix/media/v3/upload"

#: What ``upload_media`` takes: bytes, a file path, or an async iterable of chunks.
MediaSource = bytes | str | os.PathLike[str] | AsyncIterable[bytes]

# One media config per client: it changes only when the homeserver restarts.
_configs: weakref.WeakKeyDictionary[HomeserverClient, MediaConfig] = weakref.WeakKeyDictionary()


def parse_mxc(uri: str) -> tuple[str, str]:
    """``(server_name, media_id)`` of an ``mxc://`` URI; :class:`InvalidMxc` otherwise."""
    if not uri.startswith("mxc://"):
        raise InvalidMxc(uri)
    server, _, media_id = uri[len("mxc://") :].partition("/")
    if not server or not media_id or "/" in media_id:
        raise InvalidMxc(uri)
    return server, media_id


async def media_config(actor: Actor) -> MediaConfig:
    cached = _configs.get(actor.client)
    if cached is not None:
        return cached
    await actor.ensure_registered()
    reply = await actor.client.request(
        "GET", f"{MEDIA_V1}/config", query=device_query(actor.device_id), user_id=actor.user_id
    )
    config = structure_reply(reply, MediaConfig, "media config")
    _configs[actor.client] = config
    return config


async def upload_media(
    actor: Actor,
    data: MediaSource,
    content_type: str,
    filename: str | None,
    size: int | None,
) -> str:
    limit = (await media_config(actor)).upload_size
    if isinstance(data, str | os.PathLike):
        data = Path(data)
    if isinstance(data, bytes):
        size = len(data)
    elif isinstance(data, Path):
        size = data.stat().st_size
    elif size is None:
        # Synapse needs a Content-Length: spool the chunks to a temporary file
        # first (never to memory), which also makes the upload safe to resend.
        with tempfile.TemporaryDirectory(prefix="bridge_kit_upload_") as tmp:
            spooled = Path(tmp) / "upload"
            await _spool(data, spooled, limit)
            return await upload_media(actor, spooled, content_type, filename, None)
    if limit is not None and size > limit:
        raise MediaTooLarge(size, limit)
    await actor.ensure_registered()
    # Bytes and files may be sent again after a failure (a repeat can at worst
    # leave an unused copy of the media); an iterable's chunks cannot be, so the
    # client sends that once only.
    reply = await actor.client.request_raw(
        "POST",
        UPLOAD,
        data=data,
        content_type=content_type,
        size=size,
        query=device_query(actor.device_id) | ({} if filename is None else {"filename": filename}),
        user_id=actor.user_id,
        endpoint=UPLOAD,
    )
    return structure_reply(reply, UploadResponse, "upload").content_uri


async def _spool(chunks: AsyncIterable[bytes], path: Path, limit: int | None) -> None:
    written = 0
    with path.open("wb") as file:
        async for chunk in chunks:
            written += len(chunk)
            if limit is not None and written > limit:
                raise MediaTooLarge(written, limit)
            await asyncio.to_thread(file.write, chunk)


async def download_media_stream(actor: Actor, mxc: str) -> AsyncGenerator[bytes, None]:
    server, media_id = parse_mxc(mxc)
    await actor.ensure_registered()
    chunks = actor.client.stream(
        "GET",
        f"{MEDIA_V1}/download/{quote_segment(server)}/{quote_segment(media_id)}",
        query=device_query(actor.device_id),
        user_id=actor.user_id,
        endpoint=f"{MEDIA_V1}/download/{{serverName}}/{{mediaId}}",
    )
    try:
        async for chunk in chunks:
            yield chunk
    finally:
        await chunks.aclose()


async def download_media(actor: Actor, mxc: str) -> bytes:
    parts = [chunk async for chunk in download_media_stream(actor, mxc)]
    return b"".join(parts)


async def send_media(
    actor: Actor,
    room_id: str,
    msgtype: str,
    mxc: str,
    info: MediaInfo | Mapping[str, Any] | None,
    body: str | None,
    filename: str | None,
) -> str:
    parse_mxc(mxc)
    if info is not None and not isinstance(info, MediaInfo):
        info = converter.structure(dict(info), MediaInfo)
    text = body or filename or ("image" if msgtype == "m.image" else "file")
    content = MediaMessage(
        body=text,
        msgtype=msgtype,
        url=mxc,
        info=info,
        filename=filename if filename != text else None,
    )
    return await actor.send_event(room_id, "m.room.message", content)

"""Remote files ↔ mxc on a real Synapse; the remote side is a local aiohttp file server."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import tracemalloc
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from bridge_kit.bridge import media
from bridge_kit.client.homeserver import ClientObserver, HomeserverClient
from bridge_kit.errors import InvalidInput, MediaTooLarge, MediaUnavailable, UserInUse
from bridge_kit.intent import Intent
from bridge_kit.types.media import MediaInfo
from bridge_kit.types.register import RegisterRequest
from tests.conftest import TestHomeserver

pytestmark = pytest.mark.synapse

MB = 1024 * 1024
SMALL = os.urandom(150_000)


class Recorder(ClientObserver):
    def __init__(self) -> None:
        self.endpoints: list[str] = []

    def on_response(
        self, method: str, endpoint: str, status: int, errcode: str | None, seconds: float
    ) -> None:
        self.endpoints.append(f"{method} {endpoint}")


class RemoteFiles:
    """A remote network's file server: fixed files, chunked ones, errors, a stall."""

    def __init__(self) -> None:
        self.app = web.Application()
        self.app.router.add_get("/files/{name}", self.file)
        self.app.router.add_get("/chunked/{size}", self.chunked)
        self.app.router.add_get("/missing", self.missing)
        self.app.router.add_get("/stall", self.stall)
        self.url = ""
        self.never = asyncio.Event()
        self.bytes_sent = 0

    async def file(self, request: web.Request) -> web.Response:
        return web.Response(
            body=SMALL,
            content_type="image/png",
            headers={"Content-Disposition": 'attachment; filename="../cat picture.png"'},
        )

    async def chunked(self, request: web.Request) -> web.StreamResponse:
        """``size`` bytes without a Content-Length, 64 KiB at a time (counted)."""
        size = int(request.match_info["size"])
        response = web.StreamResponse()
        response.content_type = "application/octet-stream"
        response.enable_chunked_encoding()
        await response.prepare(request)
        chunk = b"\x5a" * (64 * 1024)
        with contextlib.suppress(ConnectionResetError):
            while size > 0:
                piece = chunk[: min(size, len(chunk))]
                await response.write(piece)
                self.bytes_sent += len(piece)
                size -= len(piece)
            await response.write_eof()
        return response

    async def missing(self, request: web.Request) -> web.Response:
        return web.Response(status=404, text="gone")

    async def stall(self, request: web.Request) -> web.Response:
        await self.never.wait()
        return web.Response(text="never")


@pytest.fixture
async def remote() -> AsyncIterator[RemoteFiles]:
    files = RemoteFiles()
    runner = web.AppRunner(files.app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    files.url = f"http://127.0.0.1:{port}"
    try:
        yield files
    finally:
        files.never.set()
        await runner.cleanup()


@pytest.fixture
async def client(synapse: TestHomeserver) -> AsyncIterator[HomeserverClient]:
    async with HomeserverClient(synapse.url, synapse.as_token) as client:
        yield client


@pytest.fixture
async def ghost(client: HomeserverClient, synapse: TestHomeserver, unique: str) -> Intent:
    localpart = f"_bk_media_{unique}"

    async def register() -> None:
        with contextlib.suppress(UserInUse):
            await client.register(RegisterRequest.for_puppet(localpart))

    intent = Intent(client, f"@{localpart}:{synapse.server_name}", register)
    await intent.media_config()  # registers, and caches the config outside measurements
    return intent


async def test_a_remote_url_round_trips_through_synapse(ghost: Intent, remote: RemoteFiles) -> None:
    uploaded = await media.upload_url(ghost, f"{remote.url}/files/cat.png")

    assert uploaded.mxc.startswith("mxc://test.local/")
    assert uploaded.size == len(SMALL)
    assert uploaded.content_type == "image/png"
    assert uploaded.filename == "cat picture.png"  # the server's name, without its path
    assert uploaded.info() == MediaInfo(mimetype="image/png", size=len(SMALL))
    assert await media.download(ghost, uploaded.mxc) == SMALL
    chunks = [chunk async for chunk in media.download_stream(ghost, uploaded.mxc)]
    assert b"".join(chunks) == SMALL


async def test_given_type_and_name_win_and_a_session_may_be_shared(
    ghost: Intent, remote: RemoteFiles
) -> None:
    async with aiohttp.ClientSession() as session:
        uploaded = await media.upload_url(
            ghost,
            f"{remote.url}/chunked/1000",
            session=session,
            content_type="text/plain",
            filename="notes.txt",
        )
        assert not session.closed
    assert (uploaded.content_type, uploaded.filename, uploaded.size) == (
        "text/plain",
        "notes.txt",
        1000,
    )
    assert await media.download(ghost, uploaded.mxc) == b"\x5a" * 1000


async def test_a_large_chunked_url_is_streamed_not_held(ghost: Intent, remote: RemoteFiles) -> None:
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before, _ = tracemalloc.get_traced_memory()
        uploaded = await media.upload_url(ghost, f"{remote.url}/chunked/{20 * MB}")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert peak - before < 5 * MB, f"the upload held {(peak - before) / MB:.1f} MB"
    assert uploaded.size == 20 * MB
    digest = hashlib.sha256()
    async for chunk in media.download_stream(ghost, uploaded.mxc):
        digest.update(chunk)
    assert digest.hexdigest() == hashlib.sha256(b"\x5a" * (20 * MB)).hexdigest()


async def test_over_the_limit_by_content_length_is_refused_unread(
    ghost: Intent, remote: RemoteFiles, client: HomeserverClient
) -> None:
    recorder = Recorder()
    client.observers.append(recorder)

    with pytest.raises(MediaTooLarge) as caught:
        await media.upload_url(ghost, f"{remote.url}/files/cat.png", max_size=100_000)

    assert str(caught.value) == (
        f"the file at {remote.url}/files/cat.png is over the limit of 100000 bytes "
        f"(at least {len(SMALL)}); not uploaded"
    )
    assert recorder.endpoints == []


async def test_over_the_limit_without_content_length_stops_there(
    ghost: Intent, remote: RemoteFiles, client: HomeserverClient
) -> None:
    recorder = Recorder()
    client.observers.append(recorder)

    with pytest.raises(MediaTooLarge, match="over the limit of 1000000 bytes"):
        await media.upload_url(ghost, f"{remote.url}/chunked/{50 * MB}", max_size=1_000_000)

    assert recorder.endpoints == []
    # The reading stopped near the limit: not the 50 MB (the socket buffers some).
    assert remote.bytes_sent < 20 * MB


async def test_the_homeserver_limit_applies_without_a_bridge_limit(ghost: Intent) -> None:
    homeserver_limit = (await ghost.media_config()).upload_size
    assert homeserver_limit is not None
    assert await media.upload_limit(ghost, None) == homeserver_limit
    assert await media.upload_limit(ghost, 10) == 10
    assert await media.upload_limit(ghost, homeserver_limit + 1) == homeserver_limit


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/missing", "/missing: HTTP 404 Not Found"),
        ("/stall", "/stall: timed out"),
    ],
)
async def test_a_remote_failure_is_one_clear_error(
    ghost: Intent, remote: RemoteFiles, path: str, message: str
) -> None:
    with pytest.raises(MediaUnavailable) as caught:
        await media.upload_url(ghost, remote.url + path, fetch_timeout=0.5)
    assert str(caught.value) == remote.url + message
    assert isinstance(caught.value, InvalidInput)


async def test_errors_show_no_password_nor_query(ghost: Intent, remote: RemoteFiles) -> None:
    port = remote.url.rsplit(":", 1)[1]
    url = f"http://bot:hunter2@127.0.0.1:{port}/missing?signature=s3cr3t#part"
    with pytest.raises(MediaUnavailable) as caught:
        await media.upload_url(ghost, url)
    assert str(caught.value) == f"http://127.0.0.1:{port}/missing?…: HTTP 404 Not Found"
    with pytest.raises(MediaTooLarge) as too_large:
        await media.upload_url(ghost, f"{remote.url}/files/x?token=s3cr3t", max_size=10)
    assert "s3cr3t" not in str(too_large.value)
    assert caught.value.__cause__ is None


async def test_an_unreachable_or_odd_url(ghost: Intent, remote: RemoteFiles) -> None:
    with pytest.raises(MediaUnavailable, match=r"^'file:///etc/passwd': not an http\(s\) URL$"):
        await media.upload_url(ghost, "file:///etc/passwd")
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    with pytest.raises(MediaUnavailable, match=f"^http://127.0.0.1:{port}/x: "):
        await media.upload_url(ghost, f"http://127.0.0.1:{port}/x")


async def chunks_of(data: bytes, size: int = 10_000) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


async def test_a_stream_uploads_with_and_without_its_size(ghost: Intent) -> None:
    sized = await media.upload_stream(ghost, chunks_of(SMALL), "image/png", size=len(SMALL))
    spooled = await media.upload_stream(ghost, chunks_of(SMALL), filename="x.bin")

    assert (sized.size, spooled.size) == (len(SMALL), len(SMALL))
    assert spooled.content_type == "application/octet-stream"
    assert await media.download(ghost, sized.mxc) == SMALL
    assert await media.download(ghost, spooled.mxc) == SMALL


async def test_an_oversized_stream_is_refused(ghost: Intent, client: HomeserverClient) -> None:
    recorder = Recorder()
    client.observers.append(recorder)
    with pytest.raises(MediaTooLarge, match="the stream is over the limit of 1000 bytes"):
        await media.upload_stream(ghost, chunks_of(SMALL), size=len(SMALL), max_size=1000)
    with pytest.raises(MediaTooLarge, match="the stream is over the limit of 1000 bytes"):
        await media.upload_stream(ghost, chunks_of(SMALL), max_size=1000)
    assert recorder.endpoints == []


async def test_a_download_stops_at_its_cap(ghost: Intent) -> None:
    uploaded = await media.upload_stream(ghost, chunks_of(SMALL), size=len(SMALL))
    received: list[Any] = []

    with pytest.raises(MediaTooLarge) as caught:
        async for chunk in media.download_stream(ghost, uploaded.mxc, max_size=100_000):
            received.append(chunk)

    assert str(caught.value).startswith(
        f"{uploaded.mxc} is over the limit of 100000 bytes; transfer stopped"
    )
    assert sum(len(chunk) for chunk in received) <= 100_000
    with pytest.raises(MediaTooLarge):
        await media.download(ghost, uploaded.mxc, max_size=len(SMALL) - 1)
    assert await media.download(ghost, uploaded.mxc, max_size=len(SMALL)) == SMALL


async def test_a_stream_longer_than_its_stated_size_is_stopped(ghost: Intent) -> None:
    with pytest.raises(MediaTooLarge, match=r"longer than its stated size"):
        await media.upload_stream(ghost, chunks_of(SMALL), size=50_000)


async def test_a_stream_shorter_than_its_stated_size_is_stopped(ghost: Intent) -> None:
    with pytest.raises(MediaUnavailable, match=r"ended after 150000 bytes, short of .* 200000$"):
        await media.upload_stream(ghost, chunks_of(SMALL), size=200_000)


async def test_a_streams_own_error_is_raised_as_it_is(ghost: Intent) -> None:
    class RemoteGone(Exception):
        pass

    async def breaks() -> AsyncIterator[bytes]:
        yield b"x" * 1000
        raise RemoteGone("the remote side hung up")

    with pytest.raises(RemoteGone):
        await media.upload_stream(ghost, breaks(), size=2000)

"""Hostile or broken input from the homeserver's side, and what we send it back
(issue 10, defects 3 to 7)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import pytest

from bridge_kit.server import create_app, serve_app
from bridge_kit.store import MemoryStore

HS_TOKEN = "hs-token-hostile"


@pytest.fixture
async def api_port() -> AsyncIterator[int]:
    async with MemoryStore() as store:
        runner = await serve_app(create_app(hs_token=HS_TOKEN, store=store), "127.0.0.1", 0)
        try:
            yield runner.addresses[0][1]
        finally:
            await runner.cleanup()


async def raw_request(port: int, head: bytes) -> tuple[bytes, bytes]:
    """Send ``head`` (request line and headers, as bytes) and read the whole reply."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head + b"Host: x\r\nConnection: close\r\n\r\n")
        await writer.drain()
        reply = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    status, _, rest = reply.partition(b"\r\n")
    return status, rest.partition(b"\r\n\r\n")[2]


# -- defect 4: an Authorization header that is not UTF-8 ---------------------------


@pytest.mark.parametrize(
    "header",
    [b"Bearer \xff\xfe", b"Bearer " + HS_TOKEN.encode() + b"\xff", b"Bearer \xed\xa0\x80"],
    ids=["latin-1", "valid-prefix", "encoded-surrogate"],
)
async def test_a_token_that_is_not_utf8_is_refused_with_one_log_line(
    api_port: int, header: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    status, body = await raw_request(
        api_port,
        b"GET /_matrix/app/v1/users/@_bk_a:test.local HTTP/1.1\r\nAuthorization: "
        + header
        + b"\r\n",
    )
    assert status == b"HTTP/1.1 403 Forbidden"
    assert b'"M_FORBIDDEN"' in body
    [record] = [r for r in caplog.records if r.name == "bridge_kit.server"]
    assert record.levelno == logging.WARNING and record.exc_info is None
    assert "\n" not in record.getMessage()
    assert "refused GET /_matrix/app/v1/users/" in record.getMessage()


async def test_a_refusal_log_line_never_shows_the_token_or_breaks_the_line(
    api_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    status, _ = await raw_request(
        api_port, b"GET /_matrix/app/v1/users/%0Afake%0Aline?access_token=guess HTTP/1.1\r\n"
    )
    assert status == b"HTTP/1.1 403 Forbidden"
    [record] = [r for r in caplog.records if r.name == "bridge_kit.server"]
    assert "\n" not in record.getMessage() and "guess" not in record.getMessage()


async def test_an_echoed_path_is_cut_short(api_port: int) -> None:
    long_id = "@_bk_" + "a" * 5000 + ":test.local"
    status, body = await raw_request(
        api_port,
        f"GET /_matrix/app/v1/users/{long_id} HTTP/1.1\r\n".encode()
        + f"Authorization: Bearer {HS_TOKEN}\r\n".encode(),
    )
    assert status == b"HTTP/1.1 404 Not Found"
    assert len(body) < 400

"""Hostile or broken input from the homeserver's side, and what we send it back
(issue 10, defects 3 to 7)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from bridge_kit import defaults
from bridge_kit.client.homeserver import HomeserverClient, quote_segment
from bridge_kit.errors import UnexpectedReply
from bridge_kit.inbox import transactions
from bridge_kit.inbox.records import InboxStats
from bridge_kit.inbox.transactions import split_transaction
from bridge_kit.intent import Intent
from bridge_kit.server.appservice_api import ThirdPartyHandlers, create_app, serve_app
from bridge_kit.store import MemoryStore, Store

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
    [record] = [r for r in caplog.records if r.name == "bridge_kit.server.appservice_api"]
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
    [record] = [r for r in caplog.records if r.name == "bridge_kit.server.appservice_api"]
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


# -- a homeserver stand-in that records what reaches it ------------------------------


class Recorder:
    """A real HTTP server that records each raw request path and answers ``reply``."""

    def __init__(self, reply: bytes = b'{"event_id": "$sent"}') -> None:
        self.reply = reply
        self.paths: list[str] = []
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def __aenter__(self) -> Recorder:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._record)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    async def _record(self, request: web.Request) -> web.Response:
        self.paths.append(request.raw_path)
        return web.Response(body=self.reply, content_type="application/json")


# -- defect 6: dot segments ----------------------------------------------------------


def test_dot_segments_are_encoded() -> None:
    assert quote_segment(".") == "%2E"
    assert quote_segment("..") == "%2E%2E"
    assert quote_segment("...") == "..."
    assert quote_segment("a.b") == "a.b"


async def test_dot_dot_room_and_type_do_not_climb_to_whoami() -> None:
    async with Recorder() as homeserver, HomeserverClient(homeserver.url, "as") as client:
        intent = Intent(client, "@_bk_bot:test.local", None)
        await intent.send_state("..", "..", {}, state_key="whoami")
        await intent.send_state("!room:test.local", ".", {}, state_key="..")
    first, second = (path.partition("?")[0] for path in homeserver.paths)
    assert first == "/_matrix/client/v3/rooms/%2E%2E/state/%2E%2E/whoami"
    assert second == "/_matrix/client/v3/rooms/%21room%3Atest.local/state/%2E/%2E%2E"


async def test_an_unquoted_path_from_a_caller_is_still_encoded() -> None:
    async with Recorder(b"{}") as homeserver, HomeserverClient(homeserver.url, "as") as client:
        await client.request("GET", "/_matrix/client/v3/some thing/é%2F")
    assert homeserver.paths[0].partition("?")[0] == "/_matrix/client/v3/some%20thing/%C3%A9%2F"


# -- defect 7: numbers that JSON cannot hold -------------------------------------------


@pytest.mark.parametrize("number", [b"1e999", b"-1e999", b"NaN", b"Infinity"])
async def test_a_reply_with_an_overflowing_number_is_refused(number: bytes) -> None:
    reply = b'{"user_id": "@_bk_bot:test.local", "n": ' + number + b"}"
    async with Recorder(reply) as homeserver, HomeserverClient(homeserver.url, "as") as client:
        with pytest.raises(UnexpectedReply, match="expected JSON"):
            await client.whoami()


async def test_a_request_body_with_nan_or_infinity_is_never_sent() -> None:
    async with Recorder() as homeserver, HomeserverClient(homeserver.url, "as") as client:
        intent = Intent(client, "@_bk_bot:test.local", None)
        for bad in (math.nan, math.inf, -math.inf):
            with pytest.raises(ValueError, match="Out of range float"):
                await intent.send_event("!r:test.local", "m.x", {"n": bad})
    assert homeserver.paths == []


async def test_a_hook_answering_nan_gets_a_500_not_invalid_json() -> None:
    async def protocol(name: str) -> dict[str, Any]:
        return {"instances": [], "weight": math.nan}

    async with MemoryStore() as store:
        app = create_app(
            hs_token=HS_TOKEN, store=store, thirdparty=ThirdPartyHandlers(protocol=protocol)
        )
        runner = await serve_app(app, "127.0.0.1", 0)
        try:
            status, body = await raw_request(
                runner.addresses[0][1],
                b"GET /_matrix/app/v1/thirdparty/protocol/irc HTTP/1.1\r\n"
                + f"Authorization: Bearer {HS_TOKEN}\r\n".encode(),
            )
        finally:
            await runner.cleanup()
    assert status == b"HTTP/1.1 500 Internal Server Error"
    assert b"NaN" not in body and json.loads(body)["errcode"] == "M_UNKNOWN"


# -- defect 3: transactions full of invalid items ---------------------------------------


@contextlib.asynccontextmanager
async def api(store: Store) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    async with TestClient(TestServer(create_app(hs_token=HS_TOKEN, store=store))) as client:
        yield client


async def put_transaction(
    client: TestClient[web.Request, web.Application], txn_id: str, body: bytes
) -> tuple[int, bytes]:
    response = await client.put(
        f"/_matrix/app/v1/transactions/{txn_id}",
        data=body,
        headers={"Authorization": f"Bearer {HS_TOKEN}"},
    )
    return response.status, await response.read()


async def test_more_items_than_any_homeserver_sends_are_refused_at_once() -> None:
    count = defaults.MAX_TRANSACTION_ITEMS + 1
    # Split between the events and the (unstable-named) ephemeral events: both count.
    body = json.dumps({"events": [1] * (count - 2), "de.sorunome.msc2409.ephemeral": [1, 1]})
    async with MemoryStore() as store, api(store) as client:
        started = time.process_time()
        status, reply = await put_transaction(client, "huge", body.encode())
        assert time.process_time() - started < 1.0
        assert status == 413 and len(reply) < 1024
        assert json.loads(reply)["errcode"] == "M_TOO_LARGE"
        assert await store.inbox_stats() == InboxStats(0, None, 0)


async def test_every_invalid_item_up_to_the_limit_is_set_aside_and_logged_briefly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="bridge_kit.inbox.transactions")
    count = defaults.MAX_TRANSACTION_ITEMS
    body = json.dumps({"events": [{"type": ["x"], "content": 5}] * count}).encode()
    async with MemoryStore() as store, api(store) as client:
        started = time.process_time()
        status, reply = await put_transaction(client, "invalid", body)
        seconds = time.process_time() - started
        assert (status, reply) == (200, b"{}")
        # Nothing lost: every item is a dead letter.
        assert (await store.inbox_stats()).dead_letters == count
    # About 0.2 s here; generous, for a busy machine.
    assert seconds < 3.0
    lines = [r for r in caplog.records if r.name == "bridge_kit.inbox.transactions"]
    assert len(lines) == 21
    assert f"{count - 20} more invalid items" in lines[-1].getMessage()


def test_a_dead_letters_error_is_cut_to_a_kilobyte(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transactions, "describe_error", lambda exc: "x" * 100_000)
    _, [letter] = split_transaction({"events": [{"type": 5}]})
    assert 100 < len(letter.error) <= 1024

"""Route tests of the appservice API: real HTTP on loopback, real Memory and SQLite stores.

Transactions are checked through the store: the route's job ends once the events
are in the inbox (handlers run later, see tests/test_inbox.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from yarl import URL

from bridge_kit.client.homeserver import ClientObserver
from bridge_kit.errors import ListenError
from bridge_kit.inbox.records import (
    Acceptance,
    InboxItem,
    InboxStats,
    ItemKind,
    NewDeadLetter,
    NewInboxItem,
)
from bridge_kit.inbox.transactions import TransactionProcessor
from bridge_kit.metrics import Metrics
from bridge_kit.server.appservice_api import (
    PROCESSOR_KEY,
    ThirdPartyHandlers,
    create_app,
    serve_app,
)
from bridge_kit.store import MemoryStore, Store, open_store

HS_TOKEN = "hs-token-for-route-tests"
AUTH = {"Authorization": f"Bearer {HS_TOKEN}"}
V1 = "/_matrix/app/v1"

Client = TestClient[web.Request, web.Application]


def event(n: int, room: str = "!room:test.local") -> dict[str, Any]:
    return {
        "type": "m.room.message",
        "event_id": f"$event{n}",
        "room_id": room,
        "sender": "@someone:test.local",
        "content": {"msgtype": "m.text", "body": f"message {n}"},
        "origin_server_ts": 1_700_000_000_000 + n,
    }


def txn_body(*numbers: int) -> dict[str, Any]:
    return {"events": [event(n) for n in numbers]}


class FlakyStore(MemoryStore):
    """A real MemoryStore whose first ``failures`` accepts fail, as a full disk would."""

    def __init__(self, failures: int = 1) -> None:
        super().__init__()
        self.failures = failures
        self.accept_calls = 0

    async def accept_transaction(
        self,
        txn_id: str,
        items: Sequence[NewInboxItem],
        rejected: Sequence[NewDeadLetter] = (),
        *,
        digest: bytes = b"",
    ) -> Acceptance:
        self.accept_calls += 1
        if self.failures:
            self.failures -= 1
            raise OSError("disk full")
        return await super().accept_transaction(txn_id, items, rejected, digest=digest)


class Wakeups:
    """An ``on_accepted`` callback that counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1


async def inbox_lanes(store: Store) -> dict[str, list[InboxItem]]:
    """Every lane of the inbox with its items in order, read the way a worker reads them."""
    owner = "test_server/reader"
    lanes = await store.claim_lanes(owner, 60.0, 10_000)
    found: dict[str, list[InboxItem]] = {}
    for lane in lanes:
        found[lane] = await store.lane_items(lane, 10_000)
        await store.release_lane(owner, lane)
    return found


def ids_by_lane(lanes: dict[str, list[InboxItem]]) -> dict[str, list[str | None]]:
    return {
        lane: [json.loads(item.event_json).get("event_id") for item in items]
        for lane, items in lanes.items()
    }


async def expect_nothing_stored(store: Store, txn_id: str) -> None:
    assert await store.inbox_stats() == InboxStats(0, None, 0)
    assert not await store.is_transaction_done(txn_id)


@pytest.fixture(params=["memory", "sqlite"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    url = "memory://" if request.param == "memory" else f"sqlite:///{tmp_path / 'bk.db'}"
    async with open_store(url) as opened:
        yield opened


@pytest.fixture
async def memory_store() -> AsyncIterator[Store]:
    async with MemoryStore() as opened:
        yield opened


@contextlib.asynccontextmanager
async def serve(app: web.Application) -> AsyncIterator[Client]:
    async with TestClient(TestServer(app)) as client:
        yield client


@contextlib.asynccontextmanager
async def serve_api(store: Store, **kwargs: Any) -> AsyncIterator[Client]:
    async with serve(create_app(hs_token=HS_TOKEN, store=store, **kwargs)) as client:
        yield client


def processor_of(client: Client) -> TransactionProcessor:
    app = client.app
    assert app is not None
    return app[PROCESSOR_KEY]


async def expect_error(response: aiohttp.ClientResponse, status: int, errcode: str) -> str:
    """Assert a Matrix JSON error reply; return its message."""
    assert response.status == status, await response.text()
    assert response.content_type == "application/json"
    body = await response.json()
    assert body["errcode"] == errcode, body
    assert isinstance(body["error"], str) and body["error"]
    return str(body["error"])


async def expect_ok(response: aiohttp.ClientResponse) -> None:
    assert response.status == 200, await response.text()
    assert response.content_type == "application/json"
    assert await response.json() == {}


# -- authentication ------------------------------------------------------------

AUTHED_ROUTES = [
    ("PUT", f"{V1}/transactions/auth1"),
    ("GET", f"{V1}/users/%40_bk_a%3Atest.local"),
    ("GET", f"{V1}/rooms/%23_bk_a%3Atest.local"),
    ("GET", f"{V1}/thirdparty/protocol/irc"),
    ("GET", f"{V1}/thirdparty/location/irc"),
    ("GET", f"{V1}/thirdparty/user/irc"),
    ("GET", f"{V1}/thirdparty/location?alias=%23a%3Ab"),
    ("GET", f"{V1}/thirdparty/user?userid=%40a%3Ab"),
    ("POST", f"{V1}/ping"),
    ("PUT", "/transactions/auth1"),
    ("GET", "/users/%40_bk_a%3Atest.local"),
    ("GET", "/rooms/%23_bk_a%3Atest.local"),
    ("GET", "/_matrix/app/unstable/thirdparty/protocol/irc"),
    ("GET", "/_matrix/app/unstable/thirdparty/user?userid=%40a%3Ab"),
]


def with_query(path: str, **params: str) -> URL:
    return URL(path, encoded=True).update_query(params)


@pytest.mark.parametrize(("method", "path"), AUTHED_ROUTES)
async def test_every_api_route_requires_a_token(
    memory_store: Store, method: str, path: str
) -> None:
    async with serve_api(memory_store) as client:
        body = txn_body(1) if method == "PUT" else None
        missing = await client.request(method, URL(path, encoded=True), json=body)
        await expect_error(missing, 401, "M_MISSING_TOKEN")
        wrong = await client.request(
            method, URL(path, encoded=True), json=body, headers={"Authorization": "Bearer nope"}
        )
        await expect_error(wrong, 403, "M_FORBIDDEN")
        wrong_query = await client.request(method, with_query(path, access_token="nope"), json=body)
        await expect_error(wrong_query, 403, "M_FORBIDDEN")
    await expect_nothing_stored(memory_store, "auth1")


async def test_bearer_header_and_legacy_query_token_are_both_accepted(
    memory_store: Store,
) -> None:
    async with serve_api(memory_store) as client:
        await expect_ok(await client.post(f"{V1}/ping", headers=AUTH))
        await expect_ok(await client.post(with_query(f"{V1}/ping", access_token=HS_TOKEN)))
        both = await client.post(with_query(f"{V1}/ping", access_token=HS_TOKEN), headers=AUTH)
        await expect_ok(both)


async def test_header_and_query_token_must_match(memory_store: Store) -> None:
    async with serve_api(memory_store) as client:
        right_header = await client.post(
            with_query(f"{V1}/ping", access_token="other"), headers=AUTH
        )
        message = await expect_error(right_header, 403, "M_FORBIDDEN")
        assert "differ" in message
        right_query = await client.post(
            with_query(f"{V1}/ping", access_token=HS_TOKEN),
            headers={"Authorization": "Bearer other"},
        )
        await expect_error(right_query, 403, "M_FORBIDDEN")


@pytest.mark.parametrize(
    ("header", "status", "errcode"),
    [
        ("Basic aGk6dGhlcmU=", 401, "M_MISSING_TOKEN"),
        ("Bearer ", 401, "M_MISSING_TOKEN"),
        ("Bearer", 401, "M_MISSING_TOKEN"),
        (f"bearer {HS_TOKEN}", 200, None),
        (f"Bearer {HS_TOKEN}x", 403, "M_FORBIDDEN"),
        ("Bearer tökén", 403, "M_FORBIDDEN"),
    ],
)
async def test_authorization_header_shapes(
    memory_store: Store, header: str, status: int, errcode: str | None
) -> None:
    async with serve_api(memory_store) as client:
        # aiohttp refuses non-latin-1 header values client-side, so send raw UTF-8 bytes.
        raw = header.encode().decode("latin-1")
        response = await client.post(f"{V1}/ping", headers={"Authorization": raw})
        if errcode is None:
            await expect_ok(response)
        else:
            await expect_error(response, status, errcode)


async def test_empty_query_token_is_missing(memory_store: Store) -> None:
    async with serve_api(memory_store) as client:
        response = await client.post(with_query(f"{V1}/ping", access_token=""))
        await expect_error(response, 401, "M_MISSING_TOKEN")


async def test_tokens_never_reach_the_logs(caplog: pytest.LogCaptureFixture) -> None:
    async def failing_query(user_id: str) -> bool:
        raise RuntimeError("query hook broke")

    caplog.set_level(logging.DEBUG)
    async with FlakyStore() as flaky, serve_api(flaky, on_user_query=failing_query) as client:
        url = with_query(f"{V1}/transactions/t1", access_token=HS_TOKEN)
        await expect_error(await client.put(url, json=txn_body(1)), 500, "M_UNKNOWN")
        url = with_query(f"{V1}/users/%40_bk_a%3Atest.local", access_token=HS_TOKEN)
        await expect_error(await client.get(url), 500, "M_UNKNOWN")
    # Our own log lines; serve_app runs without aiohttp's access log.
    ours = "\n".join(
        caplog.handler.format(record)
        for record in caplog.records
        if record.name.startswith("bridge_kit")
    )
    assert "disk full" in ours
    assert "query hook broke" in ours
    assert HS_TOKEN not in ours


# -- every reply is JSON -------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/"),
        ("GET", f"{V1}/nothing-here"),
        ("PUT", f"{V1}/transactions"),
        ("GET", "/_matrix/client/v3/sync"),
    ],
)
async def test_unknown_route_is_json_404_unrecognized(
    memory_store: Store, method: str, path: str
) -> None:
    async with serve_api(memory_store) as client:
        response = await client.request(method, path, headers=AUTH)
        await expect_error(response, 404, "M_UNRECOGNIZED")


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", f"{V1}/transactions/1"),
        ("POST", f"{V1}/transactions/1"),
        ("PUT", f"{V1}/users/%40a%3Ab"),
        ("GET", f"{V1}/ping"),
        ("DELETE", "/transactions/1"),
    ],
)
async def test_wrong_method_is_json_405_unrecognized(
    memory_store: Store, method: str, path: str
) -> None:
    async with serve_api(memory_store) as client:
        response = await client.request(method, URL(path, encoded=True), headers=AUTH)
        await expect_error(response, 405, "M_UNRECOGNIZED")
        assert "Allow" in response.headers


async def test_body_over_limit_by_content_length_is_413(memory_store: Store) -> None:
    async with serve_api(memory_store, max_body_bytes=1000) as client:
        big = json.dumps({"events": [event(1)], "padding": "x" * 5000}).encode()
        response = await client.put(f"{V1}/transactions/big", data=big, headers=AUTH)
        message = await expect_error(response, 413, "M_TOO_LARGE")
        assert "1000" in message
    await expect_nothing_stored(memory_store, "big")


async def test_chunked_body_over_limit_is_413(memory_store: Store) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield json.dumps({"events": [event(1)]}).encode()[:-1] + b', "padding": "'
        for _ in range(20):
            yield b"x" * 500
        yield b'"}'

    async with serve_api(memory_store, max_body_bytes=4000) as client:
        response = await client.put(f"{V1}/transactions/chunky", data=chunks(), headers=AUTH)
        assert response.request_info.headers.get("Transfer-Encoding") == "chunked"
        await expect_error(response, 413, "M_TOO_LARGE")
    await expect_nothing_stored(memory_store, "chunky")


async def test_body_at_the_limit_is_accepted(memory_store: Store) -> None:
    body = json.dumps(txn_body(1)).encode()
    async with serve_api(memory_store, max_body_bytes=len(body)) as client:
        await expect_ok(await client.put(f"{V1}/transactions/exact", data=body, headers=AUTH))
    assert (await memory_store.inbox_stats()).depth == 1


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b'{"events": [',
        b"\xff\xfe\xfa",
        b'{"events": [], "x": NaN}',
        b'{"events": [{"type": "m.x", "content": {"n": -Infinity}}]}',
        b"[" * 100_000 + b"]" * 100_000,
    ],
    ids=["empty", "text", "truncated", "binary", "nan", "infinity", "nested-too-deep"],
)
async def test_non_json_body_is_400_not_json(memory_store: Store, body: bytes) -> None:
    async with serve_api(memory_store) as client:
        response = await client.put(f"{V1}/transactions/bad", data=body, headers=AUTH)
        await expect_error(response, 400, "M_NOT_JSON")
    await expect_nothing_stored(memory_store, "bad")


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ([], "must be a JSON object, not an array"),
        ("events", "must be a JSON object, not a string"),
        (5, "must be a JSON object, not a number"),
        (None, "must be a JSON object, not null"),
        ({}, "must have an 'events' array (found none)"),
        ({"ephemeral": [event(1)]}, "must have an 'events' array (found none)"),
        ({"events": None}, "must have an 'events' array (found null)"),
        ({"events": {"a": 1}}, "must have an 'events' array (found an object)"),
        ({"events": "[]"}, "must have an 'events' array (found a string)"),
    ],
)
async def test_a_body_that_is_no_transaction_is_400_bad_json(
    store: Store, body: Any, expected: str
) -> None:
    wakeups = Wakeups()
    async with serve_api(store, on_accepted=wakeups) as client:
        data = json.dumps(body).encode()  # json=None would send no body at all
        response = await client.put(f"{V1}/transactions/bad", data=data, headers=AUTH)
        message = await expect_error(response, 400, "M_BAD_JSON")
        assert expected in message
        # Refused, not remembered: the same txnId with a real body is accepted.
        await expect_ok(await client.put(f"{V1}/transactions/bad", json=txn_body(1), headers=AUTH))
    assert wakeups.calls == 1
    assert ids_by_lane(await inbox_lanes(store)) == {"!room:test.local": ["$event1"]}
    assert (await store.inbox_stats()).dead_letters == 0


async def test_unexpected_exception_is_json_500_without_traceback(
    memory_store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(alias: str) -> bool:
        raise ZeroDivisionError("secret internals")

    async with serve_api(memory_store, on_alias_query=broken) as client:
        response = await client.get(f"{V1}/rooms/%23_bk_x%3Atest.local", headers=AUTH)
        message = await expect_error(response, 500, "M_UNKNOWN")
        text = await response.text()
    assert "secret" not in text and "Traceback" not in text and "ZeroDivision" not in text
    assert message == "Internal server error"
    assert "ZeroDivisionError: secret internals" in caplog.text


# -- transactions: into the inbox, once -------------------------------------

A, B = "!a:test.local", "!b:test.local"


def typing(room: str) -> dict[str, Any]:
    return {"type": "m.typing", "room_id": room, "content": {"user_ids": ["@x:test.local"]}}


def receipt(room: str) -> dict[str, Any]:
    return {"type": "m.receipt", "room_id": room, "content": {}}


async def test_events_land_in_the_inbox_in_order_per_lane(store: Store) -> None:
    wakeups = Wakeups()
    first = {
        "events": [event(1, A), event(2, B), event(3, A), event(4, A)],
        "de.sorunome.msc2409.ephemeral": [typing(A), receipt(B)],
        "org.matrix.msc3202.device_one_time_key_counts": {"@a:t": {"DEV": {"curve": 3}}},
    }
    second = {"events": [event(5, B), event(6, A)], "ephemeral": [typing(A)]}
    async with serve_api(store, on_accepted=wakeups) as client:
        response = await client.put(f"{V1}/transactions/1", json=first, headers=AUTH)
        await expect_ok(response)
        # The legacy path (no /_matrix/app/v1) is the same route.
        await expect_ok(await client.put("/transactions/2", json=second, headers=AUTH))
    lanes = await inbox_lanes(store)
    assert ids_by_lane(lanes) == {
        A: ["$event1", "$event3", "$event4", "$event6"],
        B: ["$event2", "$event5"],
        f"~ephemeral:{A}": [None, None],
        f"~ephemeral:{B}": [None],
        "~otk:@a:t|DEV": [None],  # one-time-key counts have a lane per device
    }
    assert {item.kind for item in lanes[A] + lanes[B]} == {ItemKind.EVENT}
    assert [item.kind for item in lanes["~otk:@a:t|DEV"]] == [ItemKind.OTK_COUNTS]
    ephemeral = lanes[f"~ephemeral:{A}"] + lanes[f"~ephemeral:{B}"]
    assert {item.kind for item in ephemeral} == {ItemKind.EPHEMERAL}
    assert [json.loads(i.event_json)["type"] for i in ephemeral] == ["m.typing"] * 2 + ["m.receipt"]
    # Each item is the event as the homeserver sent it, not a re-serialised model.
    assert json.loads(lanes[A][0].event_json) == event(1, A)
    assert all(item.attempts == 0 and item.done_handlers == () for item in lanes[A])
    stats = await store.inbox_stats()
    assert (stats.depth, stats.dead_letters) == (10, 0)
    assert await store.is_transaction_done("1") and await store.is_transaction_done("2")
    assert wakeups.calls == 2


async def test_an_empty_transaction_is_acknowledged_and_remembered(store: Store) -> None:
    wakeups = Wakeups()
    async with serve_api(store, on_accepted=wakeups) as client:
        url = f"{V1}/transactions/e"
        await expect_ok(await client.put(url, json={"events": []}, headers=AUTH))
        await expect_ok(await client.put(url, json={"events": []}, headers=AUTH))
    assert await store.inbox_stats() == InboxStats(0, None, 0)
    assert await store.is_transaction_done("e")
    assert wakeups.calls == 1


async def test_a_duplicate_is_acknowledged_without_storing_again(store: Store) -> None:
    metrics = Metrics()
    wakeups = Wakeups()
    async with serve_api(store, metrics=metrics, on_accepted=wakeups) as client:
        for _ in range(3):
            response = await client.put(f"{V1}/transactions/7", json=txn_body(1), headers=AUTH)
            await expect_ok(response)
        # The legacy path shares the dedup record.
        await expect_ok(await client.put("/transactions/7", json=txn_body(1), headers=AUTH))
    assert ids_by_lane(await inbox_lanes(store)) == {"!room:test.local": ["$event1"]}
    assert wakeups.calls == 1
    assert metric(metrics, "bridge_kit_duplicate_transactions_total") == 3
    assert metric(metrics, "bridge_kit_transactions_total") == 1
    assert metric(metrics, "bridge_kit_events_total") == 1
    assert metric(metrics, "bridge_kit_reused_txn_ids_total") == 0


async def test_concurrent_copies_of_a_transaction_are_stored_once(store: Store) -> None:
    wakeups = Wakeups()
    async with serve_api(store, on_accepted=wakeups) as client:

        async def put() -> aiohttp.ClientResponse:
            return await client.put(f"{V1}/transactions/42", json=txn_body(1, 2), headers=AUTH)

        for response in await asyncio.gather(*(put() for _ in range(8))):
            await expect_ok(response)
    assert ids_by_lane(await inbox_lanes(store)) == {"!room:test.local": ["$event1", "$event2"]}
    assert wakeups.calls == 1


async def test_dedup_survives_a_restart_with_sqlite(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'restart.db'}"
    async with open_store(url) as store, serve_api(store) as client:
        await expect_ok(await client.put(f"{V1}/transactions/1", json=txn_body(1), headers=AUTH))
    wakeups = Wakeups()
    async with open_store(url) as store, serve_api(store, on_accepted=wakeups) as client:
        await expect_ok(await client.put(f"{V1}/transactions/1", json=txn_body(1), headers=AUTH))
        assert wakeups.calls == 0
        await expect_ok(await client.put(f"{V1}/transactions/2", json=txn_body(2), headers=AUTH))
        assert wakeups.calls == 1
        lanes = ids_by_lane(await inbox_lanes(store))
    assert lanes == {"!room:test.local": ["$event1", "$event2"]}


MALFORMED_TS = {**event(1, A), "event_id": "$float_ts", "origin_server_ts": 1.0}


@pytest.mark.parametrize(
    ("body", "error", "letter_lane", "letter_json"),
    [
        pytest.param(
            {"events": [MALFORMED_TS, event(2, A)]},
            "origin_server_ts",
            A,
            MALFORMED_TS,
            id="float-origin_server_ts",
        ),
        pytest.param(
            {"events": [7, event(2, A)]},
            "events[0]",
            "~invalid",
            7,
            id="not-an-object",
        ),
        pytest.param(
            {"events": [{"content": {}}, event(2, A)]},
            "type",
            "~invalid",
            {"content": {}},
            id="no-type",
        ),
        pytest.param(
            {"events": [{"type": 1, "room_id": A}, event(2, A)]},
            "expected a string, got a number @ $.type",
            A,
            {"type": 1, "room_id": A},
            id="type-not-a-string",
        ),
        pytest.param(
            {"events": [event(2, A)], "ephemeral": 5},
            "'ephemeral' must be an array, not a number",
            "~invalid",
            5,
            id="ephemeral-not-a-list",
        ),
        pytest.param(
            {"events": [event(2, A)], "de.sorunome.msc2409.ephemeral": "x"},
            "'de.sorunome.msc2409.ephemeral' must be an array, not a string",
            "~invalid",
            "x",
            id="unstable-ephemeral-not-a-list",
        ),
    ],
)
async def test_a_malformed_item_becomes_a_dead_letter_and_the_rest_is_accepted(
    store: Store, body: dict[str, Any], error: str, letter_lane: str, letter_json: Any
) -> None:
    metrics = Metrics()
    async with serve_api(store, metrics=metrics) as client:
        await expect_ok(await client.put(f"{V1}/transactions/m", json=body, headers=AUTH))
        # Acknowledged, so a resend is a duplicate: the letter is not written twice.
        await expect_ok(await client.put(f"{V1}/transactions/m", json=body, headers=AUTH))
    assert ids_by_lane(await inbox_lanes(store)) == {A: ["$event2"]}
    [letter] = await store.dead_letters()
    assert error in letter.error
    assert letter.lane == letter_lane
    assert letter.kind is (ItemKind.EPHEMERAL if "ephemeral" in error else ItemKind.EVENT)
    assert json.loads(letter.event_json) == letter_json
    assert letter.handler is None
    assert letter.first_failed_at <= letter.last_failed_at
    assert metric(metrics, "bridge_kit_dead_lettered_total", reason="invalid") == 1
    assert metric(metrics, "bridge_kit_dead_lettered_total", reason="handler") == 0
    assert metric(metrics, "bridge_kit_transactions_total") == 1
    assert metric(metrics, "bridge_kit_events_total") == 1
    assert await store.is_transaction_done("m")


async def test_a_float_timestamp_dead_letter_keeps_its_ids(store: Store) -> None:
    async with serve_api(store) as client:
        body = {"events": [MALFORMED_TS]}
        await expect_ok(await client.put(f"{V1}/transactions/ts", json=body, headers=AUTH))
    [letter] = await store.dead_letters()
    assert (letter.event_id, letter.event_type) == ("$float_ts", "m.room.message")
    assert "expected an integer" in letter.error
    assert await store.inbox_stats() == InboxStats(0, None, 1)


async def test_a_number_too_large_for_a_float_is_a_dead_letter(store: Store) -> None:
    metrics = Metrics()
    good = json.dumps(event(2, A))
    raw = (
        '{"events": [{"type": "m.room.message", "room_id": "' + A + '", "event_id": "$huge",'
        ' "content": {"body": "big", "n": 1e999}}, ' + good + "]}"
    )
    async with serve_api(store, metrics=metrics) as client:
        response = await client.put(f"{V1}/transactions/huge", data=raw.encode(), headers=AUTH)
        await expect_ok(response)
    lanes = await inbox_lanes(store)
    assert ids_by_lane(lanes) == {A: ["$event2"]}
    assert "Infinity" not in lanes[A][0].event_json
    [letter] = await store.dead_letters()
    assert (letter.lane, letter.event_id) == (A, "$huge")
    assert "Out of range float" in letter.error
    # The letter's JSON is JSON: no "Infinity" that a replay would hand to a handler.
    assert "Infinity" not in letter.event_json
    assert isinstance(json.loads(letter.event_json), dict)
    assert metric(metrics, "bridge_kit_dead_lettered_total", reason="invalid") == 1


async def test_a_store_failure_is_500_and_the_retry_is_accepted_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    metrics = Metrics()
    wakeups = Wakeups()
    flaky = FlakyStore()
    async with flaky, serve_api(flaky, metrics=metrics, on_accepted=wakeups) as client:
        url = f"{V1}/transactions/d1"
        response = await client.put(url, json=txn_body(1, 2), headers=AUTH)
        message = await expect_error(response, 500, "M_UNKNOWN")
        assert "d1" in message
        assert "disk full" not in await response.text()
        await expect_nothing_stored(flaky, "d1")
        assert wakeups.calls == 0
        await expect_ok(await client.put(url, json=txn_body(1, 2), headers=AUTH))
        await expect_ok(await client.put(url, json=txn_body(1, 2), headers=AUTH))
        lanes = ids_by_lane(await inbox_lanes(flaky))
    assert lanes == {"!room:test.local": ["$event1", "$event2"]}
    assert flaky.accept_calls == 3
    assert wakeups.calls == 1
    assert "d1" in caplog.text and "disk full" in caplog.text
    assert metric(metrics, "bridge_kit_handler_failures_total") == 1
    assert metric(metrics, "bridge_kit_transactions_total") == 1
    assert metric(metrics, "bridge_kit_duplicate_transactions_total") == 1
    assert metric(metrics, "bridge_kit_events_total") == 2


async def test_not_accepting_transactions_is_503_and_stores_nothing(store: Store) -> None:
    wakeups = Wakeups()
    metrics = Metrics()
    async with serve_api(
        store, accept_transactions=False, on_accepted=wakeups, metrics=metrics
    ) as client:
        for path in (f"{V1}/transactions/s1", "/transactions/s1"):
            response = await client.put(path, json=txn_body(1), headers=AUTH)
            await expect_error(response, 503, "M_UNKNOWN")
        # The other routes still answer.
        await expect_ok(await client.post(f"{V1}/ping", headers=AUTH))
    await expect_nothing_stored(store, "s1")
    assert wakeups.calls == 0
    assert metric(metrics, "bridge_kit_transactions_total") == 0
    assert metric(metrics, "bridge_kit_duplicate_transactions_total") == 0
    # The homeserver's retry, once someone accepts, is a new transaction.
    async with serve_api(store) as client:
        await expect_ok(await client.put(f"{V1}/transactions/s1", json=txn_body(1), headers=AUTH))
    assert (await store.inbox_stats()).depth == 1


async def test_an_accept_waits_for_a_busy_sqlite_without_blocking_the_loop(
    tmp_path: Path,
) -> None:
    path = tmp_path / "busy.db"
    async with open_store(f"sqlite:///{path}") as store, serve_api(store) as client:
        other = sqlite3.connect(path, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")  # another writer holds the write lock
            url = f"{V1}/transactions/busy"
            putting = asyncio.create_task(client.put(url, json=txn_body(1), headers=AUTH))
            await asyncio.sleep(0.1)
            # The loop still serves other requests while the accept waits for the lock.
            health = await client.get("/_bridge_kit/health")
            assert health.status == 200
            assert not putting.done()
            other.execute("COMMIT")
            await expect_ok(await asyncio.wait_for(putting, 10))
        finally:
            other.close()
    async with open_store(f"sqlite:///{path}") as store:
        assert await store.is_transaction_done("busy")
        assert ids_by_lane(await inbox_lanes(store)) == {"!room:test.local": ["$event1"]}


async def test_dedup_records_are_pruned_in_the_background(store: Store) -> None:
    wakeups = Wakeups()
    async with serve_api(store, on_accepted=wakeups, prune_every=5, prune_keep=3) as client:
        for n in range(1, 11):
            response = await client.put(f"{V1}/transactions/{n}", json=txn_body(n), headers=AUTH)
            await expect_ok(response)
        await processor_of(client).wait_idle()
        done = [n for n in range(1, 11) if await store.is_transaction_done(str(n))]
        assert 3 <= len(done) < 10
        assert done == list(range(11 - len(done), 11))
        # A pruned id counts as new again (the homeserver's ids only count up).
        await expect_ok(await client.put(f"{V1}/transactions/1", json=txn_body(1), headers=AUTH))
    assert wakeups.calls == 11
    # Pruning the dedup records leaves the inbox alone.
    assert (await store.inbox_stats()).depth == 11


# -- queries -------------------------------------------------------------------


class QueryLog:
    def __init__(self, answer: bool) -> None:
        self.answer = answer
        self.asked: list[str] = []

    async def __call__(self, identifier: str) -> bool:
        self.asked.append(identifier)
        return self.answer


async def raw_get(client: Client, path: str) -> tuple[int, dict[str, Any]]:
    """GET with the path bytes exactly as given (aiohttp's client would normalise %40 to @)."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {client.host}\r\n"
        f"Authorization: Bearer {HS_TOKEN}\r\nConnection: close\r\n\r\n"
    )
    writer.write(request.encode())
    raw = await reader.read()
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ")[1])
    return status, json.loads(body)


@pytest.mark.parametrize("prefix", [V1, ""])
async def test_user_query_decodes_percent_encoded_ids(memory_store: Store, prefix: str) -> None:
    hook = QueryLog(answer=True)
    async with serve_api(memory_store, on_user_query=hook) as client:
        status, body = await raw_get(client, f"{prefix}/users/%40_bk_alice%3Atest.local")
        assert (status, body) == (200, {})
        status, _ = await raw_get(client, f"{prefix}/users/%40_bk_a%2Fb%3Dc%2Bd%3Atest.local")
        assert status == 200
        status, _ = await raw_get(client, f"{prefix}/users/@_bk_plain:test.local")
        assert status == 200
    assert hook.asked == [
        "@_bk_alice:test.local",
        "@_bk_a/b=c+d:test.local",
        "@_bk_plain:test.local",
    ]


async def test_user_query_no_or_no_hook_is_404_not_found(memory_store: Store) -> None:
    async with serve_api(memory_store, on_user_query=QueryLog(answer=False)) as client:
        response = await client.get(f"{V1}/users/%40_bk_x%3Atest.local", headers=AUTH)
        await expect_error(response, 404, "M_NOT_FOUND")
    async with serve_api(memory_store) as client:
        response = await client.get(f"{V1}/users/%40_bk_x%3Atest.local", headers=AUTH)
        await expect_error(response, 404, "M_NOT_FOUND")


@pytest.mark.parametrize("prefix", [V1, ""])
async def test_alias_query(memory_store: Store, prefix: str) -> None:
    yes, no = QueryLog(answer=True), QueryLog(answer=False)
    async with serve_api(memory_store, on_alias_query=yes) as client:
        status, body = await raw_get(client, f"{prefix}/rooms/%23_bk_room%3Atest.local")
        assert (status, body) == (200, {})
    async with serve_api(memory_store, on_alias_query=no) as client:
        status, body = await raw_get(client, f"{prefix}/rooms/%23_bk_room%3Atest.local")
        assert (status, body["errcode"]) == (404, "M_NOT_FOUND")
    async with serve_api(memory_store) as client:
        status, body = await raw_get(client, f"{prefix}/rooms/%23_bk_room%3Atest.local")
        assert (status, body["errcode"]) == (404, "M_NOT_FOUND")
    assert yes.asked == no.asked == ["#_bk_room:test.local"]


# -- third party ---------------------------------------------------------------

PROTOCOL = {
    "user_fields": ["network", "nickname"],
    "location_fields": ["network", "channel"],
    "icon": "mxc://example.org/icon",
    "field_types": {},
    "instances": [],
}


class ThirdPartyLog:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    async def protocol(self, protocol: str) -> dict[str, Any] | None:
        self.calls.append(("protocol", protocol))
        return PROTOCOL if protocol == "irc" else None

    async def location(self, protocol: str, fields: dict[str, str]) -> list[dict[str, Any]]:
        self.calls.append(("location", (protocol, fields)))
        return [{"alias": "#irc_chan:test.local", "protocol": protocol, "fields": fields}]

    async def user(self, protocol: str, fields: dict[str, str]) -> list[dict[str, Any]]:
        self.calls.append(("user", (protocol, fields)))
        return [{"userid": "@irc_bob:test.local", "protocol": protocol, "fields": fields}]

    async def location_by_alias(self, alias: str) -> list[dict[str, Any]]:
        self.calls.append(("location_by_alias", alias))
        return []

    async def user_by_id(self, user_id: str) -> list[dict[str, Any]]:
        self.calls.append(("user_by_id", user_id))
        return [{"userid": user_id, "protocol": "irc", "fields": {"nickname": "bob"}}]

    def handlers(self) -> ThirdPartyHandlers:
        return ThirdPartyHandlers(
            protocol=self.protocol,
            location=self.location,
            user=self.user,
            location_by_alias=self.location_by_alias,
            user_by_id=self.user_by_id,
        )


@pytest.mark.parametrize("prefix", [V1, "/_matrix/app/unstable"])
async def test_thirdparty_routes_call_their_hooks(memory_store: Store, prefix: str) -> None:
    hooks = ThirdPartyLog()
    base = f"{prefix}/thirdparty"
    async with serve_api(memory_store, thirdparty=hooks.handlers()) as client:
        response = await client.get(f"{base}/protocol/irc", headers=AUTH)
        assert response.status == 200 and await response.json() == PROTOCOL
        await expect_error(
            await client.get(f"{base}/protocol/xmpp", headers=AUTH), 404, "M_NOT_FOUND"
        )
        location = with_query(
            f"{base}/location/irc", network="libera", channel="#x", access_token=HS_TOKEN
        )
        response = await client.get(location)
        assert (await response.json())[0]["fields"] == {"network": "libera", "channel": "#x"}
        response = await client.get(with_query(f"{base}/user/irc", nickname="bob"), headers=AUTH)
        assert (await response.json())[0]["userid"] == "@irc_bob:test.local"
        response = await client.get(with_query(f"{base}/location", alias="#a:b"), headers=AUTH)
        await expect_error(response, 404, "M_NOT_FOUND")  # the hook found nothing
        response = await client.get(with_query(f"{base}/user", userid="@x:b"), headers=AUTH)
        assert (await response.json())[0]["userid"] == "@x:b"
    assert hooks.calls == [
        ("protocol", "irc"),
        ("protocol", "xmpp"),
        ("location", ("irc", {"network": "libera", "channel": "#x"})),
        ("user", ("irc", {"nickname": "bob"})),
        ("location_by_alias", "#a:b"),
        ("user_by_id", "@x:b"),
    ]


@pytest.mark.parametrize(
    "path",
    [
        f"{V1}/thirdparty/protocol/irc",
        f"{V1}/thirdparty/location/irc",
        f"{V1}/thirdparty/user/irc",
        f"{V1}/thirdparty/location?alias=%23a%3Ab",
        f"{V1}/thirdparty/user?userid=%40a%3Ab",
    ],
)
async def test_thirdparty_route_without_hook_is_404(memory_store: Store, path: str) -> None:
    async with serve_api(memory_store) as client:
        response = await client.get(URL(path, encoded=True), headers=AUTH)
        await expect_error(response, 404, "M_NOT_FOUND")


@pytest.mark.parametrize(("path", "param"), [("location", "alias"), ("user", "userid")])
async def test_thirdparty_lookup_without_its_parameter_is_400(
    memory_store: Store, path: str, param: str
) -> None:
    hooks = ThirdPartyLog()
    async with serve_api(memory_store, thirdparty=hooks.handlers()) as client:
        response = await client.get(f"{V1}/thirdparty/{path}", headers=AUTH)
        message = await expect_error(response, 400, "M_MISSING_PARAM")
        assert param in message
    assert hooks.calls == []


async def test_thirdparty_hook_returning_the_wrong_shape_is_500(memory_store: Store) -> None:
    async def not_a_list(protocol: str, fields: dict[str, str]) -> Any:
        return {"oops": True}

    handlers = ThirdPartyHandlers(user=not_a_list)
    async with serve_api(memory_store, thirdparty=handlers) as client:
        response = await client.get(f"{V1}/thirdparty/user/irc", headers=AUTH)
        await expect_error(response, 500, "M_UNKNOWN")


# -- ping, health, metrics -----------------------------------------------------


async def test_ping_answers_empty_object(memory_store: Store) -> None:
    async with serve_api(memory_store) as client:
        ping = f"{V1}/ping"
        await expect_ok(await client.post(ping, json={"transaction_id": None}, headers=AUTH))
        await expect_ok(await client.post(ping, json={"transaction_id": "abc"}, headers=AUTH))
        await expect_ok(await client.post(ping, headers=AUTH))
        response = await client.post(ping, data=b"{nope", headers=AUTH)
        await expect_error(response, 400, "M_NOT_JSON")


async def test_health_needs_no_token(memory_store: Store) -> None:
    async with serve_api(memory_store) as client:
        response = await client.get("/_bridge_kit/health")
        assert response.status == 200 and await response.json() == {"status": "ok"}
    state = {"status": "starting", "store": "sqlite"}
    async with serve_api(memory_store, health=lambda: state) as client:
        response = await client.get("/_bridge_kit/health")
        assert response.status == 503 and await response.json() == state
        state["status"] = "ok"
        response = await client.get("/_bridge_kit/health")
        assert response.status == 200 and await response.json() == state


def metric(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def test_metrics_route_serves_the_counters() -> None:
    metrics = Metrics()
    async with FlakyStore() as flaky, serve_api(flaky, metrics=metrics) as client:
        url = f"{V1}/transactions/m1"
        body = {"events": [event(1), event(2), {"type": "m.x", "origin_server_ts": "soon"}]}
        for _ in range(3):  # 500 (the store failed), accepted, duplicate
            await client.put(url, json=body, headers=AUTH)
        metrics.set_inbox(await flaky.inbox_stats())
        metrics.on_response("POST", "/_matrix/client/v3/register", 200, None, 0.02)
        metrics.on_response("POST", "/_matrix/client/v3/register", 400, "M_USER_IN_USE", 0.01)
        response = await client.get("/metrics")
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = await response.text()
    expected = [
        "bridge_kit_transactions_total 1.0",
        "bridge_kit_events_total 2.0",
        "bridge_kit_duplicate_transactions_total 1.0",
        "bridge_kit_handler_failures_total 1.0",
        'bridge_kit_dead_lettered_total{reason="invalid"} 1.0',
        "bridge_kit_inbox_events 2.0",
        "bridge_kit_dead_letters 1.0",
        "bridge_kit_transaction_seconds_count 1.0",
        "bridge_kit_puppets_registered_total 1.0",
        "bridge_kit_register_latency_seconds_count 2.0",
        'bridge_kit_homeserver_errors_total{errcode="M_USER_IN_USE"} 1.0',
    ]
    for line in expected:
        assert line in text, line


async def test_metrics_route_is_absent_without_metrics(memory_store: Store) -> None:
    async with serve_api(memory_store) as client:
        await expect_error(await client.get("/metrics"), 404, "M_UNRECOGNIZED")


def test_metrics_is_a_client_observer_with_its_own_registry() -> None:
    first, second = Metrics(), Metrics()
    assert isinstance(first, ClientObserver)
    first.on_response("GET", "/_matrix/client/v3/account/whoami", 401, "M_UNKNOWN_TOKEN", 0.01)
    first.on_response("PUT", "/_matrix/client/v3/rooms/{roomId}/send", 502, None, 0.5)
    first.on_rate_limited(1.5)
    first.on_retry("HTTP 502", 0.25)
    assert metric(first, "bridge_kit_homeserver_errors_total", errcode="M_UNKNOWN_TOKEN") == 1
    assert metric(first, "bridge_kit_homeserver_errors_total", errcode="HTTP_502") == 1
    assert metric(first, "bridge_kit_rate_limited_total") == 1
    assert metric(first, "bridge_kit_retries_total", reason="HTTP 502") == 1
    assert metric(first, "bridge_kit_puppets_registered_total") == 0
    assert metric(second, "bridge_kit_homeserver_errors_total", errcode="M_UNKNOWN_TOKEN") == 0


# -- serving -------------------------------------------------------------------


async def test_serve_app_writes_no_access_log_that_could_hold_a_token(
    memory_store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    app = create_app(hs_token=HS_TOKEN, store=memory_store)
    runner = await serve_app(app, "127.0.0.1", 0)
    caplog.set_level(logging.DEBUG)
    try:
        port = runner.addresses[0][1]
        url = URL(f"http://127.0.0.1:{port}{V1}/ping").with_query(access_token=HS_TOKEN)
        async with aiohttp.ClientSession() as session, session.post(url) as response:
            assert response.status == 200
    finally:
        await runner.cleanup()
    assert HS_TOKEN not in caplog.text
    assert not [r for r in caplog.records if r.name == "aiohttp.access"]


async def test_a_taken_port_is_a_listen_error_not_a_traceback(memory_store: Store) -> None:
    app = create_app(hs_token="hs", store=memory_store)
    runner = await serve_app(app, "127.0.0.1", 0)
    try:
        port = runner.addresses[0][1]
        second = create_app(hs_token="hs", store=memory_store)
        with pytest.raises(ListenError, match=f"cannot listen on 127.0.0.1:{port}"):
            await serve_app(second, "127.0.0.1", port)
    finally:
        await runner.cleanup()

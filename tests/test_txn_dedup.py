"""Transaction dedup on txnId + body digest, its retention, and the 413 of a body too large.

Synapse on SQLite numbers its transactions from 1 again after a restart, so a txnId
seen before may come with a new body; the store tests run on all three backends.
The Synapse restart itself is in ``tests/test_txn_restart_synapse.py``.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bridge_kit import defaults
from bridge_kit.inbox.records import Acceptance, ItemKind, NewInboxItem
from bridge_kit.inbox.transactions import TransactionProcessor, body_digest
from bridge_kit.metrics import Metrics
from bridge_kit.store import PostgresStore, SQLiteStore, Store, open_store
from tests.test_server import (
    AUTH,
    V1,
    event,
    expect_error,
    expect_ok,
    ids_by_lane,
    inbox_lanes,
    metric,
    processor_of,
    serve_api,
    txn_body,
)
from tests.test_store import backend_url, emptied, run_sql

ROOM = "!room:test.local"


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def any_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return backend_url(request, tmp_path)


@pytest.fixture(params=["sqlite", "postgres"])
def durable_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return backend_url(request, tmp_path)


@pytest.fixture
async def store(any_url: str) -> AsyncIterator[Store]:
    async with open_store(await emptied(any_url)) as opened:
        yield opened


def item(n: int) -> NewInboxItem:
    return NewInboxItem(ROOM, ItemKind.EVENT, json.dumps(event(n)))


async def depth(store: Store) -> int:
    return (await store.inbox_stats()).depth


# -- the store ------------------------------------------------------------------------------


async def test_the_same_txn_id_and_digest_is_a_duplicate(store: Store) -> None:
    assert await store.accept_transaction("1", [item(1)], digest=b"a") is Acceptance.NEW
    assert await store.accept_transaction("1", [item(1)], digest=b"a") is Acceptance.DUPLICATE
    assert await depth(store) == 1


async def test_the_same_txn_id_with_another_digest_is_a_new_transaction(store: Store) -> None:
    assert await store.accept_transaction("1", [item(1)], digest=b"a") is Acceptance.NEW
    assert await store.accept_transaction("1", [item(2)], digest=b"b") is Acceptance.REUSED_ID
    # Its resend is a duplicate now.
    assert await store.accept_transaction("1", [item(2)], digest=b"b") is Acceptance.DUPLICATE
    assert await depth(store) == 2


async def test_a_transaction_marked_done_matches_any_digest(store: Store) -> None:
    await store.mark_transaction_done("m")
    assert await store.accept_transaction("m", [item(1)], digest=b"x") is Acceptance.DUPLICATE
    assert await depth(store) == 0


async def test_concurrent_copies_with_a_digest_are_accepted_once(store: Store) -> None:
    calls = [store.accept_transaction("c", [item(1)], digest=b"d") for _ in range(5)]
    results = await asyncio.gather(*calls)
    assert sorted(results) == [Acceptance.DUPLICATE] * 4 + [Acceptance.NEW]
    assert await depth(store) == 1


async def test_a_reused_txn_id_is_the_newest_record_when_pruning(store: Store) -> None:
    for txn_id in ["1", "2", "3"]:
        await store.accept_transaction(txn_id, [], digest=b"old")
    await store.accept_transaction("1", [], digest=b"new")
    assert await store.prune_transactions(keep=1) == 2
    assert await store.is_transaction_done("1")
    assert not await store.is_transaction_done("3")


async def wait_for_clock_past(moment: float) -> None:
    """Until this process's clock reads later than ``moment`` (Unix time)."""
    deadline = time.monotonic() + 10
    while time.time() <= moment:
        assert time.monotonic() < deadline, "the clock did not move"
        await asyncio.sleep(0.01)


async def test_records_older_than_the_max_age_are_pruned_below_the_count(store: Store) -> None:
    for txn_id in ["old1", "old2"]:
        await store.accept_transaction(txn_id, [], digest=b"o")
    old_done = time.time()
    await wait_for_clock_past(old_done + 0.5)
    for txn_id in ["new1", "new2"]:
        await store.accept_transaction(txn_id, [], digest=b"n")
    assert await store.prune_transactions(keep=100, max_age=3600) == 0
    # Records as old as old_done + 0.25 go: the old ones, not the new ones.
    assert await store.prune_transactions(keep=100, max_age=time.time() - old_done - 0.25) == 2
    found = [await store.is_transaction_done(t) for t in ["old1", "old2", "new1", "new2"]]
    assert found == [False, False, True, True]


# -- migration from version 4 ---------------------------------------------------------------


async def test_a_version_4_database_is_migrated_to_digests(durable_url: str) -> None:
    url = await emptied(durable_url)
    sqlite = url.startswith("sqlite:")
    cls = SQLiteStore if sqlite else PostgresStore
    add = (
        "INSERT INTO bridge_kit_transactions (txn_id, seq, done_at) VALUES ('{}', {}, 0)"
        if sqlite
        else "INSERT INTO bridge_kit_transactions (txn_id) VALUES (convert_to('{}', 'UTF8'))"
    )
    await run_sql(
        url,
        *[statement for step in cls.MIGRATIONS[:4] for statement in step],
        "CREATE TABLE bridge_kit_schema (version INTEGER NOT NULL)",
        "INSERT INTO bridge_kit_schema (version) VALUES (4)",
        *(add.format(txn_id, seq) for seq, txn_id in enumerate(["1", "2", "3"], start=1)),
    )
    async with open_store(url) as store:
        assert await store.schema_version() == Store.SCHEMA_VERSION
        # Only the newest record without a digest is kept, and it matches any body: the
        # homeserver may resend the transaction it sent last, never older ones.
        assert await store.accept_transaction("3", [item(3)], digest=b"x") is Acceptance.DUPLICATE
        assert await store.accept_transaction("1", [item(1)], digest=b"y") is Acceptance.NEW
        assert await store.accept_transaction("1", [item(1)], digest=b"y") is Acceptance.DUPLICATE
        assert await store.accept_transaction("1", [item(4)], digest=b"z") is Acceptance.REUSED_ID
        assert await depth(store) == 2


# -- the digest -----------------------------------------------------------------------------


def synapse_body(*numbers: int, age: int = 10) -> dict[str, Any]:
    """A body shaped like Synapse's first send of a transaction."""
    events = [event(n) | {"unsigned": {"age": age}} for n in numbers]
    return {
        "events": events,
        "ephemeral": [{"type": "m.typing", "room_id": ROOM, "content": {"user_ids": []}}],
        "de.sorunome.msc2409.to_device": [{"type": "m.dummy", "content": {}}],
    }


def test_a_synapse_retry_has_the_digest_of_the_first_send() -> None:
    # A retry comes from Synapse's database: the same events, serialised anew (a later
    # age), and none of the ephemeral or to-device parts.
    first = synapse_body(1, 2)
    retry = {"events": synapse_body(1, 2, age=90_000)["events"], "ephemeral": []}
    retry["events"][0]["content"] = {}  # redacted since
    assert body_digest(retry) == body_digest(first)


@pytest.mark.parametrize(
    "other",
    [
        synapse_body(1, 3),
        synapse_body(2, 1),
        synapse_body(1),
        {"events": [], "ephemeral": synapse_body(1)["ephemeral"]},
    ],
)
def test_other_events_make_another_digest(other: dict[str, Any]) -> None:
    assert body_digest(other) != body_digest(synapse_body(1, 2))


def test_a_body_without_events_is_known_by_the_rest_in_any_key_order() -> None:
    typing: dict[str, Any] = {
        "type": "m.typing",
        "room_id": ROOM,
        "content": {"user_ids": ["@a:x"]},
    }
    body: dict[str, Any] = {"events": [], "ephemeral": [typing]}
    reordered = {"ephemeral": [dict(reversed(typing.items()))], "events": []}
    assert body_digest(body) == body_digest(reordered)
    other = copy.deepcopy(body)
    other["ephemeral"][0]["content"]["user_ids"] = ["@b:x"]
    assert body_digest(other) != body_digest(body)


def test_events_without_an_event_id_are_known_by_their_json() -> None:
    def body(text: str, age: int) -> dict[str, Any]:
        return {"events": [{"type": "m.room.message", "body": text, "unsigned": {"age": age}}]}

    assert body_digest(body("a", 1)) == body_digest(body("a", 2))
    assert body_digest(body("a", 1)) != body_digest(body("b", 1))


# -- the route ------------------------------------------------------------------------------


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[Store]:
    async with open_store(f"sqlite:///{tmp_path / 'bk.db'}") as opened:
        yield opened


async def test_reused_txn_ids_are_stored_and_logged_once(
    sqlite_store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    metrics = Metrics()
    caplog.set_level(logging.WARNING, "bridge_kit.inbox.transactions")
    async with serve_api(sqlite_store, metrics=metrics) as client:
        for n in range(1, 6):
            response = await client.put(f"{V1}/transactions/{n}", json=txn_body(n), headers=AUTH)
            await expect_ok(response)
        # A homeserver restarted: its numbers begin at 1 again, with new events.
        for n in range(1, 6):
            body = synapse_body(100 + n)
            await expect_ok(await client.put(f"{V1}/transactions/{n}", json=body, headers=AUTH))
            # ... and a retry of it, with a later age and without its ephemeral part.
            retry = {"events": synapse_body(100 + n, age=5000)["events"]}
            await expect_ok(await client.put(f"{V1}/transactions/{n}", json=retry, headers=AUTH))
    lanes = ids_by_lane(await inbox_lanes(sqlite_store))
    assert lanes[ROOM] == [f"$event{n}" for n in [1, 2, 3, 4, 5, 101, 102, 103, 104, 105]]
    assert metric(metrics, "bridge_kit_reused_txn_ids_total") == 5
    assert metric(metrics, "bridge_kit_duplicate_transactions_total") == 5
    reused = [r for r in caplog.records if "came before with another body" in r.getMessage()]
    assert len(reused) == 1
    assert reused[0].levelno == logging.WARNING


async def test_the_processor_prunes_by_age_when_traffic_is_low(
    sqlite_store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Far from prune_every transactions: the time since the last prune makes it due.
    monkeypatch.setattr(defaults, "DEDUP_PRUNE_INTERVAL", 0.0)
    processor = TransactionProcessor(sqlite_store, prune_every=1000, prune_max_age=1.0)
    await processor.process("1", txn_body(1))
    await processor.wait_idle()
    await wait_for_clock_past(time.time() + 1.5)
    await processor.process("2", txn_body(2))
    await processor.wait_idle()
    assert not await sqlite_store.is_transaction_done("1")
    assert await sqlite_store.is_transaction_done("2")


# -- the body limit -------------------------------------------------------------------------


def largest_synapse_transaction() -> dict[str, Any]:
    """As large as Synapse makes one (synapse/appservice/scheduler.py): 100 events of
    64 KiB, each with a 64 KiB ``prev_content``, 100 ephemeral events and 100 to-device
    messages of 64 KiB."""
    pad = "x" * (64 * 1024 - 300)
    events = [
        event(n) | {"content": {"body": pad}, "unsigned": {"age": 1, "prev_content": {"p": pad}}}
        for n in range(100)
    ]
    ephemeral = [
        {"type": "m.receipt", "room_id": ROOM, "content": {"$e": {"pad": pad}}} for _ in range(100)
    ]
    to_device = [
        {"type": "m.room.encrypted", "sender": "@a:x", "to_user_id": "@_bk_b:test.local",
         "to_device_id": "D", "content": {"ciphertext": pad}}
        for _ in range(100)
    ]  # fmt: skip
    return {
        "events": events,
        "ephemeral": ephemeral,
        "de.sorunome.msc2409.ephemeral": ephemeral,
        "de.sorunome.msc2409.to_device": to_device,
    }


async def test_the_default_limit_takes_synapses_largest_transaction(sqlite_store: Store) -> None:
    body = json.dumps(largest_synapse_transaction()).encode()
    assert len(body) > 20 * 1024 * 1024  # the old default (10 MiB) refused it for ever
    async with serve_api(sqlite_store) as client:
        await expect_ok(await client.put(f"{V1}/transactions/big", data=body, headers=AUTH))
    assert await depth(sqlite_store) == 100 + 100 + 100
    assert len(body) * 1.5 < defaults.MAX_BODY_BYTES, "headroom"


async def test_a_413_is_logged_once_counted_and_kept_for_health(
    sqlite_store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    metrics = Metrics()
    caplog.set_level(logging.ERROR, "bridge_kit.inbox.transactions")
    big = json.dumps({"events": [event(1)], "padding": "x" * 5000}).encode()
    async with serve_api(sqlite_store, metrics=metrics, max_body_bytes=1000) as client:
        for _ in range(3):  # the homeserver resends it
            response = await client.put(f"{V1}/transactions/big", data=big, headers=AUTH)
            await expect_error(response, 413, "M_TOO_LARGE")
        processor = processor_of(client)
    assert metric(metrics, "bridge_kit_refused_transactions_total", reason="body") == 3
    assert processor.refusals == 3
    assert processor.last_refusal is not None
    assert (processor.last_refusal.txn_id, processor.last_refusal.reason) == ("big", "body")
    refused = [r for r in caplog.records if "refused with 413" in r.getMessage()]
    assert len(refused) == 1
    assert "1000" in refused[0].getMessage()
    assert await depth(sqlite_store) == 0


async def test_too_many_items_is_a_413_counted_as_items(sqlite_store: Store) -> None:
    metrics = Metrics()
    body = {"events": [event(n) for n in range(defaults.MAX_TRANSACTION_ITEMS + 1)]}
    async with serve_api(sqlite_store, metrics=metrics) as client:
        response = await client.put(f"{V1}/transactions/many", json=body, headers=AUTH)
        await expect_error(response, 413, "M_TOO_LARGE")
        assert processor_of(client).last_refusal is not None
    assert metric(metrics, "bridge_kit_refused_transactions_total", reason="items") == 1

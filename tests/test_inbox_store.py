"""The durable inbox, run against every backend: memory, SQLite and a real PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import pytest

from bridge_kit.errors import StoreError
from bridge_kit.inbox.records import InboxItem, InboxStats, ItemKind, NewDeadLetter, NewInboxItem
from bridge_kit.store import (
    PostgresStore,
    SQLiteStore,
    Store,
    open_store,
    postgres_inbox,
    sqlite_inbox,
)
from tests.test_server import AUTH, V1, Wakeups, expect_ok, serve_api, txn_body
from tests.test_store import backend_url, emptied, run_sql

A, B, C = "!a:test.local", "!b:test.local", "!c:test.local"
LEASE = 30.0
SHORT_LEASE = 0.3  # for the tests that wait for a lease to run out


# Synchronous, as in test_store: the PostgreSQL fixture is looked up outside the loop.
@pytest.fixture(params=["memory", "sqlite", "postgres"])
def any_backend(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return backend_url(request, tmp_path)


@pytest.fixture(params=["sqlite", "postgres"])
def durable_backend(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return backend_url(request, tmp_path)


@pytest.fixture(params=["memory", "postgres"])
def shared_backend(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return backend_url(request, tmp_path)


@pytest.fixture
async def url(any_backend: str) -> str:
    """The URL of an empty store, one per backend."""
    return await emptied(any_backend)


@pytest.fixture
async def durable_url(durable_backend: str) -> str:
    return await emptied(durable_backend)


@pytest.fixture
async def store(url: str) -> AsyncIterator[Store]:
    async with open_store(url) as opened:
        yield opened


def event(n: int, lane: str = A, kind: ItemKind = ItemKind.EVENT) -> NewInboxItem:
    return NewInboxItem(lane, kind, json.dumps({"event_id": f"$e{n}", "room_id": lane}))


def letter(n: int, lane: str = A, **changes: object) -> NewDeadLetter:
    fields: dict[str, object] = {
        "lane": lane,
        "kind": ItemKind.EVENT,
        "event_json": json.dumps({"event_id": f"$d{n}"}),
        "error": f"broken {n}",
    }
    return NewDeadLetter(**(fields | changes))  # type: ignore[arg-type]


def event_ids(items: list[InboxItem]) -> list[str]:
    return [json.loads(item.event_json)["event_id"] for item in items]


async def fill(store: Store, *lanes: str) -> None:
    """One transaction per lane given, one event each, in that order."""
    for n, lane in enumerate(lanes):
        assert await store.accept_transaction(f"fill{n}", [event(n, lane)])


async def only_item(store: Store, lane: str) -> InboxItem:
    items = await store.lane_items(lane, 10)
    assert len(items) == 1
    return items[0]


# -- accepting transactions ---------------------------------------------------------------


async def test_accept_writes_items_and_rejected_letters(store: Store) -> None:
    before = time.time()
    rejected = letter(9, B, handler="bridge.on_message", attempts=2, event_id="$d9", event_type="x")
    items = [event(1, A), event(2, B, ItemKind.EPHEMERAL), event(3, A)]
    assert await store.accept_transaction("t1", items, [rejected])
    after = time.time()

    assert await store.is_transaction_done("t1")
    in_a = await store.lane_items(A, 10)
    assert event_ids(in_a) == ["$e1", "$e3"]
    first = in_a[0]
    assert (first.lane, first.kind, first.event_json) == (A, ItemKind.EVENT, items[0].event_json)
    assert before <= first.received_at <= after
    assert (first.attempts, first.done_handlers, first.not_before) == (0, (), 0.0)
    assert first.first_failed_at is None
    [ephemeral] = await store.lane_items(B, 10)
    assert ephemeral.kind is ItemKind.EPHEMERAL

    [dead] = await store.dead_letters()
    assert (dead.lane, dead.kind, dead.event_json) == (B, ItemKind.EVENT, rejected.event_json)
    assert (dead.error, dead.handler, dead.attempts) == ("broken 9", "bridge.on_message", 2)
    assert (dead.event_id, dead.event_type) == ("$d9", "x")
    assert before <= dead.first_failed_at == dead.last_failed_at <= after
    assert (await store.inbox_stats()).depth == 3


async def test_a_rejected_letter_keeps_its_first_failure(store: Store) -> None:
    await store.accept_transaction("t1", [], [letter(1, first_failed_at=1000.0)])
    [dead] = await store.dead_letters()
    assert dead.first_failed_at == 1000.0
    assert dead.last_failed_at > 1000.0


async def test_a_transaction_is_accepted_once(store: Store) -> None:
    assert await store.accept_transaction("t1", [event(1)], [letter(1)])
    assert not await store.accept_transaction("t1", [event(2)], [letter(2)])
    assert event_ids(await store.lane_items(A, 10)) == ["$e1"]
    assert await store.inbox_stats() == InboxStats(1, (await only_item(store, A)).received_at, 1)
    # The dedup table is the one mark_transaction_done writes.
    await store.mark_transaction_done("t2")
    assert not await store.accept_transaction("t2", [event(3)])
    assert (await store.inbox_stats()).depth == 1


async def test_concurrent_duplicates_are_accepted_exactly_once(store: Store) -> None:
    items = [event(n, lane) for n, lane in enumerate([A, B, A, C])]
    calls = [store.accept_transaction("dup", items, [letter(1)]) for _ in range(5)]
    results = await asyncio.gather(*calls)
    assert sorted(results) == [False] * 4 + [True]
    stats = await store.inbox_stats()
    assert (stats.depth, stats.dead_letters) == (4, 1)


async def test_an_empty_transaction_is_recorded(store: Store) -> None:
    assert await store.accept_transaction("empty", [])
    assert await store.is_transaction_done("empty")
    assert await store.inbox_stats() == InboxStats(0, None, 0)


async def test_accepting_is_one_commit(durable_url: str) -> None:
    async with open_store(durable_url) as store:
        pass
    # The database refuses the letter, which is written last: nothing else may stay.
    refuse = (
        "CREATE TRIGGER refuse BEFORE INSERT ON bridge_kit_dead_letters"
        " WHEN NEW.error = 'boom' BEGIN SELECT RAISE(ABORT, 'refused'); END"
        if durable_url.startswith("sqlite:")
        else "ALTER TABLE bridge_kit_dead_letters ADD CONSTRAINT refuse CHECK (error <> 'boom')"
    )
    await run_sql(durable_url, refuse)
    async with open_store(durable_url) as store:
        with pytest.raises(StoreError):
            await store.accept_transaction("t1", [event(1)], [letter(1, error="boom")])
        assert not await store.is_transaction_done("t1")
        assert await store.inbox_stats() == InboxStats(0, None, 0)
        assert await store.accept_transaction("t1", [event(1)], [letter(1)])


async def test_items_keep_arrival_order_within_a_lane(store: Store) -> None:
    await store.accept_transaction("t1", [event(1, A), event(2, B), event(3, A)])
    await store.accept_transaction("t2", [event(4, B), event(5, A)])
    in_a = await store.lane_items(A, 10)
    assert event_ids(in_a) == ["$e1", "$e3", "$e5"]
    assert [item.id for item in in_a] == sorted(item.id for item in in_a)
    assert event_ids(await store.lane_items(A, 2)) == ["$e1", "$e3"]
    assert event_ids(await store.lane_items(B, 10)) == ["$e2", "$e4"]
    assert await store.lane_items(C, 10) == []
    assert await store.lane_items(A, 0) == []
    with pytest.raises(ValueError, match="limit must be >= 0"):
        await store.lane_items(A, -1)


# -- claiming lanes -----------------------------------------------------------------------


async def test_claims_take_the_lane_with_the_oldest_item_first(store: Store) -> None:
    await fill(store, B, C, A, B)
    assert await store.claim_lanes("w1", LEASE, limit=2) == [B, C]
    assert await store.claim_lanes("w2", LEASE, limit=5) == [A]
    assert await store.claim_lanes("w3", LEASE, limit=5) == []
    assert await store.claim_lanes("w3", LEASE, limit=0) == []


async def test_a_lane_whose_head_went_is_ordered_by_its_new_head(store: Store) -> None:
    await fill(store, A, B, A)
    await store.complete_item((await store.lane_items(A, 1))[0].id)
    assert await store.claim_lanes("w1", LEASE, limit=5) == [B, A]


async def test_claims_skip_excluded_lanes(store: Store) -> None:
    await fill(store, A, B, C)
    assert await store.claim_lanes("w1", LEASE, limit=2, exclude={A}) == [B, C]
    assert await store.claim_lanes("w1", LEASE, limit=1, exclude=[B, "!other:x"]) == [A]


async def test_a_sqlite_claim_that_finds_nothing_takes_no_write_lock(tmp_path: Path) -> None:
    # While a room floods, the inbox looks for lanes after every accepted transaction
    # and finds none; the acknowledgements must not wait for those looks.
    path = tmp_path / "store.db"
    async with SQLiteStore(path) as store:
        await fill(store, A)
        assert await store.claim_lanes("w1", LEASE, limit=5) == [A]
        writer = sqlite3.connect(path, isolation_level=None)
        try:
            writer.execute("BEGIN IMMEDIATE")  # another connection holds the write lock
            async with asyncio.timeout(1):  # a write transaction would wait 5 s, then fail
                assert await store.claim_lanes("w1", LEASE, limit=5, exclude={A}) == []
                assert await store.claim_lanes("w2", LEASE, limit=5) == []
            writer.execute("ROLLBACK")
        finally:
            writer.close()
        assert await store.claim_lanes("w1", LEASE, limit=5) == [A]


async def test_a_live_lease_keeps_other_owners_out_until_it_runs_out(store: Store) -> None:
    await fill(store, A, B)
    assert await store.claim_lanes("w1", SHORT_LEASE, limit=1) == [A]
    assert await store.claim_lanes("w2", LEASE, limit=5) == [B]
    assert await store.claim_lanes("w3", LEASE, limit=5) == []
    await asyncio.sleep(SHORT_LEASE * 1.5)
    # w1 died: its lane is free again, and w3 takes it over.
    assert await store.claim_lanes("w3", LEASE, limit=5) == [A]
    assert await store.renew_lanes("w1", [A], LEASE) == set()


async def test_claiming_a_held_lane_again_renews_it(store: Store) -> None:
    await fill(store, A)
    assert await store.claim_lanes("w1", SHORT_LEASE, limit=1) == [A]
    assert await store.claim_lanes("w1", LEASE, limit=1) == [A]
    await asyncio.sleep(SHORT_LEASE * 1.5)
    assert await store.claim_lanes("w2", LEASE, limit=1) == []


async def test_a_lane_is_not_claimed_before_its_head_is_due(store: Store) -> None:
    await fill(store, A, B)
    head = await only_item(store, A)
    await store.fail_item(head.id, [], time.time() + 0.3)
    assert await store.claim_lanes("w1", LEASE, limit=5) == [B]
    await asyncio.sleep(0.4)
    assert await store.claim_lanes("w1", LEASE, limit=5) == [A, B]


async def test_only_the_head_decides_whether_a_lane_is_due(store: Store) -> None:
    await store.accept_transaction("t1", [event(1, A), event(2, A)])
    second = (await store.lane_items(A, 2))[1]
    await store.fail_item(second.id, [], time.time() + 60)
    assert await store.claim_lanes("w1", LEASE, limit=5) == [A]


async def test_renew_returns_only_the_lanes_still_held(store: Store) -> None:
    await fill(store, A, B)
    assert await store.claim_lanes("w1", SHORT_LEASE, limit=2) == [A, B]
    await asyncio.sleep(SHORT_LEASE * 1.5)
    assert await store.claim_lanes("w2", LEASE, limit=1) == [A]
    # B ran out too, but nobody took it: w1 still holds it.
    assert await store.renew_lanes("w1", [A, B, C], LEASE) == {B}
    await asyncio.sleep(SHORT_LEASE * 1.5)
    assert await store.claim_lanes("w3", LEASE, limit=5) == []
    assert await store.renew_lanes("w1", [], LEASE) == set()


async def test_release_frees_a_lane_for_others(store: Store) -> None:
    await fill(store, A)
    assert await store.claim_lanes("w1", LEASE, limit=1) == [A]
    await store.release_lane("w2", A)  # not w2's to release
    await store.release_lane("w1", B)  # nor held at all
    assert await store.claim_lanes("w2", LEASE, limit=1) == []
    await store.release_lane("w1", A)
    assert await store.claim_lanes("w2", LEASE, limit=1) == [A]
    assert await store.renew_lanes("w1", [A], LEASE) == set()


async def test_an_emptied_lane_is_claimable_again_when_events_arrive(store: Store) -> None:
    await fill(store, A)
    assert await store.claim_lanes("w1", LEASE, limit=1) == [A]
    await store.complete_item((await only_item(store, A)).id)
    await store.release_lane("w1", A)
    assert await store.claim_lanes("w2", LEASE, limit=1) == []
    await store.accept_transaction("later", [event(7, A)])
    assert await store.claim_lanes("w2", LEASE, limit=1) == [A]


# -- a claim costs O(ready lanes) (schema version 5's lane rows) ---------------------------

#: Lanes that wait while a claim looks for work: leased elsewhere, or their head deferred.
LEASED_ELSEWHERE, DEFERRED = 3_000, 300


async def make_lanes_wait(store: Store, ready: tuple[str, ...]) -> None:
    """Many lanes that wait, besides the ``ready`` ones (which stay ready)."""
    lanes = [f"!waiting{n:05}:test.local" for n in range(LEASED_ELSEWHERE + DEFERRED)]
    await store.accept_transaction("waiting", [event(n, lane) for n, lane in enumerate(lanes)])
    leased = await store.claim_lanes("elsewhere", 3_600, LEASED_ELSEWHERE, exclude=ready)
    assert len(leased) == LEASED_ELSEWHERE
    for lane in await store.claim_lanes("deferring", 3_600, DEFERRED, exclude=ready):
        head = await only_item(store, lane)
        await store.fail_item(head.id, [], time.time() + 3_600, count_attempt=False)
        await store.release_lane("deferring", lane)


def sqlite_claim_steps(path: Path) -> int:
    """The SQLite VM instructions the claim's read takes (rows read, and more)."""
    steps = 0

    def count() -> int:
        nonlocal steps
        steps += 1
        return 0

    with sqlite3.connect(path) as conn:
        conn.set_progress_handler(count, 1)
        parameters = {"now": time.time(), "owner": "w1", "limit": 32}
        assert len(conn.execute(sqlite_inbox.CLAIMABLE, parameters).fetchall()) == 3
    return steps


async def test_a_sqlite_claim_reads_only_the_ready_lanes(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    async with SQLiteStore(path) as store:
        await fill(store, A, B, C)
        alone = sqlite_claim_steps(path)
        await make_lanes_wait(store, (A, B, C))
        among_waiting = sqlite_claim_steps(path)
        with sqlite3.connect(path) as conn:
            parameters = {"now": time.time(), "owner": "w1", "limit": 32}
            plan = [
                row[3]
                for row in conn.execute(f"EXPLAIN QUERY PLAN {sqlite_inbox.CLAIMABLE}", parameters)
            ]
        assert await store.claim_lanes("w1", LEASE, limit=32) == [A, B, C]
    # 3,300 lanes more cost (nearly) nothing: the waiting ones are never visited.
    assert among_waiting < alone * 1.5, (alone, among_waiting)
    assert any("USING INDEX bridge_kit_lanes_ready" in step for step in plan), plan
    assert any("USING INDEX bridge_kit_lanes_owner" in step for step in plan), plan
    assert not [step for step in plan if step.startswith("SCAN bridge_kit_")], plan


def plan_nodes(node: dict[str, Any]) -> list[dict[str, Any]]:
    return [node, *(n for child in node.get("Plans", []) for n in plan_nodes(child))]


async def test_a_postgres_claim_reads_only_the_ready_lanes(postgres_dsn: str) -> None:
    dsn = await emptied(postgres_dsn)
    async with PostgresStore(dsn) as store:
        await fill(store, A, B, C)
        await make_lanes_wait(store, (A, B, C))
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute("ANALYZE bridge_kit_lanes")
            await conn.execute("ANALYZE bridge_kit_inbox")
            # EXPLAIN ANALYZE runs the claim: rolled back, so the lanes stay free.
            transaction = conn.transaction()
            await transaction.start()
            explained = json.loads(
                await conn.fetchval(
                    f"EXPLAIN (ANALYZE, FORMAT JSON) {postgres_inbox.TAKE_LEASES}",
                    time.time(),
                    [],
                    "w1",
                    32,
                    time.time() + LEASE,
                )
            )[0]
            await transaction.rollback()
        finally:
            await conn.close()
        assert await store.claim_lanes("w1", LEASE, limit=32) == [A, B, C]
    nodes = [
        node for node in plan_nodes(explained["Plan"])
        if node.get("Relation Name") in ("bridge_kit_lanes", "bridge_kit_inbox")
    ]  # fmt: skip
    assert nodes
    assert not [node for node in nodes if node["Node Type"] == "Seq Scan"], nodes
    # Rows read from either table, over all loops: the 3 ready lanes and their heads,
    # not the 3,300 waiting ones.
    read = max(node["Actual Rows"] * node["Actual Loops"] for node in nodes)
    assert read <= 3, nodes
    indexes = {node.get("Index Name") for node in plan_nodes(explained["Plan"])}
    assert "bridge_kit_lanes_ready" in indexes, indexes


async def test_an_emptied_lane_s_row_goes_when_it_is_released(durable_url: str) -> None:
    async with open_store(durable_url) as store:
        await fill(store, A, B, B)
        assert await store.claim_lanes("w1", LEASE, limit=2) == [A, B]
        await store.complete_item((await only_item(store, A)).id)
        await store.release_lane("w1", A)
        await store.release_lane("w1", B)
    rows = await run_sql(durable_url, "SELECT lane, owner, lease_until FROM bridge_kit_lanes")
    assert rows == [(B, None, 0)]  # A is gone; B waits for the next claim


async def test_a_postgres_release_keeps_the_row_of_a_lane_getting_items(postgres_dsn: str) -> None:
    """An accept adds to a lane while its worker releases it empty: the release waits
    for the accept's row lock, then sees its items, and keeps the lane's row."""
    dsn = await emptied(postgres_dsn)
    async with PostgresStore(dsn) as store:
        await fill(store, A)
        assert await store.claim_lanes("w1", LEASE, limit=1) == [A]
        await store.complete_item((await only_item(store, A)).id)
        accepting = await asyncpg.connect(dsn)
        watcher = await asyncpg.connect(dsn)
        try:
            async with accepting.transaction():
                # The accept's own statement, its commit held back.
                await postgres_inbox.accept(accepting, b"late", [event(2, A)], [], time.time())
                release = asyncio.ensure_future(store.release_lane("w1", A))
                await until_waiting_for_a_lock(watcher)
                assert not release.done()
            await release
        finally:
            await accepting.close()
            await watcher.close()
        assert await store.claim_lanes("w2", LEASE, limit=1) == [A]
        assert event_ids(await store.lane_items(A, 5)) == ["$e2"]


async def until_waiting_for_a_lock(conn: Any) -> None:
    async with asyncio.timeout(10):
        while not await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND wait_event_type = 'Lock'"
        ):
            await asyncio.sleep(0.01)


async def test_a_version_4_database_gets_a_row_per_lane(durable_url: str) -> None:
    sqlite = durable_url.startswith("sqlite:")
    store_class = SQLiteStore if sqlite else PostgresStore
    v4 = [statement for step in store_class.MIGRATIONS[:4] for statement in step]
    later = time.time() + 3_600
    add_item = (
        "INSERT INTO bridge_kit_inbox (lane, kind, event_json, received_at, not_before)"
        " VALUES ('{}', 'event', '{{\"event_id\": \"${}\"}}', 0, {})"
    )
    add_lease = "INSERT INTO bridge_kit_lanes (lane, owner, lease_until) VALUES ('{}', 'old', {})"
    await run_sql(
        durable_url,
        *v4,
        "CREATE TABLE bridge_kit_schema (version INTEGER NOT NULL)",
        "INSERT INTO bridge_kit_schema (version) VALUES (4)",
        add_item.format(A, "a1", 0),
        add_item.format(A, "a2", 0),
        add_item.format(B, "b1", later),  # B's head waits for a retry
        add_item.format(C, "c1", 0),
        # C is leased by a live process; D's lease outlived its items.
        add_lease.format(C, later),
        add_lease.format("!d:x", later),
    )
    async with open_store(durable_url) as store:
        assert await store.schema_version() == store.SCHEMA_VERSION
        assert await store.claim_lanes("w1", LEASE, limit=5) == [A]
        assert await store.renew_lanes("old", [C], LEASE) == {C}
    rows = await run_sql(
        durable_url, "SELECT lane, owner, not_before FROM bridge_kit_lanes ORDER BY lane"
    )
    assert rows == [(A, "w1", 0), (B, None, later), (C, "old", 0)]


async def test_two_postgres_processes_never_claim_the_same_lane(postgres_dsn: str) -> None:
    dsn = await emptied(postgres_dsn)
    lanes = [f"!room{n:02}:test.local" for n in range(40)]
    async with PostgresStore(dsn) as first, PostgresStore(dsn) as second:
        for start in range(0, 40, 10):
            items = [event(n, lane) for n, lane in enumerate(lanes[start : start + 10])]
            await first.accept_transaction(f"t{start}", items)
        claims = [
            store.claim_lanes(owner, LEASE, limit=3)
            for _ in range(15)
            for store, owner in ((first, "p1"), (second, "p2"))
        ]
        results = await asyncio.gather(*claims)
        got_1 = {lane for result in results[0::2] for lane in result}
        got_2 = {lane for result in results[1::2] for lane in result}
        assert not got_1 & got_2
        assert got_1 and got_2
        # Whatever SKIP LOCKED passed over is still there for the taking.
        got_1.update(await first.claim_lanes("p1", LEASE, limit=40))
        assert got_1 | got_2 == set(lanes)
        assert not got_1 & got_2
    rows = await run_sql(dsn, "SELECT lane, owner FROM bridge_kit_lanes")
    assert {lane for lane, owner in rows if owner == "p2"} == got_2


async def test_a_postgres_claim_passes_over_a_lane_being_claimed(postgres_dsn: str) -> None:
    dsn = await emptied(postgres_dsn)
    async with PostgresStore(dsn) as store:
        await fill(store, A, B)
        conn = await asyncpg.connect(dsn)
        try:
            async with conn.transaction():
                # As a concurrent claim does between locking A's row and leasing it.
                await conn.execute("SELECT FROM bridge_kit_lanes WHERE lane = $1 FOR UPDATE", A)
                async with asyncio.timeout(5):
                    assert await store.claim_lanes("w1", LEASE, limit=2) == [B]
        finally:
            await conn.close()
        assert await store.claim_lanes("w1", LEASE, limit=2) == [A, B]


# -- items: complete, fail, bury ----------------------------------------------------------


async def test_complete_removes_the_item(store: Store) -> None:
    await store.accept_transaction("t1", [event(1), event(2)])
    first, second = await store.lane_items(A, 10)
    await store.complete_item(first.id)
    await store.complete_item(first.id)  # twice is harmless
    await store.complete_item(10_000)  # and so is an unknown id
    assert await store.lane_items(A, 10) == [second]


async def test_complete_items_removes_them_in_one_call(store: Store) -> None:
    await store.accept_transaction("t1", [event(n) for n in range(5)])
    await store.accept_transaction("t2", [event(9, B)])
    items = await store.lane_items(A, 10)
    [other] = await store.lane_items(B, 10)
    await store.complete_items([items[0].id, items[2].id, items[0].id, 10_000])
    assert await store.lane_items(A, 10) == [items[1], *items[3:]]
    await store.complete_items([])  # nothing to do
    await store.complete_items([item.id for item in items])  # done ones are skipped
    assert await store.lane_items(A, 10) == []
    assert await store.lane_items(B, 10) == [other]


async def test_complete_items_takes_more_ids_than_one_statement_holds(store: Store) -> None:
    # SQLite's statement takes at most 500 variables: more go in several, in one commit.
    await store.accept_transaction("t1", [event(n) for n in range(1_200)])
    items = await store.lane_items(A, 2_000)
    await store.complete_items([item.id for item in items[:1_100]])
    assert await store.lane_items(A, 2_000) == items[1_100:]
    assert (await store.inbox_stats()).depth == 100


async def test_sqlite_marks_handled_items_and_deletes_them_in_bulk(tmp_path: Path) -> None:
    """SQLite lists a handled item's id in bridge_kit_done and deletes the items in bulk
    later: meanwhile the item is gone for every inbox method."""
    path = tmp_path / "store.db"
    url = f"sqlite:///{path}"
    async with SQLiteStore(path) as store:
        await store.accept_transaction("t1", [event(1, A), event(2, A), event(3, A), event(4, B)])
        first, second, third = await store.lane_items(A, 5)
        await store.complete_items([first.id, second.id, 10_000])  # 10_000: no such item
        assert await run_sql(url, "SELECT id FROM bridge_kit_done ORDER BY id") == [
            (first.id,),
            (second.id,),
        ]
        assert await run_sql(url, "SELECT COUNT(*) FROM bridge_kit_inbox") == [(4,)]
        assert await store.lane_items(A, 5) == [third]
        assert (await store.inbox_stats()).depth == 2
        # A handled item can be neither failed nor buried (a worker that lost its lease).
        await store.fail_item(first.id, [], time.time() + 3_600)
        await store.bury_item(second.id, letter(1))
        assert await store.dead_letters() == []
        assert await store.claim_lanes("w1", LEASE, limit=5) == [A, B]
        await store.complete_items([third.id])
        await store.release_lane("w1", A)  # empty now: its row goes
        await store.lock_for_daemon()  # deletes the handled items, as a checkpoint does
        assert await run_sql(url, "SELECT COUNT(*) FROM bridge_kit_done") == [(0,)]
        assert await run_sql(url, "SELECT lane FROM bridge_kit_inbox") == [(B,)]
        assert await run_sql(url, "SELECT lane FROM bridge_kit_lanes") == [(B,)]


async def test_sqlite_deletes_handled_items_with_its_checkpoints(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    url = f"sqlite:///{path}"
    async with SQLiteStore(path) as store:
        await store.accept_transaction("t1", [event(n, A) for n in range(150)])
        for item in await store.lane_items(A, 150):
            await store.complete_items([item.id])  # one commit each, as the inbox does
        async with asyncio.timeout(10):
            while (await run_sql(url, "SELECT COUNT(*) FROM bridge_kit_inbox"))[0][0] > 50:
                await asyncio.sleep(0.01)
        assert await store.lane_items(A, 5) == []


async def test_failing_counts_attempts_and_keeps_the_first_failure(store: Store) -> None:
    await store.accept_transaction("t1", [event(1)])
    item = await only_item(store, A)
    before = time.time()
    await store.fail_item(item.id, ["h1"], 1.5)
    failed = await only_item(store, A)
    assert (failed.attempts, failed.done_handlers, failed.not_before) == (1, ("h1",), 1.5)
    assert failed.first_failed_at is not None
    assert before <= failed.first_failed_at <= time.time()
    await store.fail_item(item.id, ["h1", "h2"], 2.5)
    again = await only_item(store, A)
    assert (again.attempts, again.done_handlers, again.not_before) == (2, ("h1", "h2"), 2.5)
    assert again.first_failed_at == failed.first_failed_at
    assert (again.id, again.event_json, again.received_at) == (
        item.id,
        item.event_json,
        item.received_at,
    )
    await store.fail_item(10_000, ["h"], 0)  # an unknown id is harmless


async def test_burying_moves_an_item_to_the_dead_letters(store: Store) -> None:
    await store.accept_transaction("t1", [event(1), event(2)])
    first, second = await store.lane_items(A, 10)
    before = time.time()
    buried = letter(1, error="Traceback ...", handler="h", attempts=5, first_failed_at=100.0)
    await store.bury_item(first.id, buried)
    assert await store.lane_items(A, 10) == [second]
    [dead] = await store.dead_letters()
    assert (dead.lane, dead.error, dead.handler, dead.attempts) == (A, "Traceback ...", "h", 5)
    assert dead.event_json == buried.event_json
    assert dead.first_failed_at == 100.0
    assert before <= dead.last_failed_at <= time.time()


async def test_a_buried_letter_without_a_first_failure_takes_the_items(store: Store) -> None:
    await store.accept_transaction("t1", [event(1), event(2)])
    failed, fresh = await store.lane_items(A, 10)
    await store.fail_item(failed.id, [], 0)
    first_failure = (await store.lane_items(A, 1))[0].first_failed_at
    await store.bury_item(failed.id, letter(1))
    await store.bury_item(fresh.id, letter(2))
    one, two = await store.dead_letters()
    assert one.first_failed_at == first_failure
    assert two.first_failed_at == two.last_failed_at  # never failed before: now


async def test_burying_an_item_that_is_gone_writes_no_letter(store: Store) -> None:
    await store.accept_transaction("t1", [event(1)])
    item = await only_item(store, A)
    await store.complete_item(item.id)
    await store.bury_item(item.id, letter(1))
    assert await store.dead_letters() == []


async def test_ids_are_never_reused(store: Store) -> None:
    # A worker whose lease ran out may still complete its item; that must not hit a newer one.
    await store.accept_transaction("t1", [event(1)], [letter(1)])
    item = await only_item(store, A)
    [dead] = await store.dead_letters()
    await store.complete_item(item.id)
    await store.drop_dead_letters([dead.id])
    await store.accept_transaction("t2", [event(2)], [letter(2)])
    assert (await only_item(store, A)).id > item.id
    assert (await store.dead_letters())[0].id > dead.id


# -- dead letters -------------------------------------------------------------------------


async def test_dead_letters_come_oldest_first(store: Store) -> None:
    await store.accept_transaction("t1", [], [letter(1), letter(2, B)])
    await store.accept_transaction("t2", [event(3)], [letter(3)])
    await store.bury_item((await only_item(store, A)).id, letter(4))
    letters = await store.dead_letters()
    assert [dead.error for dead in letters] == ["broken 1", "broken 2", "broken 3", "broken 4"]
    assert [dead.id for dead in letters] == sorted(dead.id for dead in letters)
    assert [dead.error for dead in await store.dead_letters(limit=2)] == ["broken 1", "broken 2"]
    assert await store.dead_letters(limit=0) == []


async def test_replay_puts_letters_back_at_the_end_of_their_lanes(store: Store) -> None:
    await store.accept_transaction("t1", [event(1, A), event(2, B)], [letter(7, B), letter(8, A)])
    await store.accept_transaction("t2", [event(3, A)], [letter(9, A)])
    seven, eight, nine = await store.dead_letters()
    before = time.time()
    assert await store.replay_dead_letters([nine.id, seven.id, 10_000]) == 2
    assert [dead.id for dead in await store.dead_letters()] == [eight.id]
    assert event_ids(await store.lane_items(B, 10)) == ["$e2", "$d7"]
    in_a = await store.lane_items(A, 10)
    assert event_ids(in_a) == ["$e1", "$e3", "$d9"]
    replayed = in_a[-1]
    assert (replayed.kind, replayed.event_json) == (nine.kind, nine.event_json)
    assert (replayed.attempts, replayed.done_handlers, replayed.not_before) == (0, (), 0.0)
    assert replayed.first_failed_at is None
    assert replayed.received_at == nine.received_at  # kept: retention reads it
    assert before > replayed.received_at
    assert replayed.id > max(item.id for item in await store.lane_items(B, 10))


async def test_replaying_all_keeps_the_letters_order(store: Store) -> None:
    await store.accept_transaction("t1", [], [letter(n) for n in range(5)])
    assert await store.replay_dead_letters() == 5
    assert await store.dead_letters() == []
    assert event_ids(await store.lane_items(A, 10)) == [f"$d{n}" for n in range(5)]
    assert await store.replay_dead_letters() == 0


async def test_dropping_dead_letters(store: Store) -> None:
    await store.accept_transaction("t1", [], [letter(n) for n in range(4)])
    zero, one, _, _ = await store.dead_letters()
    assert await store.drop_dead_letters([one.id, zero.id, 10_000]) == 2
    assert [dead.error for dead in await store.dead_letters()] == ["broken 2", "broken 3"]
    assert await store.drop_dead_letters([]) == 0
    assert await store.drop_dead_letters() == 2
    assert await store.dead_letters() == []
    assert (await store.inbox_stats()).depth == 0


async def test_inbox_stats(store: Store) -> None:
    assert await store.inbox_stats() == InboxStats(0, None, 0)
    await store.accept_transaction("t1", [event(1, A), event(2, B)], [letter(1)])
    oldest = (await only_item(store, A)).received_at
    await asyncio.sleep(0.01)
    await store.accept_transaction("t2", [event(3, C)], [letter(2)])
    assert await store.inbox_stats() == InboxStats(3, oldest, 2)
    await store.complete_item((await only_item(store, A)).id)
    stats = await store.inbox_stats()
    assert stats.depth == 2
    assert stats.oldest_received_at == (await only_item(store, B)).received_at


async def test_a_closed_store_refuses_inbox_work(url: str) -> None:
    store = open_store(url)
    with pytest.raises(StoreError, match="not open"):
        await store.accept_transaction("t1", [event(1)])
    with pytest.raises(StoreError, match="not open"):
        await store.claim_lanes("w1", LEASE, limit=1)
    with pytest.raises(StoreError, match="not open"):
        await store.inbox_stats()


# -- NUL, which PostgreSQL text cannot hold -----------------------------------------------


async def test_a_txn_id_with_nul_is_deduplicated(store: Store) -> None:
    assert await store.accept_transaction("a\x00b", [event(1)])
    assert await store.is_transaction_done("a\x00b")
    assert not await store.is_transaction_done("a")
    assert not await store.is_transaction_done("a\x00c")
    assert not await store.accept_transaction("a\x00b", [event(2)])
    await store.mark_transaction_done("\x00")
    assert await store.is_transaction_done("\x00")
    assert not await store.accept_transaction("\x00", [])
    assert await store.prune_transactions(keep=1) == 1
    assert await store.is_transaction_done("\x00")


async def test_nul_in_a_lane_or_a_letter_is_stored(store: Store) -> None:
    lane = "!a\x00b:test.local"
    odd = letter(1, lane, error="bad\x00", event_id="$\x00", event_type="m.\x00")
    assert await store.accept_transaction("t1", [event(1, lane)], [odd])
    [claimed] = await store.claim_lanes("w1", LEASE, limit=5)
    item = await only_item(store, claimed)
    assert item.lane == claimed
    await store.complete_item(item.id)
    await store.release_lane("w1", claimed)
    assert await store.inbox_stats() == InboxStats(0, None, 1)
    [dead] = await store.dead_letters()
    assert dead.error.startswith("bad")
    assert (await store.claim_lanes("w2", LEASE, limit=5)) == []


async def test_a_nul_in_a_txn_id_is_no_server_error_with_postgres(postgres_dsn: str) -> None:
    dsn = await emptied(postgres_dsn)
    wakeups = Wakeups()
    async with PostgresStore(dsn) as store, serve_api(store, on_accepted=wakeups) as client:
        for _ in range(2):
            url = f"{V1}/transactions/a%00b"
            await expect_ok(await client.put(url, json=txn_body(1), headers=AUTH))
        assert await store.is_transaction_done("a\x00b")
        assert not await store.is_transaction_done("a\ufffdb")
        assert (await store.inbox_stats()).depth == 1
    assert wakeups.calls == 1


# -- migration from version 1 -------------------------------------------------------------


async def test_a_version_1_database_gets_the_inbox(durable_url: str) -> None:
    sqlite = durable_url.startswith("sqlite:")
    v1 = (SQLiteStore if sqlite else PostgresStore).MIGRATIONS[0]
    add_transaction = (
        "INSERT INTO bridge_kit_transactions (txn_id, seq, done_at) VALUES ('{}', {}, 0)"
        if sqlite
        else "INSERT INTO bridge_kit_transactions (txn_id) VALUES ('{}')"
    )
    await run_sql(
        durable_url,
        *v1,
        "CREATE TABLE bridge_kit_schema (version INTEGER NOT NULL)",
        "INSERT INTO bridge_kit_schema (version) VALUES (1)",
        "INSERT INTO bridge_kit_puppets (user_id) VALUES ('@_bk_old:test.local')",
        add_transaction.format("old-1", 1),
        add_transaction.format("old-ü", 2),
    )
    async with open_store(durable_url) as store:
        assert await store.schema_version() == store.SCHEMA_VERSION
        assert await store.registered_among(["@_bk_old:test.local"]) == {"@_bk_old:test.local"}
        # Version 5 keeps only the newest record without a body digest (the one a
        # homeserver may resend); it matches any body.
        assert not await store.is_transaction_done("old-1")
        assert await store.is_transaction_done("old-ü")
        assert not await store.accept_transaction("old-ü", [event(1)])
        assert await store.accept_transaction("new", [event(2)])
        assert await store.accept_transaction("newer", [event(3)])
        # The order of transactions carries on from version 1's.
        assert await store.prune_transactions(keep=2) == 1
        assert not await store.is_transaction_done("old-ü")
        assert await store.claim_lanes("w1", LEASE, limit=1) == [A]


# -- one daemon per SQLite file -----------------------------------------------------------


async def test_a_sqlite_store_is_locked_for_one_daemon(tmp_path: Path) -> None:
    path = tmp_path / "bk.db"
    async with SQLiteStore(path) as first, SQLiteStore(path) as second:
        await first.lock_for_daemon()
        await first.lock_for_daemon()  # again: still ours
        with pytest.raises(StoreError) as excinfo:
            await second.lock_for_daemon()
        message = str(excinfo.value)
        assert message.startswith(f"another bridge-kit daemon is using the SQLite store {path} (")
        assert f"{path}.lock" in message
        await second.mark_registered(["@_bk_x:test.local"])  # the store itself still works
        await first.close()
        await second.lock_for_daemon()
        with pytest.raises(StoreError, match="another bridge-kit daemon"):
            await SQLiteStore(path).lock_for_daemon()


async def test_a_sqlite_lock_that_cannot_be_made_is_a_store_error(tmp_path: Path) -> None:
    (tmp_path / "bk.db.lock").mkdir()
    with pytest.raises(StoreError, match="cannot lock SQLite store"):
        await SQLiteStore(tmp_path / "bk.db").lock_for_daemon()


async def test_shared_stores_let_every_daemon_in(shared_backend: str) -> None:
    url = await emptied(shared_backend)
    async with open_store(url) as first, open_store(url) as second:
        await first.lock_for_daemon()
        await second.lock_for_daemon()


async def test_a_postgres_renewal_and_an_accept_take_lane_locks_in_one_order(
    postgres_dsn: str,
) -> None:
    """An accept locks its lanes' rows in lane order; a renewal of the same lanes must
    too, or each holds a row the other waits for and PostgreSQL aborts one (a failed
    acknowledgement, or a renewal missed and the lanes' workers stopped)."""
    dsn = await emptied(postgres_dsn)
    async with PostgresStore(dsn) as store:
        await fill(store, B, A)  # B's row is stored before A's: a scan meets B first
        assert sorted(await store.claim_lanes("w1", LEASE, limit=2)) == [A, B]
        accepting = await asyncpg.connect(dsn)
        watcher = await asyncpg.connect(dsn)
        try:
            async with accepting.transaction():
                # An accept holding A's row lock and going on to B, as one with
                # events in both rooms does (its two steps apart, to time them).
                await postgres_inbox.accept(accepting, b"t-a", [event(2, A)], [], time.time())
                renewal = asyncio.ensure_future(store.renew_lanes("w1", [A, B], LEASE))
                await until_waiting_for_a_lock(watcher)
                await postgres_inbox.accept(accepting, b"t-b", [event(3, B)], [], time.time())
            assert await renewal == {A, B}
        finally:
            await accepting.close()
            await watcher.close()

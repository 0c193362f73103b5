"""Replays that do not redo work, and a store that stays bounded (schema version 5):
dead letters keep their done handlers, retention prunes dead letters, Megolm replay
records and sealed to-device payloads, key counts keep only the newest per device,
and ``appservice.store_sync``. Store tests run on memory, SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bridge_kit import defaults
from bridge_kit.config import Config
from bridge_kit.errors import ConfigError
from bridge_kit.inbox.dead_letters import DeadLetters
from bridge_kit.inbox.lanes import HandlerRoute, Inbox, InboxSettings, handler_name
from bridge_kit.inbox.records import ItemKind, NewDeadLetter, NewInboxItem, clipped_error
from bridge_kit.inbox.transactions import split_transaction
from bridge_kit.store import PostgresStore, SQLiteStore, Store, open_store, sqlite_retention
from bridge_kit.store.retention import (
    REPLAY_RECORDS,
    SEALED_PAYLOADS,
    Retention,
    RetentionReport,
    RetentionSettings,
    prune_store,
)
from bridge_kit.store.sqlite_files import WAL_SIZE_LIMIT
from bridge_kit.types import Event, OtkCounts
from tests.test_store import backend_url, emptied, run_sql

ROOM = "!room:test.local"
BOT = "@bot:test.local"
WAIT = 15.0
SETTINGS = InboxSettings(
    concurrency=8, attempts=1, backoff=0.05, backoff_max=0.2, timeout=5.0, lease=2.0, poll=0.05
)
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def any_backend(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return backend_url(request, tmp_path)


@pytest.fixture(params=["sqlite", "postgres"])
def durable_backend(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return backend_url(request, tmp_path)


@pytest.fixture
async def store(any_backend: str) -> AsyncIterator[Store]:
    async with open_store(await emptied(any_backend)) as opened:
        yield opened


def event_item(n: int, lane: str = ROOM, kind: ItemKind = ItemKind.EVENT) -> NewInboxItem:
    return NewInboxItem(lane, kind, json.dumps({"event_id": f"$e{n}", "room_id": lane}))


def letter(n: int, **changes: Any) -> NewDeadLetter:
    fields: dict[str, Any] = {
        "lane": ROOM,
        "kind": ItemKind.EVENT,
        "event_json": json.dumps({"event_id": f"$d{n}"}),
        "error": f"broken {n}",
    }
    return NewDeadLetter(**(fields | changes))


async def until(condition: Any, timeout: float = WAIT) -> None:
    async with asyncio.timeout(timeout):
        while not await condition():
            await asyncio.sleep(0.02)


# -- dead letters keep their done handlers (store) --------------------------------------------


async def test_a_buried_item_keeps_its_done_handlers_and_a_replay_restores_them(
    store: Store,
) -> None:
    assert await store.accept_transaction("t1", [event_item(1), event_item(2)])
    first, second = await store.lane_items(ROOM, 10)
    done = letter(1, handler="mod.b", done_handlers=("mod.a", "mod.x"))
    await store.bury_item(first.id, done)
    await store.bury_item(second.id, letter(2, handler="mod.a"))

    stored = await store.dead_letters()
    assert [item.done_handlers for item in stored] == [("mod.a", "mod.x"), ()]
    assert [item.received_at for item in stored] == [first.received_at, second.received_at]

    assert await store.replay_dead_letters([stored[0].id]) == 1
    assert await store.replay_dead_letters([stored[1].id], all_handlers=True) == 1
    replayed = await store.lane_items(ROOM, 10)
    assert [item.done_handlers for item in replayed] == [("mod.a", "mod.x"), ()]
    assert [item.attempts for item in replayed] == [0, 0]
    # A replayed event keeps its arrival time (retention reads it; see to_device_since).
    assert [item.received_at for item in replayed] == [first.received_at, second.received_at]


async def test_replaying_every_letter_with_all_handlers_clears_their_progress(store: Store) -> None:
    assert await store.accept_transaction("t1", [event_item(1)])
    [item] = await store.lane_items(ROOM, 1)
    await store.bury_item(item.id, letter(1, done_handlers=("mod.a",)))
    assert await store.replay_dead_letters(all_handlers=True) == 1
    [again] = await store.lane_items(ROOM, 1)
    assert again.done_handlers == ()


async def test_a_letter_rejected_at_acceptance_arrived_then(store: Store) -> None:
    before = time.time()
    assert await store.accept_transaction("t1", [], [letter(1)])
    [stored] = await store.dead_letters()
    assert stored.received_at is not None and before <= stored.received_at <= time.time()
    assert stored.done_handlers == ()


# -- retention on the stores ------------------------------------------------------------------


async def test_dead_letters_are_pruned_by_cap_and_by_age(store: Store) -> None:
    assert await store.accept_transaction("t1", [], [letter(n) for n in range(5)])
    now = time.time()
    assert await store.prune_dead_letters(keep=10, before=now - 3600) == 0
    assert await store.prune_dead_letters(keep=3, before=now - 3600) == 2
    assert [json.loads(d.event_json)["event_id"] for d in await store.dead_letters()] == [
        "$d2",
        "$d3",
        "$d4",
    ]
    assert await store.prune_dead_letters(keep=10, before=now + 1) == 3
    assert await store.dead_letters() == []


async def test_crypto_values_of_one_kind_are_pruned_by_when_they_were_written(
    store: Store,
) -> None:
    await store.crypto_put_many("dev", REPLAY_RECORDS, {"a": b"1", "b": b"2"})
    await store.crypto_put("dev", "olm_sessions", "s", b"secret")
    written = time.time()
    assert await store.prune_crypto(REPLAY_RECORDS, written - 3600) == 0
    assert await store.prune_crypto(REPLAY_RECORDS, written + 1) == 2
    assert await store.crypto_items("dev", REPLAY_RECORDS) == {}
    assert await store.crypto_get("dev", "olm_sessions", "s") == b"secret"  # another kind


async def test_pruning_more_rows_than_one_delete_takes_prunes_them_all(store: Store) -> None:
    """SQLite deletes in chunks (its write lock is held per chunk): all must go."""
    many = sqlite_retention.CHUNK * 2 + 1
    await store.crypto_put_many("dev", REPLAY_RECORDS, {f"k{n}": b"x" for n in range(many)})
    assert await store.accept_transaction("t1", [], [letter(n) for n in range(many)])
    assert await store.prune_crypto(REPLAY_RECORDS, time.time() + 1) == many
    assert await store.prune_dead_letters(keep=1, before=0.0) == many - 1
    assert await store.crypto_items("dev", REPLAY_RECORDS) == {}
    [newest] = await store.dead_letters()
    assert json.loads(newest.event_json)["event_id"] == f"$d{many - 1}"


async def test_a_rewritten_crypto_value_counts_as_new(store: Store) -> None:
    await store.crypto_put("dev", SEALED_PAYLOADS, "x", b"1")
    cut = time.time()
    await asyncio.sleep(0.01)
    await store.crypto_put("dev", SEALED_PAYLOADS, "x", b"2")
    assert await store.prune_crypto(SEALED_PAYLOADS, cut) == 0
    assert await store.crypto_get("dev", SEALED_PAYLOADS, "x") == b"2"


async def test_to_device_since_names_the_oldest_waiting_to_device_item(store: Store) -> None:
    assert await store.to_device_since() is None
    assert await store.accept_transaction("t0", [event_item(0)])  # not a to-device item
    assert await store.to_device_since() is None
    before = time.time()
    assert await store.accept_transaction("t1", [event_item(1, "~to_device", ItemKind.TO_DEVICE)])
    since = await store.to_device_since()
    assert since is not None and before <= since <= time.time()
    [item] = await store.lane_items("~to_device", 1)
    await store.bury_item(item.id, letter(1, lane="~to_device", kind=ItemKind.TO_DEVICE))
    assert await store.to_device_since() == since  # the letter keeps the arrival time
    await store.drop_dead_letters()
    assert await store.to_device_since() is None


async def test_a_handled_to_device_item_is_no_longer_waiting(store: Store) -> None:
    """Handled in the inbox's group commit (SQLite marks it done and deletes it at a
    checkpoint), a to-device item holds back the pruning of sealed payloads no more."""
    assert await store.accept_transaction("t1", [event_item(1, "~td", ItemKind.TO_DEVICE)])
    [item] = await store.lane_items("~td", 1)
    await store.complete_items([item.id])
    assert await store.to_device_since() is None


async def test_prune_store_keeps_sealed_payloads_a_waiting_to_device_item_may_need(
    store: Store,
) -> None:
    settings = RetentionSettings(sealed_payloads_max_age=60.0, replay_records_max_age=60.0)
    assert await store.accept_transaction("t1", [event_item(1, "~td", ItemKind.TO_DEVICE)])
    await store.crypto_put("dev", SEALED_PAYLOADS, "needed", b"p")
    await store.crypto_put("dev", REPLAY_RECORDS, "r|s|0", b'"$e"')
    later = time.time() + 3600  # both are an hour old then

    kept = await prune_store(store, settings, now=later)
    assert kept == RetentionReport(dead_letters=0, replay_records=1, sealed_payloads=0)
    assert await store.crypto_get("dev", SEALED_PAYLOADS, "needed") == b"p"

    [item] = await store.lane_items("~td", 1)
    await store.complete_item(item.id)
    pruned = await prune_store(store, settings, now=later)
    assert pruned.sealed_payloads == 1
    assert await store.crypto_get("dev", SEALED_PAYLOADS, "needed") is None


async def test_the_retention_task_prunes_by_the_settings(store: Store) -> None:
    assert await store.accept_transaction("t1", [], [letter(n) for n in range(4)])
    retention = Retention(store, RetentionSettings(interval=3600.0, dead_letters_keep=1))
    retention.start()
    try:

        async def one_left() -> bool:
            return len(await store.dead_letters()) == 1

        await until(one_left)
    finally:
        await retention.stop()


def test_a_long_traceback_is_clipped_keeping_its_start_and_its_end() -> None:
    text = "Traceback (most recent call last):\n" + "x" * 100_000 + "\nRuntimeError: the end"
    clipped = clipped_error(text)
    assert len(clipped) < defaults.DEAD_LETTER_ERROR_CHARS + 100
    assert clipped.startswith("Traceback (most recent call last):")
    assert clipped.endswith("RuntimeError: the end")
    assert "characters left out" in clipped
    assert clipped_error("short") == "short"


# -- one-time-key counts: the newest per device ----------------------------------------------


def otk_body(devices: range, value: int) -> dict[str, Any]:
    counts = {f"DEV{d}": {"signed_curve25519": value} for d in devices}
    return {"events": [], "org.matrix.msc3202.device_one_time_keys_count": {BOT: counts}}


async def test_a_device_s_new_key_counts_replace_its_waiting_ones(store: Store) -> None:
    for txn in range(3):
        items, rejected = split_transaction(otk_body(range(2), txn))
        assert not rejected
        assert await store.accept_transaction(f"t{txn}", [*items, event_item(txn)], rejected)
    lanes = [f"~otk:{BOT}|DEV{d}" for d in range(2)]
    for lane in lanes:
        [item] = await store.lane_items(lane, 10)
        assert json.loads(item.event_json)["counts"] == {"signed_curve25519": 2}
    assert len(await store.lane_items(ROOM, 10)) == 3  # other items are untouched
    assert (await store.inbox_stats()).depth == 5


async def test_2000_key_counts_in_20_transactions_are_one_handler_call_per_device(
    store: Store,
) -> None:
    """20 transactions of 100 devices' counts (2,000 items before): one call per device,
    with its last value; the device of interest is DEV7."""
    for txn in range(20):
        items, rejected = split_transaction(otk_body(range(100), 1000 + txn))
        assert await store.accept_transaction(f"t{txn}", items, rejected)
    seen: list[OtkCounts] = []

    async def on_counts(counts: OtkCounts) -> None:
        seen.append(counts)

    inbox = Inbox(store, lambda kind, _: (on_counts,), appservice_id="t", settings=SETTINGS)
    await inbox.start()
    try:

        async def drained() -> bool:
            return (await store.inbox_stats()).depth == 0

        await until(drained)
    finally:
        await inbox.stop(0)
    assert len(seen) == 100
    assert {c.counts["signed_curve25519"] for c in seen} == {1019}
    assert [c.counts for c in seen if c.device_id == "DEV7"] == [{"signed_curve25519": 1019}]


# -- the inbox: a replay runs only what had not succeeded --------------------------------------


class Calls:
    def __init__(self) -> None:
        self.calls: list[str] = []
        self.b_fails = True


async def run_until_drained(store: Store, route: HandlerRoute) -> None:
    inbox = Inbox(store, route, appservice_id="t", settings=SETTINGS)
    await inbox.start()
    try:

        async def drained() -> bool:
            return (await store.inbox_stats()).depth == 0

        await until(drained)
    finally:
        await inbox.stop(0)


@pytest.mark.parametrize("all_handlers", [False, True])
async def test_a_replay_runs_only_the_failed_handler_and_those_after_it(
    store: Store, all_handlers: bool
) -> None:
    calls = Calls()

    async def a(event: Event) -> None:
        calls.calls.append("a")

    async def b(event: Event) -> None:
        calls.calls.append("b")
        if calls.b_fails:
            raise RuntimeError("the remote network is down")

    async def c(event: Event) -> None:
        calls.calls.append("c")

    route: HandlerRoute = lambda kind, event_type: (a, b, c)  # noqa: E731
    message = {"type": "m.room.message", "event_id": "$m", "room_id": ROOM, "content": {}}
    items, _ = split_transaction({"events": [message]})
    assert await store.accept_transaction("t1", items)
    await run_until_drained(store, route)
    [dead] = await store.dead_letters()
    assert calls.calls == ["a", "b"]
    assert dead.handler == handler_name(b)
    assert dead.done_handlers == (handler_name(a),)
    assert "RuntimeError: the remote network is down" in dead.error

    calls.calls.clear()
    calls.b_fails = False
    assert await DeadLetters(store).replay(all_handlers=all_handlers) == 1
    await run_until_drained(store, route)
    assert calls.calls == (["a", "b", "c"] if all_handlers else ["b", "c"])
    assert await store.dead_letters() == []


async def test_the_cli_lists_done_handlers_and_replays_with_all_handlers(tmp_path: Path) -> None:
    (tmp_path / "registration.yaml").write_text("id: x\n")
    config = tmp_path / "config.yaml"
    config.write_text(
        "homeserver: {url: 'http://127.0.0.1:9'}\n"
        "appservice: {registration: registration.yaml, store: 'sqlite:///bk.db'}\n"
    )
    url = f"sqlite:///{tmp_path / 'bk.db'}"
    async with open_store(url) as store:
        assert await store.accept_transaction("t1", [event_item(1), event_item(2)])
        for item in await store.lane_items(ROOM, 10):
            await store.bury_item(item.id, letter(item.id, done_handlers=("bridge.post",)))

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "bridge_kit", "dead-letters", *args, "-c", str(config)],
            cwd=tmp_path, capture_output=True, text=True, timeout=60,
            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        )  # fmt: skip

    listed = await asyncio.to_thread(cli, "list")
    assert listed.returncode == 0, listed.stderr
    assert all("\tdone: bridge.post\t" in line for line in listed.stdout.splitlines())
    ids = [line.split("\t")[0] for line in listed.stdout.splitlines()]
    kept = await asyncio.to_thread(cli, "replay", ids[0])
    rerun = await asyncio.to_thread(cli, "replay", "--all-handlers", ids[1])
    assert kept.returncode == 0 and rerun.returncode == 0, (kept.stderr, rerun.stderr)
    async with open_store(url) as store:
        items = await store.lane_items(ROOM, 10)
    assert [item.done_handlers for item in items] == [("bridge.post",), ()]


# -- schema version 4 -> 5 -------------------------------------------------------------------


def _v4_statements(cls: type[SQLiteStore] | type[PostgresStore]) -> list[str]:
    return [statement for step in cls.MIGRATIONS[:4] for statement in step]


async def test_a_version_4_database_is_migrated_to_5(durable_backend: str) -> None:
    url = await emptied(durable_backend)
    cls = SQLiteStore if url.startswith("sqlite:") else PostgresStore
    blob = "X'01'" if cls is SQLiteStore else "'\\x01'::bytea"
    await run_sql(
        url,
        *_v4_statements(cls),
        "CREATE TABLE bridge_kit_schema (version INTEGER NOT NULL)",
        "INSERT INTO bridge_kit_schema (version) VALUES (4)",
        "INSERT INTO bridge_kit_dead_letters (lane, kind, event_json, error, handler, attempts,"
        " first_failed_at, last_failed_at) VALUES ('!r', 'to_device', '{}', 'e', 'h', 5, 1, 2)",
        "INSERT INTO bridge_kit_crypto_state (owner, kind, key, value)"  # noqa: S608 (constants)
        f" VALUES ('dev', 'olm_decrypted', 'k', {blob})",
    )
    migrated_at = time.time()
    async with open_store(url) as store:
        assert await store.schema_version() == cls.SCHEMA_VERSION
        [old] = await store.dead_letters()
        assert (old.done_handlers, old.received_at, old.handler) == ((), None, "h")
        # A letter without an arrival time holds every sealed payload back.
        assert await store.to_device_since() == 0.0
        # Rows from before count as written at the migration, not at 1970.
        assert await store.prune_crypto(SEALED_PAYLOADS, migrated_at - 3600) == 0
        assert await store.crypto_get("dev", SEALED_PAYLOADS, "k") == b"\x01"
        assert await store.replay_dead_letters() == 1
        [item] = await store.lane_items("!r", 1)
        assert item.done_handlers == () and item.received_at >= migrated_at - 1
    assert await run_sql(url, "SELECT version FROM bridge_kit_schema") == [(cls.SCHEMA_VERSION,)]


# -- appservice.store_sync ------------------------------------------------------------------


def _synchronous(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA synchronous").fetchone()[0])


async def _pragmas(store: SQLiteStore) -> tuple[int, int]:
    # Private, as the pragma is per connection: both of the store's must have it.
    assert store._conn is not None and store._records is not None
    rows = await store._conn.execute_fetchall("PRAGMA synchronous")
    return int(next(iter(rows))[0]), _synchronous(store._records)


async def _wal_limits(store: SQLiteStore) -> tuple[int, int]:
    assert store._conn is not None and store._records is not None
    rows = await store._conn.execute_fetchall("PRAGMA journal_size_limit")
    records = store._records.execute("PRAGMA journal_size_limit").fetchone()[0]
    return int(next(iter(rows))[0]), int(records)


@pytest.mark.parametrize(("sync", "pragma"), [("normal", 1), ("full", 2)])
async def test_store_sync_sets_sqlite_s_synchronous_pragma(
    tmp_path: Path, sync: str, pragma: int
) -> None:
    (tmp_path / "registration.yaml").write_text("id: x\n")
    config = Config.loads(
        "homeserver: {url: 'http://127.0.0.1:9'}\n"
        f"appservice: {{registration: registration.yaml, store: 'sqlite:///bk.db',"
        f" store_sync: {sync}}}\n",
        base_dir=tmp_path,
    )
    store = open_store(config.appservice.store, sync=config.appservice.store_sync)
    assert isinstance(store, SQLiteStore)
    async with store:
        assert await _pragmas(store) == (pragma, pragma)
        # A burst's WAL is cut back after a checkpoint, so the file stays bounded.
        assert await _wal_limits(store) == (WAL_SIZE_LIMIT, WAL_SIZE_LIMIT)
        # Acceptance and dedup records work in either mode.
        assert await store.accept_transaction("t1", [event_item(1)])
        assert not await store.accept_transaction("t1", [event_item(1)])
        await store.mark_transaction_done("t2")
        assert await store.is_transaction_done("t2")


def test_store_sync_takes_only_normal_or_full(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"appservice.store_sync must be normal or full"):
        Config.loads(
            "homeserver: {url: 'http://127.0.0.1:9'}\n"
            "appservice: {registration: r.yaml, store_sync: fsync}\n",
            base_dir=tmp_path,
            check_files=False,
        )
    with pytest.raises(ValueError, match="sync must be one of normal, full"):
        SQLiteStore(tmp_path / "x.db", sync="off")


def test_retention_keys_reach_the_app_s_settings(tmp_path: Path) -> None:
    from bridge_kit.app.service import retention_settings

    config = Config.loads(
        "homeserver: {url: 'http://127.0.0.1:9'}\n"
        "appservice: {registration: r.yaml, dead_letters_keep: 7, dead_letters_max_age: 60,"
        " retention_interval: 5}\n"
        "encryption: {replay_records_max_age: 70, sealed_payloads_max_age: 80}\n",
        base_dir=tmp_path,
        check_files=False,
    )
    assert retention_settings(config) == RetentionSettings(
        interval=5.0,
        dead_letters_keep=7,
        dead_letters_max_age=60.0,
        replay_records_max_age=70.0,
        sealed_payloads_max_age=80.0,
    )


# -- Megolm replay records: gone when our session rotates --------------------------------------


async def test_our_session_s_replay_records_go_when_it_rotates() -> None:
    from bridge_kit.crypto import OutboundGroupSessions, RotationSettings
    from tests.test_crypto import BOT as OUR_BOT
    from tests.test_crypto import _parts

    store, vault, account, _, _, inbound = await _parts()
    outbound = OutboundGroupSessions(account, vault, inbound)
    settings = RotationSettings(period_msgs=3)
    session = await outbound.current(ROOM, settings)
    for n in range(2):
        encrypted = await outbound.encrypt(session, "m.room.message", {"body": str(n)})
        await inbound.decrypt(ROOM, f"$own{n}", OUR_BOT, encrypted)
    assert len(await store.crypto_items(vault.owner, REPLAY_RECORDS)) == 2
    other = await outbound.current("!other:test.local", settings)
    encrypted = await outbound.encrypt(other, "m.room.message", {"body": "x"})
    await inbound.decrypt("!other:test.local", "$x", OUR_BOT, encrypted)

    await outbound.discard(ROOM)
    left = await store.crypto_items(vault.owner, REPLAY_RECORDS)
    assert list(left) == [f"!other:test.local|{other.session.session_id}|0"]
    # By count, too: the third message rotates the session on the next send.
    for n in range(3):
        await outbound.encrypt(other, "m.room.message", {"body": str(n)})
    assert (await outbound.current("!other:test.local", settings)) is not other
    assert await store.crypto_items(vault.owner, REPLAY_RECORDS) == {}

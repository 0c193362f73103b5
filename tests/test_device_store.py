"""Devices and crypto state in the store (schema version 4): memory, SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bridge_kit.errors import StoreError
from bridge_kit.store import PostgresStore, SQLiteStore, Store, open_store
from tests.test_store import backend_url, emptied, run_sql

ALICE, BOB = "@_bk_alice:test.local", "@_bk_bob:test.local"


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


# -- devices ------------------------------------------------------------------------------


async def test_devices_are_remembered_per_user_and_renamed_by_a_repeat(store: Store) -> None:
    assert await store.known_devices(ALICE) == {}
    await store.remember_device(ALICE, "PHONE", "Alice's phone")
    await store.remember_device(ALICE, "BRIDGE", None)
    await store.remember_device(BOB, "PHONE", "Bob's")
    await store.remember_device(ALICE, "PHONE", "renamed")
    assert await store.known_devices(ALICE) == {"PHONE": "renamed", "BRIDGE": None}
    assert await store.known_devices(BOB) == {"PHONE": "Bob's"}


async def test_a_repeat_without_a_name_keeps_the_name(store: Store) -> None:
    """As the homeserver does: MSC4190's PUT without display_name renames nothing."""
    await store.remember_device(ALICE, "PHONE", "Alice's phone")
    await store.remember_device(ALICE, "PHONE", None)
    await store.remember_device(ALICE, "NEW", None)
    assert await store.known_devices(ALICE) == {"PHONE": "Alice's phone", "NEW": None}


async def test_forgetting_a_device_leaves_the_others(store: Store) -> None:
    await store.remember_device(ALICE, "A", None)
    await store.remember_device(ALICE, "B", "b")
    await store.remember_device(BOB, "A", None)
    await store.forget_device(ALICE, "A")
    await store.forget_device(ALICE, "never-made")  # no error
    assert await store.known_devices(ALICE) == {"B": "b"}
    assert await store.known_devices(BOB) == {"A": None}


async def test_a_device_id_with_nul_is_refused_not_mangled(store: Store) -> None:
    with pytest.raises(ValueError, match="device ID holds NUL"):
        await store.remember_device(ALICE, "A\x00", None)
    # A display name is only shown to people: it is cleaned, not refused.
    await store.remember_device(ALICE, "A", "nul\x00name")
    assert await store.known_devices(ALICE) == {"A": "nul\ufffdname"}


# -- crypto state -------------------------------------------------------------------------


async def test_crypto_values_are_opaque_bytes_round_tripped(store: Store) -> None:
    every_byte = bytes(range(256)) * 40  # NULs, high bytes, 10 KiB
    assert await store.crypto_get(ALICE, "olm_session", "s1") is None
    await store.crypto_put(ALICE, "olm_session", "s1", every_byte)
    await store.crypto_put(ALICE, "olm_session", "empty", b"")
    assert await store.crypto_get(ALICE, "olm_session", "s1") == every_byte
    assert await store.crypto_get(ALICE, "olm_session", "empty") == b""
    assert await store.crypto_get(ALICE, "other_kind", "s1") is None
    assert await store.crypto_get(BOB, "olm_session", "s1") is None


async def test_put_replaces_and_items_lists_one_owner_and_kind(store: Store) -> None:
    await store.crypto_put(ALICE, "k", "x", b"1")
    await store.crypto_put(ALICE, "k", "x", b"2")
    await store.crypto_put_many(ALICE, "k", {"y": b"3", "z": b"4"})
    await store.crypto_put_many(ALICE, "k", {"z": b"5"})
    await store.crypto_put(ALICE, "other", "x", b"other kind")
    await store.crypto_put(BOB, "k", "x", b"other owner")
    assert await store.crypto_items(ALICE, "k") == {"x": b"2", "y": b"3", "z": b"5"}
    assert await store.crypto_items(ALICE, "nothing") == {}


async def test_crypto_delete_removes_one_value(store: Store) -> None:
    await store.crypto_put_many(ALICE, "k", {"x": b"1", "y": b"2"})
    await store.crypto_delete(ALICE, "k", "x")
    await store.crypto_delete(ALICE, "k", "absent")
    assert await store.crypto_items(ALICE, "k") == {"y": b"2"}
    assert await store.crypto_get(ALICE, "k", "x") is None


async def test_put_many_of_nothing_writes_nothing(store: Store) -> None:
    await store.crypto_put_many(ALICE, "k", {})
    assert await store.crypto_items(ALICE, "k") == {}


async def test_a_batch_with_one_bad_value_writes_none_of_it(store: Store) -> None:
    with pytest.raises(TypeError, match="crypto values are bytes, not str"):
        await store.crypto_put_many(ALICE, "k", {"good": b"1", "bad": "text"})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="crypto key holds NUL"):
        await store.crypto_put_many(ALICE, "k", {"good": b"1", "b\x00d": b"2"})
    assert await store.crypto_items(ALICE, "k") == {}


async def test_bytes_like_values_are_stored_as_bytes(store: Store) -> None:
    await store.crypto_put(ALICE, "k", "a", bytearray(b"ab"))
    await store.crypto_put(ALICE, "k", "m", memoryview(b"cd"))
    assert await store.crypto_items(ALICE, "k") == {"a": b"ab", "m": b"cd"}
    assert all(type(v) is bytes for v in (await store.crypto_items(ALICE, "k")).values())


async def test_a_big_batch_is_one_call_and_reads_back(store: Store) -> None:
    batch = {f"key{n}": os.urandom(64) for n in range(3000)}
    await store.crypto_put_many(ALICE, "megolm_inbound", batch)
    assert await store.crypto_items(ALICE, "megolm_inbound") == batch


async def test_delete_many_deletes_those_named_in_one_scope_only(store: Store) -> None:
    await store.crypto_put_many(ALICE, "k", {f"v{n}": b"x" for n in range(5)})
    await store.crypto_put(ALICE, "other", "v1", b"y")
    await store.crypto_put(BOB, "k", "v1", b"z")
    await store.crypto_delete_many(ALICE, "k", (f"v{n}" for n in (1, 3, 9)))  # 9: none
    await store.crypto_delete_many(ALICE, "k", [])
    assert set(await store.crypto_items(ALICE, "k")) == {"v0", "v2", "v4"}
    assert await store.crypto_get(ALICE, "other", "v1") == b"y"
    assert await store.crypto_get(BOB, "k", "v1") == b"z"
    with pytest.raises(ValueError, match="crypto key holds NUL"):
        await store.crypto_delete_many(ALICE, "k", ["v0", "b\x00d"])
    assert await store.crypto_get(ALICE, "k", "v0") == b"x"  # refused whole, before any


async def test_concurrent_puts_do_not_interfere(store: Store) -> None:
    await asyncio.gather(
        *(store.crypto_put(ALICE, "k", f"v{n}", str(n).encode()) for n in range(100))
    )
    assert await store.crypto_items(ALICE, "k") == {f"v{n}": str(n).encode() for n in range(100)}


async def test_put_new_stores_the_first_value_and_then_answers_it(store: Store) -> None:
    assert await store.crypto_put_new(ALICE, "seen", "i0", b"first") is None
    assert await store.crypto_put_new(ALICE, "seen", "i0", b"second") == b"first"
    assert await store.crypto_get(ALICE, "seen", "i0") == b"first"
    # Another owner or kind is another key.
    assert await store.crypto_put_new(BOB, "seen", "i0", b"bob's") is None
    assert await store.crypto_put_new(ALICE, "other", "i0", bytearray(b"x")) is None
    assert await store.crypto_get(ALICE, "other", "i0") == b"x"
    with pytest.raises(ValueError, match="crypto key holds NUL"):
        await store.crypto_put_new(ALICE, "seen", "i\x00", b"v")
    with pytest.raises(TypeError, match="crypto values are bytes, not str"):
        await store.crypto_put_new(ALICE, "seen", "i1", "text")  # type: ignore[arg-type]
    assert await store.crypto_items(ALICE, "seen") == {"i0": b"first"}


async def test_put_new_of_one_key_at_once_lets_exactly_one_in(store: Store) -> None:
    """The replay check's step: of many writers of one key at once, one stores its
    value and every other is told that value."""
    answers = await asyncio.gather(
        *(store.crypto_put_new(ALICE, "seen", "i0", f"${n}".encode()) for n in range(20))
    )
    winners = [n for n, answer in enumerate(answers) if answer is None]
    assert len(winners) == 1
    stored = await store.crypto_get(ALICE, "seen", "i0")
    assert stored == f"${winners[0]}".encode()
    assert all(answer == stored for answer in answers if answer is not None)


async def test_sqlite_crypto_reads_and_writes_wait_for_another_writer(tmp_path: Path) -> None:
    """Crypto values go through the loop's connection, which never waits: while another
    connection holds the write lock they take the store's thread, and wait there."""
    path = tmp_path / "busy.db"
    async with open_store(f"sqlite:///{path}") as store:
        await store.crypto_put(ALICE, "k", "before", b"0")
        other = sqlite3.connect(path, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            other.execute(
                "INSERT INTO bridge_kit_crypto_state (owner, kind, key, value, written_at)"
                " VALUES (?, 'k', 'theirs', x'01', 0)",
                (ALICE,),
            )
            writes = asyncio.gather(
                store.crypto_put(ALICE, "k", "one", b"1"),
                store.crypto_put_many(ALICE, "k", {"two": b"2", "three": b"3"}),
                store.crypto_put_new(ALICE, "k", "theirs", b"mine"),
            )
            # A read does not wait: it sees what was committed.
            assert await store.crypto_get(ALICE, "k", "before") == b"0"
            assert await store.crypto_get(ALICE, "k", "theirs") is None
            await asyncio.sleep(0.2)
            assert not writes.done()  # waiting on the thread, not failed, not on the loop
            other.execute("COMMIT")
            assert (await writes)[2] == b"\x01"  # theirs, committed first, stays
        finally:
            other.close()
        items = await store.crypto_items(ALICE, "k")
        assert items == {"before": b"0", "theirs": b"\x01", "one": b"1", "two": b"2", "three": b"3"}


async def test_sqlite_a_later_crypto_write_is_not_overtaken_by_an_earlier_one(
    tmp_path: Path,
) -> None:
    """A write that had to wait on the thread (the file was busy) still lands before
    a write of the same key made after it: the later one, on the loop, must not
    commit first and then be overwritten by the older value."""
    path = tmp_path / "order.db"
    async with open_store(f"sqlite:///{path}") as store:
        other = sqlite3.connect(path, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            older = asyncio.create_task(store.crypto_put(ALICE, "devices", "@u", b"older"))
            await asyncio.sleep(0.1)
            assert not older.done()  # waiting on the thread for the write lock
            other.execute("COMMIT")
            # Right after the other writer let go, before the waiting write got in: a
            # write of another key commits on the loop at once, one of the same key
            # queues behind the waiting one.
            await store.crypto_put(ALICE, "devices", "@v", b"other key")
            assert not older.done()
            newer = asyncio.create_task(store.crypto_put(ALICE, "devices", "@u", b"newer"))
            await asyncio.gather(older, newer)
        finally:
            other.close()
        assert await store.crypto_get(ALICE, "devices", "@u") == b"newer"
        # put_new after a waiting write of the same key sees that write.
        other = sqlite3.connect(path, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            waiting = asyncio.create_task(store.crypto_put(ALICE, "seen", "i0", b"$first"))
            await asyncio.sleep(0.1)
            other.execute("COMMIT")
            second = asyncio.create_task(store.crypto_put_new(ALICE, "seen", "i0", b"$second"))
            await waiting
            assert await second == b"$first"
        finally:
            other.close()
        assert await store.crypto_get(ALICE, "seen", "i0") == b"$first"
        # A write after a waiting delete of the same key stays.
        other = sqlite3.connect(path, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            deleting = asyncio.create_task(store.crypto_delete(ALICE, "devices", "@u"))
            await asyncio.sleep(0.1)
            other.execute("COMMIT")
            rewrite = asyncio.create_task(store.crypto_put(ALICE, "devices", "@u", b"again"))
            await asyncio.gather(deleting, rewrite)
        finally:
            other.close()
        assert await store.crypto_get(ALICE, "devices", "@u") == b"again"


# -- durability and migration ----------------------------------------------------------------


async def test_devices_and_crypto_state_survive_reopening(durable_backend: str) -> None:
    url = await emptied(durable_backend)
    async with open_store(url) as store:
        await store.remember_device(ALICE, "BRIDGE", "bridge")
        await store.crypto_put_many(ALICE, "account", {"pickle": b"\x00\x01secret"})
    async with open_store(url) as store:
        assert await store.known_devices(ALICE) == {"BRIDGE": "bridge"}
        assert await store.crypto_get(ALICE, "account", "pickle") == b"\x00\x01secret"


async def test_a_crypto_batch_is_one_commit(durable_backend: str) -> None:
    """A batch whose second half the database refuses leaves nothing of the first half."""
    url = await emptied(durable_backend)
    async with open_store(url) as store:
        pass
    # A trigger-free way to make one row of the batch fail: a CHECK on the key.
    check = "ALTER TABLE bridge_kit_crypto_state ADD CONSTRAINT no_bad CHECK (key <> 'bad')"
    if url.startswith("sqlite:"):
        # SQLite cannot add a constraint to a table: refuse through a unique index instead.
        check = "CREATE UNIQUE INDEX one_value ON bridge_kit_crypto_state (value)"
    await run_sql(url, check)
    async with open_store(url) as store:
        with pytest.raises(StoreError, match=r"(?i)constraint|unique|check"):
            await store.crypto_put_many(ALICE, "k", {"good": b"same", "bad": b"same"})
        assert await store.crypto_items(ALICE, "k") == {}


def _v3_statements(cls: type[SQLiteStore] | type[PostgresStore]) -> list[str]:
    return [statement for step in cls.MIGRATIONS[:3] for statement in step]


async def test_a_version_3_database_is_migrated_to_the_latest(durable_backend: str) -> None:
    url = await emptied(durable_backend)
    cls = SQLiteStore if url.startswith("sqlite:") else PostgresStore
    await run_sql(
        url,
        *_v3_statements(cls),
        "CREATE TABLE bridge_kit_schema (version INTEGER NOT NULL)",
        "INSERT INTO bridge_kit_schema (version) VALUES (3)",
        "INSERT INTO bridge_kit_puppets (user_id) VALUES ('@_bk_kept:test.local')",
        "INSERT INTO bridge_kit_profiles (user_id, field, value)"
        " VALUES ('@_bk_kept:test.local', 'displayname', 'Kept')",
    )
    with pytest.raises(Exception, match=r"(?i)bridge_kit_devices"):
        await run_sql(url, "SELECT * FROM bridge_kit_devices")
    async with open_store(url) as store:
        assert await store.schema_version() == store.SCHEMA_VERSION
        assert await store.is_registered("@_bk_kept:test.local")
        assert await store.profile("@_bk_kept:test.local") == {"displayname": "Kept"}
        await store.remember_device("@_bk_kept:test.local", "DEV", None)
        await store.crypto_put("@_bk_kept:test.local", "k", "x", b"v")
        assert await store.known_devices("@_bk_kept:test.local") == {"DEV": None}
    assert await run_sql(url, "SELECT version FROM bridge_kit_schema") == [(cls.SCHEMA_VERSION,)]


async def test_a_closed_store_refuses_device_and_crypto_calls(any_backend: str) -> None:
    store = open_store(await emptied(any_backend))
    with pytest.raises(StoreError, match="not open"):
        await store.known_devices(ALICE)
    with pytest.raises(StoreError, match="not open"):
        await store.crypto_put(ALICE, "k", "x", b"v")

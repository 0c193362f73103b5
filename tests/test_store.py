"""The store suite, run against every backend: memory, SQLite and a real PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import pytest

from bridge_kit.errors import StoreError
from bridge_kit.store import (
    MemoryStore,
    PostgresStore,
    SQLiteStore,
    Store,
    open_store,
    parse_store_url,
)
from bridge_kit.store.url import redact_store_url as redact_dsn

PG_HOST, PG_PORT = "127.0.0.1", 5432
PG_ADMIN_DSN = f"postgresql://postgres@{PG_HOST}:{PG_PORT}/postgres"
DurableStoreClass = type[SQLiteStore] | type[PostgresStore]
BK_TABLES = (
    "bridge_kit_puppets, bridge_kit_transactions, bridge_kit_schema, bridge_kit_extra,"
    " bridge_kit_inbox, bridge_kit_dead_letters, bridge_kit_lanes, bridge_kit_members,"
    " bridge_kit_room_state, bridge_kit_rooms, bridge_kit_profiles, bridge_kit_devices,"
    " bridge_kit_crypto_state, bridge_kit_parked, bridge_kit_portals, bridge_kit_ghosts,"
    " bridge_kit_logins, bridge_kit_messages, bridge_kit_reactions"
)


async def run_sql(url: str, *statements: str) -> list[tuple[Any, ...]]:
    """Run SQL on a store's database behind the store's back; the last statement's rows."""
    rows: list[tuple[Any, ...]] = []
    if url.startswith("sqlite:///"):
        with contextlib.closing(sqlite3.connect(url.removeprefix("sqlite:///"))) as conn, conn:
            for statement in statements:
                rows = conn.execute(statement).fetchall()
        return rows
    conn = await asyncpg.connect(url)
    try:
        for statement in statements:
            rows = [tuple(row) for row in await conn.fetch(statement)]
    finally:
        await conn.close()
    return rows


def backend_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "memory":
        return "memory://"
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    # Looked up lazily so that memory and SQLite tests run without PostgreSQL.
    dsn: str = request.getfixturevalue("postgres_dsn")
    return dsn


async def emptied(url: str) -> str:
    """``url``, with the tables an earlier test left in the session's database dropped."""
    if not url.startswith(("memory:", "sqlite:")):
        await run_sql(url, f"DROP TABLE IF EXISTS {BK_TABLES}")
    return url


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def any_backend(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return backend_url(request, tmp_path)


@pytest.fixture(params=["sqlite", "postgres"])
def durable_backend(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return backend_url(request, tmp_path)


@pytest.fixture
async def url(any_backend: str) -> str:
    """The URL of an empty store, one per backend."""
    return await emptied(any_backend)


@pytest.fixture
async def durable_url(durable_backend: str) -> str:
    """The URL of an empty store on a backend that outlives the process."""
    return await emptied(durable_backend)


@pytest.fixture
async def store(url: str) -> AsyncIterator[Store]:
    async with open_store(url) as opened:
        yield opened


def ids(*numbers: int, prefix: str = "p") -> list[str]:
    return [f"@_bk_{prefix}{n}:test.local" for n in numbers]


def with_extra_migration(cls: DurableStoreClass, *statements: str) -> DurableStoreClass:
    """A store class whose code knows one schema version more than ``cls``."""
    migrations = (*cls.MIGRATIONS, statements)
    newer = {"SCHEMA_VERSION": cls.SCHEMA_VERSION + 1, "MIGRATIONS": migrations}
    return type(f"{cls.__name__}Next", (cls,), newer)


def store_class(url: str) -> DurableStoreClass:
    return SQLiteStore if url.startswith("sqlite:") else PostgresStore


def store_at(cls: DurableStoreClass, url: str) -> Store:
    """An instance of a SQLite or PostgreSQL store class for ``url``."""
    return cls(url.removeprefix("sqlite:///"))


def one_line_store_error(excinfo: pytest.ExceptionInfo[StoreError]) -> str:
    message = str(excinfo.value)
    assert type(excinfo.value) is StoreError
    assert "\n" not in message
    return message


# -- URLs -------------------------------------------------------------------------------


def test_open_store_picks_the_backend_by_url() -> None:
    assert isinstance(open_store("memory://"), MemoryStore)
    assert isinstance(open_store("postgresql://u@h/db"), PostgresStore)
    assert isinstance(open_store("postgres://u@h/db"), PostgresStore)
    relative = open_store("sqlite:///data/bk.db")
    assert isinstance(relative, SQLiteStore)
    assert relative.path == Path.cwd() / "data" / "bk.db"
    absolute = open_store("sqlite:////var/lib/bk.db")
    assert isinstance(absolute, SQLiteStore)
    assert absolute.path == Path("/var/lib/bk.db")


@pytest.mark.parametrize(
    ("bad_url", "reason"),
    [
        ("mysql://u@h/db", "unknown scheme 'mysql'"),
        ("bridge_kit.db", "has no scheme"),
        ("sqlite://bk.db", "three slashes"),
        ("sqlite:///", "has an empty SQLite path"),
        ("memory://somewhere", "memory:// takes no path"),
    ],
)
def test_unsupported_urls_are_refused(bad_url: str, reason: str) -> None:
    with pytest.raises(StoreError, match="unsupported store URL") as excinfo:
        open_store(bad_url)
    assert reason in one_line_store_error(excinfo)


def test_a_refused_url_does_not_show_its_password() -> None:
    with pytest.raises(StoreError) as excinfo:
        open_store("mysql://bridge:hunter2@db.example/bk")
    assert "hunter2" not in str(excinfo.value)
    assert "bridge:***@db.example" in str(excinfo.value)


# -- puppets ----------------------------------------------------------------------------


async def test_marks_and_lookups_in_batches(store: Store) -> None:
    await store.mark_registered(ids(1, 2, 3))
    await store.mark_registered(iter(ids(4, 5)))
    assert await store.registered_among(ids(0, 1, 3, 5, 6)) == set(ids(1, 3, 5))
    assert await store.registered_among(ids(7, 8)) == set()
    assert await store.registered_among([]) == set()
    assert await store.is_registered(ids(2)[0])
    assert not await store.is_registered(ids(9)[0])


async def test_marking_is_idempotent(store: Store) -> None:
    await store.mark_registered(ids(1, 2, 2, 1))
    await store.mark_registered(ids(1, 2, 3))
    await store.mark_registered([])
    assert await store.count_registered() == 3
    assert await store.registered_among(ids(1, 1, 2, 3, 3)) == set(ids(1, 2, 3))


async def test_forget_some_then_all(store: Store) -> None:
    await store.mark_registered(ids(*range(10)))
    await store.forget_registered(ids(0, 1, 99))
    assert await store.count_registered() == 8
    assert await store.registered_among(ids(0, 1, 2)) == set(ids(2))
    await store.forget_registered([])
    assert await store.count_registered() == 8
    await store.forget_registered()
    assert await store.count_registered() == 0
    assert await store.registered_among(ids(*range(10))) == set()


async def test_many_concurrent_operations_do_not_interfere(store: Store) -> None:
    async def worker(n: int) -> set[str]:
        batch = ids(*range(n * 50, n * 50 + 50))
        await store.mark_registered(batch)
        await store.mark_transaction_done(f"txn{n}")
        return await store.registered_among(batch)

    results = await asyncio.gather(*(worker(n) for n in range(20)))
    assert all(len(found) == 50 for found in results)
    assert await store.count_registered() == 1000
    assert all([await store.is_transaction_done(f"txn{n}") for n in range(20)])


async def test_cancelled_writes_leave_the_store_usable(store: Store) -> None:
    # Cancel at successive await points, so some land inside a write transaction.
    for steps in range(8):
        task = asyncio.create_task(store.mark_registered(ids(*range(100), prefix=f"c{steps}_")))
        for _ in range(steps):
            await asyncio.sleep(0)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    await store.forget_registered()
    await store.mark_registered(ids(1, 2))
    await store.mark_transaction_done("after")
    assert await store.count_registered() == 2
    assert await store.is_transaction_done("after")


async def test_20000_puppets_round_trip(store: Store) -> None:
    known = ids(*range(20_000))
    for start in range(0, len(known), 1_000):
        await store.mark_registered(known[start : start + 1_000])
    assert await store.count_registered() == 20_000
    # One streamed lookup far over any SQL parameter limit, half of it unknown.
    unknown = (f"@_bk_stranger{n}:test.local" for n in range(20_000))
    candidates = (user_id for pair in zip(known, unknown, strict=True) for user_id in pair)
    assert await store.registered_among(candidates) == set(known)


# -- transactions -----------------------------------------------------------------------


async def test_transaction_done_is_remembered(store: Store) -> None:
    assert not await store.is_transaction_done("1")
    await store.mark_transaction_done("1")
    await store.mark_transaction_done("1")
    assert await store.is_transaction_done("1")
    assert not await store.is_transaction_done("2")


async def test_prune_keeps_the_most_recent_transactions(store: Store) -> None:
    # Insertion order, not txn id order, decides what is recent ("10" < "9" as text).
    for n in [5, 9, 10, 11, 2, 3, 4]:
        await store.mark_transaction_done(str(n))
    assert await store.prune_transactions(keep=3) == 4
    assert [await store.is_transaction_done(str(n)) for n in [5, 9, 10, 11, 2, 3, 4]] == [
        *[False] * 4,
        *[True] * 3,
    ]
    assert await store.prune_transactions(keep=3) == 0
    assert await store.prune_transactions(keep=100) == 0
    assert await store.prune_transactions(keep=0) == 3
    assert not await store.is_transaction_done("4")
    with pytest.raises(ValueError, match="keep must be >= 0"):
        await store.prune_transactions(keep=-1)


async def test_marking_a_transaction_again_does_not_make_it_recent(store: Store) -> None:
    for txn_id in ["1", "2", "3", "1"]:
        await store.mark_transaction_done(txn_id)
    assert await store.prune_transactions(keep=2) == 1
    assert not await store.is_transaction_done("1")
    assert await store.is_transaction_done("2")


async def test_recent_transactions_survive_pruning_of_a_refilled_table(store: Store) -> None:
    for n in range(5):
        await store.mark_transaction_done(f"a{n}")
    await store.prune_transactions(keep=0)
    for n in range(5):
        await store.mark_transaction_done(f"b{n}")
    assert await store.prune_transactions(keep=2) == 3
    assert await store.is_transaction_done("b4")
    assert await store.is_transaction_done("b3")
    assert not await store.is_transaction_done("b2")


# -- life cycle -------------------------------------------------------------------------


async def test_schema_version_is_current(store: Store) -> None:
    assert await store.schema_version() == Store.SCHEMA_VERSION == 6


async def test_a_closed_store_refuses_work(url: str) -> None:
    store = open_store(url)
    with pytest.raises(StoreError, match="not open"):
        await store.count_registered()
    async with store:
        await store.open()  # a second open is harmless
        await store.mark_registered(ids(1))
    await store.close()  # and so is a second close
    with pytest.raises(StoreError, match="not open"):
        await store.registered_among(ids(1))
    with pytest.raises(StoreError, match="not open"):
        await store.mark_transaction_done("1")


async def test_state_survives_close_and_reopen(durable_url: str) -> None:
    async with open_store(durable_url) as store:
        await store.mark_registered(ids(1, 2))
        await store.mark_transaction_done("t1")
        await store.mark_transaction_done("t2")
    async with open_store(durable_url) as store:
        assert await store.registered_among(ids(1, 2, 3)) == set(ids(1, 2))
        assert await store.is_transaction_done("t1")
        await store.mark_transaction_done("t3")
        # The order of transactions survives the restart too.
        assert await store.prune_transactions(keep=1) == 2
        assert await store.is_transaction_done("t3")
        assert await store.schema_version() == Store.SCHEMA_VERSION


# -- opening failures -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("layout", "reason"),
    [
        ("missing/store.db", "directory {tmp}/missing does not exist"),
        ("adir", "it is a directory"),
        ("afile/store.db", "{tmp}/afile is not a directory"),
        ("afile", "file is not a database"),
    ],
)
async def test_a_sqlite_path_that_cannot_be_opened(
    tmp_path: Path, layout: str, reason: str
) -> None:
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_bytes(b"this is not a SQLite database, just some text " * 100)
    store = open_store(f"sqlite:///{tmp_path / layout}")
    with pytest.raises(StoreError) as excinfo:
        await store.open()
    message = one_line_store_error(excinfo)
    assert message == f"cannot open SQLite store {tmp_path / layout}: " + reason.format(
        tmp=tmp_path
    )
    assert (tmp_path / "afile").read_bytes().startswith(b"this is not")


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
async def test_a_sqlite_directory_without_permission(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(StoreError) as excinfo:
        await open_store(f"sqlite:///{locked / 'store.db'}").open()
    assert one_line_store_error(excinfo).endswith(": permission denied")


async def test_an_unreachable_postgres_is_a_store_error_without_the_password() -> None:
    # Port 1 on loopback refuses at once; no PostgreSQL needed.
    store = open_store("postgresql://bridge:hunter2@127.0.0.1:1/bk")
    with pytest.raises(StoreError) as excinfo:
        await store.open()
    message = one_line_store_error(excinfo)
    assert message.startswith(
        "cannot open PostgreSQL store postgresql://bridge:***@127.0.0.1:1/bk: "
    )
    assert "hunter2" not in message
    assert "hunter2" not in repr(store)


async def test_a_malformed_postgres_url_is_a_store_error() -> None:
    with pytest.raises(StoreError, match="invalid URL") as excinfo:
        await open_store("postgresql://bridge@127.0.0.1:notaport/bk").open()
    one_line_store_error(excinfo)


async def test_a_missing_postgres_database_is_a_store_error(postgres_dsn: str) -> None:
    missing = postgres_dsn.rpartition("/")[0] + "/bk_no_such_database"
    with pytest.raises(StoreError) as excinfo:
        await open_store(missing).open()
    assert one_line_store_error(excinfo) == (
        f'cannot open PostgreSQL store {missing}: database "bk_no_such_database" does not exist'
    )


async def test_sqlite_uses_the_write_ahead_log(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'wal.db'}"
    async with open_store(url) as store:
        await store.mark_registered(ids(1))
    assert await run_sql(url, "PRAGMA journal_mode") == [("wal",)]


# -- migrations -------------------------------------------------------------------------


async def test_a_version_0_database_is_migrated(durable_url: str) -> None:
    await run_sql(
        durable_url,
        "CREATE TABLE bridge_kit_schema (version INTEGER NOT NULL)",
        "INSERT INTO bridge_kit_schema (version) VALUES (0)",
    )
    async with open_store(durable_url) as store:
        assert await store.schema_version() == Store.SCHEMA_VERSION
        await store.mark_registered(ids(1))
        assert await store.count_registered() == 1


async def test_a_version_1_database_is_migrated_to_a_newer_schema(durable_url: str) -> None:
    v1 = store_class(durable_url)
    newer = v1.SCHEMA_VERSION + 1
    await run_sql(
        durable_url,
        *v1.MIGRATIONS[0],
        "CREATE TABLE bridge_kit_schema (version INTEGER NOT NULL)",
        "INSERT INTO bridge_kit_schema (version) VALUES (1)",
        "INSERT INTO bridge_kit_puppets (user_id) VALUES ('@_bk_old:test.local')",
    )
    v2 = with_extra_migration(v1, "CREATE TABLE bridge_kit_extra (note TEXT)")
    async with store_at(v2, durable_url) as store:
        assert await store.schema_version() == newer
        assert await store.registered_among(["@_bk_old:test.local"]) == {"@_bk_old:test.local"}
    assert await run_sql(durable_url, "SELECT COUNT(*) FROM bridge_kit_extra") == [(0,)]
    # The migrated database is now too new for the current code.
    with pytest.raises(StoreError, match=f"schema version {newer} is newer"):
        await open_store(durable_url).open()


async def test_migration_steps_apply_in_one_transaction(durable_url: str) -> None:
    async with open_store(durable_url) as store:
        await store.mark_registered(ids(1))
    v1 = store_class(durable_url)
    broken = with_extra_migration(v1, "CREATE TABLE bridge_kit_extra (note TEXT)", "NOT SQL")
    store = store_at(broken, durable_url)
    with pytest.raises(StoreError, match="cannot open") as excinfo:
        await store.open()
    one_line_store_error(excinfo)
    # Nothing of the failed step remains: still the current version, no half-made table.
    version = await run_sql(durable_url, "SELECT version FROM bridge_kit_schema")
    assert version == [(Store.SCHEMA_VERSION,)]
    with pytest.raises((sqlite3.Error, asyncpg.PostgresError)):
        await run_sql(durable_url, "SELECT * FROM bridge_kit_extra")
    with pytest.raises(StoreError, match="not open"):
        await store.count_registered()


async def test_a_database_from_a_newer_version_is_refused(durable_url: str) -> None:
    async with open_store(durable_url):
        pass
    await run_sql(durable_url, "UPDATE bridge_kit_schema SET version = 99")
    store = open_store(durable_url)
    with pytest.raises(StoreError) as excinfo:
        await store.open()
    message = one_line_store_error(excinfo)
    assert (
        f"schema version 99 is newer than this bridge_kit supports ({Store.SCHEMA_VERSION})"
        in message
    )
    with pytest.raises(StoreError, match="not open"):
        await store.count_registered()


@pytest.mark.parametrize(
    ("dsn", "shown"),
    [
        ("postgresql://u:pw@h/db", "postgresql://u:***@h/db"),
        (
            "postgresql://u@h/db?password=s3cret&sslmode=disable",
            "postgresql://u@h/db?password=***&sslmode=disable",
        ),
        ("postgresql://h/db", "postgresql://h/db"),
        # A SQLite path is no secret, and the path must survive whole (issue 13).
        ("sqlite:////srv/bridge/x.db", "sqlite:////srv/bridge/x.db"),
        ("sqlite:///bridge_kit.db", "sqlite:///bridge_kit.db"),
        ("sqlite:///../data/with:colon@and#hash.db", "sqlite:///../data/with:colon@and#hash.db"),
        ("SQLITE:////srv/x.db", "SQLITE:////srv/x.db"),
        ("memory://", "memory://"),
    ],
)
def test_redact_dsn_hides_every_password(dsn: str, shown: str) -> None:
    assert redact_dsn(dsn) == shown


def test_a_parsed_sqlite_url_shows_its_absolute_path(tmp_path: Path) -> None:
    parsed = parse_store_url("sqlite:///sub/x.db", base_dir=tmp_path)
    assert str(parsed) == f"sqlite:///{tmp_path}/sub/x.db"
    assert str(parsed).startswith("sqlite:////")

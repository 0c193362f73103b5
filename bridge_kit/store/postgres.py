"""A store in PostgreSQL, through an asyncpg connection pool, for bridges that outgrow a file."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hashlib
import math
import time
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Iterable,
    Iterator,
    Sequence,
)
from typing import Any, ClassVar, NamedTuple, TypeVar

from bridge_kit._extras import install_extra
from bridge_kit.errors import StoreError
from bridge_kit.inbox.records import (
    Acceptance,
    DeadLetter,
    InboxItem,
    InboxStats,
    NewDeadLetter,
    NewInboxItem,
    ParkedItem,
    Parking,
)
from bridge_kit.store import (
    _devices_sql,
    inbox_rows,
    postgres_bridge,
    postgres_devices,
    postgres_inbox,
    postgres_leases,
    postgres_parked,
    postgres_retention,
    postgres_state,
)
from bridge_kit.store._bridge_sql import BridgeSQLHooks
from bridge_kit.store._shared_sql import SharedSQLHooks
from bridge_kit.store._sql import PostgresQuery, Query
from bridge_kit.store.base import Store, pending_migrations, profiles_of, unique_chunks
from bridge_kit.store.login_leases import LoginLease
from bridge_kit.store.url import redact_store_url, scrub_password, store_url_problem

_T = TypeVar("_T")

#: Lookups send one array parameter; chunking only bounds the size of one round trip.
_LOOKUP_CHUNK = 10_000

#: Serialises migrations of one database between processes starting at once.
_MIGRATION_LOCK_KEY = 0x6272_6B73  # "brks"


class _HeldLock(NamedTuple):
    """A crypto lock held by one task of one store, on the connection that holds it."""

    store: PostgresStore
    task: asyncio.Task[Any] | None
    conn: Any


#: The crypto lock the running task holds: its crypto reads and writes go through the
#: locked connection, so a locked block needs no second connection of the pool (ten
#: blocks at once would otherwise wait forever for an eleventh).
_HELD: contextvars.ContextVar[_HeldLock | None] = contextvars.ContextVar(
    "bridge_kit_crypto_lock", default=None
)


def crypto_lock_key(owner: str) -> int:
    """The advisory lock number of one owner's crypto state (64 bits, signed)."""
    digest = hashlib.blake2b(
        owner.encode("utf-8", "surrogatepass"), digest_size=8, person=b"bk-crypto-lock"
    )
    return int.from_bytes(digest.digest(), "big", signed=True)


_V1 = (
    "CREATE TABLE bridge_kit_puppets (user_id TEXT PRIMARY KEY)",
    "CREATE TABLE bridge_kit_transactions ("
    " txn_id TEXT PRIMARY KEY,"
    " seq BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE,"
    " done_at TIMESTAMPTZ NOT NULL DEFAULT now())",
)

# -- schema v5 (txn): dedup on txnId + body digest ---------------------------------
#: Schema version 5, the transaction part: each record keeps its body's digest (see
#: bridge_kit.inbox.transactions). A record without one (NULL) matches any body, so only the
#: newest record from before stays (see sqlite_puppets.V5_TXN_DIGEST).
_V5_TXN_DIGEST = (
    "ALTER TABLE bridge_kit_transactions ADD COLUMN digest BYTEA",
    "DELETE FROM bridge_kit_transactions"
    " WHERE seq < (SELECT MAX(seq) FROM bridge_kit_transactions)",
)
# -- end of schema v5 (txn) -------------------------------------------------------------

#: What a store without the driver says: asyncpg is an extra, so that bridges on
#: SQLite do not install it.
_NO_DRIVER = (
    "a postgresql:// store needs the asyncpg driver, which bridge_kit installs with its "
    f"postgres extra: {install_extra('postgres')}"
)


def _driver() -> Any:
    """The asyncpg module, imported on first use; a :class:`StoreError` naming the
    extra when it is not installed."""
    try:
        import asyncpg  # type: ignore[import-untyped]  # lazy: an extra
    except ImportError as error:
        raise StoreError(_NO_DRIVER) from error
    return asyncpg


def _driver_errors(asyncpg: Any) -> tuple[type[BaseException], ...]:
    """What a call through the pool raises when the database or the network fails."""
    return (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)


class PostgresStore(BridgeSQLHooks, SharedSQLHooks, Store):
    """A :class:`Store` in a PostgreSQL database (``postgresql://user@host:port/db``).

    The tables are prefixed ``bridge_kit_`` so the database can be shared with
    the bridge's own tables.
    """

    #: One tuple of SQL statements per schema version; step ``i`` goes from ``i`` to ``i + 1``.
    MIGRATIONS: ClassVar[Sequence[Sequence[str]]] = (
        _V1,
        postgres_inbox.V2,
        postgres_state.V3,
        postgres_devices.V4,
        # -- schema v5: one step; each part's statements in their own block --
        (
            *postgres_inbox.V5_LANES,
            *postgres_parked.V5,
            *postgres_retention.V5_RETENTION,
            *_V5_TXN_DIGEST,
        ),
        postgres_bridge.V6,
    )

    def __init__(
        self,
        dsn: str,
        *,
        min_connections: int = 1,
        max_connections: int = 10,
        connect_timeout: float = 10.0,
        command_timeout: float = 30.0,
        crypto_lock_wait: float = 120.0,
    ) -> None:
        """``crypto_lock_wait``: the longest wait for a device's crypto lock that
        another daemon holds (it holds it while encrypting, homeserver calls
        included), after which the call fails with a :class:`StoreError`."""
        self.dsn = dsn
        self.command_timeout = command_timeout
        self.crypto_lock_wait = crypto_lock_wait
        # command_timeout bounds every statement: a database that stops answering (or a
        # lock held elsewhere) fails the call with a StoreError instead of hanging it;
        # asyncpg cancels the statement on the server too.
        self._pool_args = {
            "min_size": min_connections,
            "max_size": max_connections,
            "timeout": connect_timeout,
            "command_timeout": command_timeout,
        }
        self._pool: Any = None
        self._failures: tuple[type[BaseException], ...] = ()  # set by open()
        self._connect_timeout = connect_timeout
        self._leases = postgres_leases.PostgresLeases(
            self._lease_connection, self._errors, command_timeout
        )

    def __repr__(self) -> str:
        return f"PostgresStore({redact_store_url(self.dsn)!r})"

    # -- life cycle ----------------------------------------------------------

    async def open(self) -> None:
        if self._pool is not None:
            return
        where = f"cannot open PostgreSQL store {redact_store_url(self.dsn)}"
        # Checked here too, for a store built without parse_store_url: asyncpg would
        # quote the misplaced piece of a password back in its error.
        problem = store_url_problem(self.dsn)
        if problem is not None:
            raise StoreError(f"{where}: the URL {problem}")
        asyncpg = _driver()
        self._failures = _driver_errors(asyncpg)
        failures: tuple[type[BaseException], ...] = (*self._failures, ValueError)
        try:
            self._pool = await asyncpg.create_pool(self.dsn, **self._pool_args)
            await self._migrate()
        except failures as error:
            await self.close()
            # asyncpg may quote a piece of the URL back (a bad port, a query field).
            problem = scrub_password(_one_line(error), self.dsn)
            if isinstance(error, ValueError):  # asyncpg's verdict on a malformed URL
                problem = f"invalid URL: {problem}"
            raise StoreError(f"{where}: {problem}") from error
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        await self._leases.close()
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    async def _migrate(self) -> None:
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK_KEY)
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS bridge_kit_schema (version INTEGER NOT NULL)"
            )
            found = await conn.fetchval("SELECT COALESCE(MAX(version), 0) FROM bridge_kit_schema")
            where = f"PostgreSQL store {redact_store_url(self.dsn)}"
            steps = pending_migrations(found, self.SCHEMA_VERSION, where)
            for step in steps:
                for statement in self.MIGRATIONS[step]:
                    await conn.execute(statement)
            if steps:
                await conn.execute("DELETE FROM bridge_kit_schema")
                await conn.execute(
                    "INSERT INTO bridge_kit_schema (version) VALUES ($1)", self.SCHEMA_VERSION
                )

    # -- plumbing ------------------------------------------------------------

    def _connected(self) -> Any:
        if self._pool is None:
            raise StoreError(f"PostgreSQL store {redact_store_url(self.dsn)} is not open")
        return self._pool

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except self._failures as error:
            where = f"PostgreSQL store {redact_store_url(self.dsn)}"
            problem = scrub_password(_one_line(error), self.dsn)
            if isinstance(error, TimeoutError):
                problem = f"no answer within {self.command_timeout:g} s (command_timeout)"
            raise StoreError(f"{where}: {problem}") from error

    async def _execute(self, sql: str, *args: object) -> str:
        pool = self._connected()
        with self._errors():
            status: str = await pool.execute(sql, *args)
        return status

    async def _fetchval(self, sql: str, *args: object) -> Any:
        pool = self._connected()
        with self._errors():
            return await pool.fetchval(sql, *args)

    async def _run(self, operation: Callable[[Any], Awaitable[_T]]) -> _T:
        """``operation(pool)``, with the pool's errors as :class:`StoreError`."""
        pool = self._connected()
        with self._errors():
            return await operation(pool)

    async def _query(self, operation: Callable[[Query], Awaitable[_T]]) -> _T:
        """Run shared statements (see :mod:`bridge_kit.store._sql`), each committing
        on its own."""
        return await self._run(lambda pool: operation(PostgresQuery(pool)))

    async def _query_in_transaction(self, operation: Callable[[Query], Awaitable[_T]]) -> _T:
        """Run shared statements on one connection, in one transaction."""

        async def in_transaction(pool: Any) -> _T:
            async with pool.acquire() as conn, conn.transaction():
                return await operation(PostgresQuery(conn))

        return await self._run(in_transaction)

    # -- puppets -------------------------------------------------------------

    async def _registered_among(self, user_ids: Iterable[str]) -> set[str]:
        pool = self._connected()
        found: set[str] = set()
        with self._errors():
            for chunk in unique_chunks(user_ids, _LOOKUP_CHUNK):
                rows = await pool.fetch(
                    "SELECT user_id FROM bridge_kit_puppets WHERE user_id = ANY($1::text[])", chunk
                )
                found.update(row[0] for row in rows)
        return found

    async def _mark_registered(self, user_ids: list[str]) -> None:
        if user_ids:
            await self._execute(
                "INSERT INTO bridge_kit_puppets (user_id)"
                " SELECT unnest($1::text[]) ON CONFLICT DO NOTHING",
                user_ids,
            )

    async def _forget_registered(self, user_ids: Iterable[str] | None) -> None:
        if user_ids is None:
            await self._execute("DELETE FROM bridge_kit_puppets")
        else:
            await self._execute(
                "DELETE FROM bridge_kit_puppets WHERE user_id = ANY($1::text[])",
                list(user_ids),
            )

    async def count_registered(self) -> int:
        return int(await self._fetchval("SELECT COUNT(*) FROM bridge_kit_puppets"))

    # -- transactions --------------------------------------------------------

    async def is_transaction_done(self, txn_id: str) -> bool:
        sql = "SELECT EXISTS (SELECT 1 FROM bridge_kit_transactions WHERE txn_id = $1)"
        return bool(await self._fetchval(sql, _txn_key(txn_id)))

    async def mark_transaction_done(self, txn_id: str) -> None:
        # A single statement commits on its own, and synchronous_commit is on by default.
        await self._execute(
            "INSERT INTO bridge_kit_transactions (txn_id) VALUES ($1) ON CONFLICT DO NOTHING",
            _txn_key(txn_id),
        )

    async def _prune_transactions(self, keep: int, max_age: float | None) -> int:
        cutoff = -math.inf if max_age is None else time.time() - max_age
        status = await self._execute(
            "DELETE FROM bridge_kit_transactions WHERE seq <= ("
            " SELECT seq FROM bridge_kit_transactions ORDER BY seq DESC LIMIT 1 OFFSET $1)"
            " OR done_at < to_timestamp($2)",
            keep,
            cutoff,
        )
        return int(status.rsplit(" ", 1)[-1])

    async def schema_version(self) -> int:
        return int(await self._fetchval("SELECT MAX(version) FROM bridge_kit_schema"))

    # -- the inbox (SQL in postgres_inbox) -----------------------------------
    #
    # Times are this process's time.time(), like the not_before its caller computes;
    # processes sharing the database need clocks in step (NTP) for leases to hold.

    async def _accept_transaction(
        self,
        txn_id: str,
        items: Sequence[NewInboxItem],
        rejected: Sequence[NewDeadLetter],
        digest: bytes,
    ) -> Acceptance:
        now = time.time()
        return await self._run(
            lambda pool: postgres_inbox.accept(pool, _txn_key(txn_id), items, rejected, now, digest)
        )

    async def _claim_lanes(
        self, owner: str, lease: float, limit: int, exclude: Collection[str]
    ) -> list[str]:
        now = time.time()
        return await self._run(
            lambda pool: postgres_inbox.claim(pool, owner, now + lease, limit, exclude, now)
        )

    async def _renew_lanes(self, owner: str, lanes: Collection[str], lease: float) -> set[str]:
        until = time.time() + lease
        return await self._run(lambda pool: postgres_inbox.renew(pool, owner, lanes, until))

    async def _release_lane(self, owner: str, lane: str) -> None:
        await self._run(lambda pool: postgres_inbox.release(pool, owner, lane))

    async def _lane_items(self, lane: str, limit: int) -> list[InboxItem]:
        return await self._run(lambda pool: postgres_inbox.lane_items(pool, lane, limit))

    async def complete_item(self, item_id: int) -> None:
        await self._run(lambda pool: postgres_inbox.complete(pool, item_id))

    async def complete_items(self, item_ids: Collection[int]) -> None:
        if item_ids:
            await self._run(lambda pool: postgres_inbox.complete_many(pool, item_ids))

    async def fail_item(
        self,
        item_id: int,
        done_handlers: Sequence[str],
        not_before: float,
        *,
        count_attempt: bool = True,
    ) -> None:
        now = time.time()
        await self._run(
            lambda pool: postgres_inbox.fail(
                pool, item_id, done_handlers, not_before, now, count_attempt
            )
        )

    async def _bury_item(self, item_id: int, letter: NewDeadLetter) -> None:
        now = time.time()
        await self._run(lambda pool: postgres_inbox.bury(pool, item_id, letter, now))

    async def _dead_letters(self, limit: int | None) -> list[DeadLetter]:
        return await self._run(lambda pool: postgres_inbox.dead_letters(pool, limit))

    async def replay_dead_letters(
        self, ids: Collection[int] | None = None, *, all_handlers: bool = False
    ) -> int:
        now = time.time()
        return await self._run(lambda pool: postgres_inbox.replay(pool, ids, now, all_handlers))

    async def drop_dead_letters(self, ids: Collection[int] | None = None) -> int:
        return await self._run(lambda pool: postgres_inbox.drop(pool, ids))

    async def inbox_stats(self) -> InboxStats:
        return await self._run(postgres_inbox.stats)

    # -- parked items (SQL in postgres_parked and inbox_rows) -------------------

    async def _park_item(self, item_id: int, parking: Parking) -> bool:
        return await self._run(lambda pool: postgres_parked.park(pool, item_id, parking))

    async def _unpark_items(self, key: str) -> int:
        return await self._run(lambda pool: postgres_parked.unpark(pool, key))

    async def _parked_items(
        self, key: str | None, due_by: float | None, limit: int
    ) -> list[ParkedItem]:
        return await self._query(lambda q: inbox_rows.parked_items(q, key, due_by, limit))

    async def count_parked(self) -> int:
        return await self._query(inbox_rows.count_parked)

    async def _bury_parked(self, item_id: int, letter: NewDeadLetter) -> bool:
        now = time.time()
        return await self._run(lambda pool: postgres_parked.bury(pool, item_id, letter, now))

    async def _prune_dead_letters(self, keep: int, before: float) -> int:
        return await self._run(
            lambda pool: postgres_retention.prune_dead_letters(pool, keep, before)
        )

    async def _prune_crypto(self, kind: str, before: float) -> int:
        return await self._run(lambda pool: postgres_retention.prune_crypto(pool, kind, before))

    async def to_device_since(self) -> float | None:
        return await self._run(postgres_retention.to_device_since)

    # -- room state (SQL in postgres_state) -----------------------------------

    async def _joined_among(self, pairs: list[tuple[str, str]]) -> set[tuple[str, str]]:
        return set(await self._run(lambda pool: postgres_state.joined_among(pool, pairs)))

    async def _profiles_among(self, user_ids: list[str]) -> dict[str, dict[str, str | None]]:
        rows = await self._run(lambda pool: postgres_state.profiles_among(pool, user_ids))
        return profiles_of(rows)

    # -- login leases (postgres_leases) ---------------------------------------------

    login_leases_shared: ClassVar[bool] = True

    async def _take_login_lease(self, login_id: str) -> LoginLease | None:
        self._connected()
        return await self._leases.take(login_id)

    async def check_login_leases(self) -> None:
        await self._leases.check()

    async def _lease_connection(self) -> Any:
        """A connection of the leases' own, outside the pool: it lives as long as they do."""
        return await _driver().connect(
            self.dsn, timeout=self._connect_timeout, command_timeout=self.command_timeout
        )

    # -- devices and crypto state (SQL in _devices_sql and postgres_devices) ---------

    crypto_shared: ClassVar[bool] = True

    @contextlib.asynccontextmanager
    async def _crypto_lock(self, owner: str) -> AsyncIterator[None]:
        """A session advisory lock on a connection of its own, released when the
        block ends (or the connection drops: a daemon that dies frees the lock)."""
        held = self._held()
        if held is not None:  # nested in a block of this task: the same connection
            await self._lock_on(held.conn, owner)
            try:
                yield
            finally:
                await self._unlock_on(held.conn, owner)
            return
        pool = self._connected()
        with self._errors():
            conn = await pool.acquire()
        try:
            await self._lock_on(conn, owner)
            token = _HELD.set(_HeldLock(self, asyncio.current_task(), conn))
            try:
                yield
            finally:
                _HELD.reset(token)
                await self._unlock_on(conn, owner)
        finally:
            await pool.release(conn)

    async def _lock_on(self, conn: Any, owner: str) -> None:
        try:
            with self._errors():
                await conn.execute(
                    "SELECT pg_advisory_lock($1)",
                    crypto_lock_key(owner),
                    timeout=self.crypto_lock_wait,
                )
        except StoreError as error:
            if isinstance(error.__cause__, TimeoutError):
                raise StoreError(
                    f"PostgreSQL store {redact_store_url(self.dsn)}: the crypto lock of "
                    f"{owner} was held elsewhere for over {self.crypto_lock_wait:g} s "
                    "(another daemon encrypting as that device)"
                ) from error
            raise

    async def _unlock_on(self, conn: Any, owner: str) -> None:
        # A broken connection took the lock with it; the pool replaces it on release.
        with contextlib.suppress(*self._failures):
            await conn.execute("SELECT pg_advisory_unlock($1)", crypto_lock_key(owner))

    def _held(self) -> _HeldLock | None:
        """The crypto lock this task holds on this store, if any."""
        held = _HELD.get()
        if held is None or held.store is not self or held.task is not asyncio.current_task():
            return None  # another store's, or a task started inside a block
        return held

    async def _crypto_query(self, operation: Callable[[Query], Awaitable[_T]]) -> _T:
        held = self._held()
        if held is None:
            return await self._query(operation)
        with self._errors():
            return await operation(PostgresQuery(held.conn))

    async def _crypto_get(self, owner: str, kind: str, key: str) -> bytes | None:
        return await self._crypto_query(lambda q: _devices_sql.crypto_get(q, owner, kind, key))

    async def _crypto_items(self, owner: str, kind: str) -> dict[str, bytes]:
        return await self._crypto_query(lambda q: _devices_sql.crypto_items(q, owner, kind))

    async def _crypto_delete(self, owner: str, kind: str, key: str) -> None:
        await self._crypto_query(lambda q: _devices_sql.crypto_delete(q, owner, kind, key))

    async def _crypto_delete_many(self, owner: str, kind: str, keys: list[str]) -> None:
        # One executemany: atomic in asyncpg, on the locked connection if there is one.
        await self._crypto_query(lambda q: _devices_sql.crypto_delete_many(q, owner, kind, keys))

    async def _crypto_put_many(self, owner: str, kind: str, items: dict[str, bytes]) -> None:
        now = time.time()
        held = self._held()
        target = self._connected() if held is None else held.conn
        with self._errors():
            await postgres_devices.crypto_put_many(target, owner, kind, items, now)

    async def _crypto_put_new(self, owner: str, kind: str, key: str, value: bytes) -> bytes | None:
        now = time.time()
        held = self._held()
        target = self._connected() if held is None else held.conn
        with self._errors():
            return await postgres_devices.crypto_put_new(target, owner, kind, key, value, now)


def _txn_key(txn_id: str) -> bytes:
    """How a txnId is stored: its UTF-8 bytes, so a NUL in it is no error.

    surrogatepass keeps the encoding one-to-one for any str, even one with lone
    surrogates from a percent-decoded path; other txnIds encode as plain UTF-8,
    which is what version 1's text rows were converted to.
    """
    return txn_id.encode("utf-8", "surrogatepass")


def _one_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]

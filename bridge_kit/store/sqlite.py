"""The embedded default store: one SQLite file, through aiosqlite."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import math
import os
import sqlite3
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
from pathlib import Path
from typing import ClassVar, TypeVar

import aiosqlite

from bridge_kit import defaults
from bridge_kit.errors import StoreError
from bridge_kit.inbox.records import (
    Acceptance,
    DeadLetter,
    InboxItem,
    InboxStats,
    NewDeadLetter,
    NewInboxItem,
)
from bridge_kit.store import (
    sqlite_bridge,
    sqlite_devices,
    sqlite_files,
    sqlite_inbox,
    sqlite_puppets,
    sqlite_retention,
    sqlite_state,
)
from bridge_kit.store._bridge_sql import BridgeSQLHooks
from bridge_kit.store._shared_sql import SharedSQLHooks
from bridge_kit.store._sql import Query, SQLiteQuery
from bridge_kit.store.base import Store, pending_migrations, profiles_of, unique_chunks
from bridge_kit.store.sqlite_inbox import MAX_VARIABLES as _MAX_VARIABLES
from bridge_kit.store.sqlite_parked import V5 as _PARKED_V5
from bridge_kit.store.sqlite_parked import SQLiteParkedItems

_T = TypeVar("_T")

log = logging.getLogger(__name__)

#: Commits on the event loop's connection between two checkpoints on the thread.
_CHECKPOINT_EVERY = 100
#: The most crypto values written on the event loop's connection in one commit; a
#: bigger batch (a device list query's answer for many users) goes to the thread.
_LOOP_CRYPTO_BATCH = 64


class SQLiteStore(SQLiteParkedItems, BridgeSQLHooks, SharedSQLHooks, Store):
    """A :class:`Store` in one SQLite file (WAL journal, one connection).

    ``path`` is relative to the current directory unless absolute; the file is
    created if missing, but its directory must exist. Writes are serialised on
    the single connection and each batch is one transaction.

    ``sync``, the ``synchronous`` pragma: ``normal`` (a power cut can lose the commits
    since the last checkpoint) or ``full`` (none; acceptance then commits off the loop).
    """

    #: One tuple of SQL statements per schema version; step ``i`` goes from ``i`` to ``i + 1``.
    MIGRATIONS: ClassVar[Sequence[Sequence[str]]] = (
        sqlite_puppets.V1,
        sqlite_inbox.V2,
        sqlite_state.V3,
        sqlite_devices.V4,
        # -- schema v5: one step; each part's statements in their own block --
        (
            *sqlite_inbox.V5_LANES,
            *_PARKED_V5,
            *sqlite_retention.V5_RETENTION,
            *sqlite_puppets.V5_TXN_DIGEST,
        ),
        sqlite_bridge.V6,
    )

    def __init__(self, path: str | os.PathLike[str], *, sync: str = defaults.STORE_SYNC) -> None:
        self.path = Path(path).absolute()
        self.sync = sqlite_files.checked_sync(sync)
        self._conn: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()
        self._records: sqlite3.Connection | None = None
        self._daemon_lock: int | None = None  # the lock file's descriptor, see lock_for_daemon
        self._loop_commits = 0
        self._checkpoint_task: asyncio.Task[None] | None = None
        # The crypto keys written or deleted on aiosqlite's thread, waiting or under way.
        self._crypto_on_thread: collections.Counter[tuple[str, str, str]] = collections.Counter()

    def __repr__(self) -> str:
        return f"SQLiteStore({str(self.path)!r})"

    # -- life cycle ----------------------------------------------------------

    async def open(self) -> None:
        if self._conn is not None:
            return
        sqlite_files.create_private(self.path)
        try:
            self._conn = await aiosqlite.connect(self.path, isolation_level=None)
            await self._conn.execute("PRAGMA journal_mode=WAL")
            # In WAL mode NORMAL loses no commit when this process crashes; only an OS crash
            # or a power cut can lose the last ones (docs/delivery.md, Power loss).
            for pragma in sqlite_files.connection_pragmas(self.sync):
                await self._conn.execute(pragma)
            await self._migrate()
            self._records = sqlite_puppets.connect_records(self.path, self.sync)
        except sqlite3.Error as error:
            await self.close()
            raise StoreError(sqlite_files.open_problem(self.path, error)) from error
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        if self._checkpoint_task is not None:
            await asyncio.gather(self._checkpoint_task, return_exceptions=True)
        daemon_lock, self._daemon_lock = self._daemon_lock, None
        if daemon_lock is not None:
            os.close(daemon_lock)  # which releases the flock
        records, self._records = self._records, None
        if records is not None:
            records.close()
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()

    async def lock_for_daemon(self) -> None:
        """Take an exclusive ``flock`` on ``<path>.lock``, held until :meth:`close`.

        A SQLite file has one writer at a time, so a second daemon would not share
        the work, only queue behind the first for every write. The lock belongs to
        this open file description: it goes with the process however that ends, and
        a second store on the same path conflicts even within one process.
        """
        if self._daemon_lock is not None:
            return
        fd = sqlite_files.lock_exclusively(self.path)
        self._daemon_lock = fd
        # Leases left by a daemon that died (SIGKILL, power loss) would hold its
        # rooms for a whole lease; with the lock, nobody else can be working on them.
        with self._errors():
            async with self._transaction() as conn:
                await sqlite_inbox.forget_leases(conn)

    async def _migrate(self) -> None:
        async with self._transaction() as conn:
            found = await self._read_version(conn)
            steps = pending_migrations(found, self.SCHEMA_VERSION, f"SQLite store {self.path}")
            for step in steps:
                for statement in self.MIGRATIONS[step]:
                    await conn.execute(statement)
            if steps:
                await conn.execute("DELETE FROM bridge_kit_schema")
                await conn.execute(
                    "INSERT INTO bridge_kit_schema (version) VALUES (?)", (self.SCHEMA_VERSION,)
                )

    @staticmethod
    async def _read_version(conn: aiosqlite.Connection) -> int:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS bridge_kit_schema (version INTEGER NOT NULL)"
        )
        rows = list(await conn.execute_fetchall("SELECT MAX(version) FROM bridge_kit_schema"))
        version = rows[0][0]
        return int(version) if version is not None else 0

    # -- plumbing ------------------------------------------------------------

    def _connection(self) -> aiosqlite.Connection:
        if self._conn is None:
            raise StoreError(f"SQLite store {self.path} is not open")
        return self._conn

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as error:
            raise StoreError(f"SQLite store {self.path}: {error}") from error

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """One write transaction; the lock keeps other coroutines' statements out of it."""
        conn = self._connection()
        async with self._lock:
            try:
                await conn.execute("BEGIN IMMEDIATE")
                yield conn
                await conn.execute("COMMIT")
            except BaseException:
                # Statements queued before a cancellation still run, in order, on the
                # connection's thread; this ROLLBACK runs after them, or finds nothing to undo.
                with contextlib.suppress(sqlite3.Error):
                    await conn.execute("ROLLBACK")
                raise

    async def _locked(self, operation: Callable[[aiosqlite.Connection], Awaitable[_T]]) -> _T:
        """Run ``operation`` alone on the connection; each statement commits on its own."""
        conn = self._connection()
        with self._errors():
            async with self._lock:
                return await operation(conn)

    async def _in_transaction(
        self, operation: Callable[[aiosqlite.Connection], Awaitable[_T]]
    ) -> _T:
        """Run ``operation``'s statements in one write transaction."""
        with self._errors():
            async with self._transaction() as conn:
                return await operation(conn)

    async def _query(self, operation: Callable[[Query], Awaitable[_T]]) -> _T:
        """Run shared statements (see :mod:`bridge_kit.store._sql`) under the lock."""
        return await self._locked(lambda conn: operation(SQLiteQuery(conn)))

    async def _query_in_transaction(self, operation: Callable[[Query], Awaitable[_T]]) -> _T:
        """Run shared statements in one write transaction."""
        return await self._in_transaction(lambda conn: operation(SQLiteQuery(conn)))

    # -- puppets -------------------------------------------------------------

    async def _registered_among(self, user_ids: Iterable[str]) -> set[str]:
        conn = self._connection()
        found: set[str] = set()
        with self._errors():
            async with self._lock:
                for chunk in unique_chunks(user_ids, _MAX_VARIABLES):
                    rows = await conn.execute_fetchall(
                        sqlite_puppets.select_puppets(len(chunk)), chunk
                    )
                    found.update(row[0] for row in rows)
        return found

    async def _mark_registered(self, user_ids: list[str]) -> None:
        # Sorted, the rows go into the b-tree in key order: fewer page splits.
        rows = [(user_id,) for user_id in sorted(user_ids)]
        if not rows:
            return
        with self._errors():
            async with self._transaction() as conn:
                await conn.executemany(
                    "INSERT OR IGNORE INTO bridge_kit_puppets (user_id) VALUES (?)", rows
                )

    async def _forget_registered(self, user_ids: Iterable[str] | None) -> None:
        with self._errors():
            async with self._transaction() as conn:
                if user_ids is None:
                    await conn.execute("DELETE FROM bridge_kit_puppets")
                    return
                await conn.executemany(
                    "DELETE FROM bridge_kit_puppets WHERE user_id = ?",
                    [(user_id,) for user_id in set(user_ids)],
                )

    async def count_registered(self) -> int:
        return await self._fetch_int("SELECT COUNT(*) FROM bridge_kit_puppets")

    # -- transactions --------------------------------------------------------

    # Transaction records go through a second, plain connection used on the event loop:
    # a lookup by primary key or a one-row insert into the WAL (no fsync, see
    # mark_transaction_done) takes microseconds, less than the trip to aiosqlite's thread
    # and back, which on a busy loop waits behind every other ready task. Should the
    # other connection hold the write lock, the insert does not wait on the loop: it
    # takes the thread path instead.

    def _records_connection(self) -> sqlite3.Connection:
        self._connection()
        assert self._records is not None
        return self._records

    async def is_transaction_done(self, txn_id: str) -> bool:
        records = self._records_connection()
        with self._errors():
            # fetchall, not fetchone: a statement left unfinished keeps a read transaction open.
            rows = records.execute(
                sqlite_puppets.SELECT_TRANSACTION, (sqlite_puppets.txn_key(txn_id),)
            ).fetchall()
        return bool(rows)

    async def mark_transaction_done(self, txn_id: str) -> None:
        """Record ``txn_id`` as done; the commit has happened when this returns.

        WAL mode with synchronous=NORMAL: the record survives a crash of this
        process, but an OS crash or a power cut may lose the last commits. That
        only matters if the homeserver re-sends a transaction after it saw our 200,
        and it does not: the 200 ends that transaction for it. Syncing each commit
        (FULL) would buy one fsync per transaction against a double failure (power
        lost here and, before it recorded our 200, on the homeserver too), after
        which the bridge's own side effects are not exactly-once either.
        """
        parameters = (sqlite_puppets.txn_key(txn_id), time.time())
        records = self._records_connection()
        try:
            with self._errors():
                records.execute(sqlite_puppets.INSERT_TRANSACTION, parameters)
            self._after_loop_commit()
            return
        except StoreError as error:
            if getattr(error.__cause__, "sqlite_errorcode", None) != sqlite3.SQLITE_BUSY:
                raise
        with self._errors():
            async with self._transaction() as conn:
                await conn.execute(sqlite_puppets.INSERT_TRANSACTION, parameters)

    async def _prune_transactions(self, keep: int, max_age: float | None) -> int:
        cutoff = -math.inf if max_age is None else time.time() - max_age
        conn = self._connection()
        with self._errors():
            async with self._lock:
                # One statement, so one implicit transaction: the write lock is held only
                # while it runs, not across trips between the loop and the thread, during
                # which mark_transaction_done would find the database busy.
                cursor = await conn.execute(sqlite_puppets.PRUNE_TRANSACTIONS, (keep, cutoff))
                return cursor.rowcount

    async def schema_version(self) -> int:
        return await self._fetch_int("SELECT MAX(version) FROM bridge_kit_schema")

    async def _fetch_int(self, sql: str, parameters: Sequence[object] = ()) -> int:
        conn = self._connection()
        with self._errors():
            async with self._lock:
                rows = list(await conn.execute_fetchall(sql, parameters))
        return int(rows[0][0])

    # -- the inbox (SQL in sqlite_inbox) -------------------------------------

    async def _accept_transaction(
        self,
        txn_id: str,
        items: Sequence[NewInboxItem],
        rejected: Sequence[NewDeadLetter],
        digest: bytes,
    ) -> Acceptance:
        """Record ``txn_id`` and append the events in one commit (see
        :meth:`mark_transaction_done` for what synchronous=NORMAL means for it)."""
        now, key = time.time(), sqlite_puppets.txn_key(txn_id)
        accepted = self._accept_now(key, digest, items, rejected, now)
        if accepted is not None:
            return accepted

        async def accept(conn: aiosqlite.Connection) -> Acceptance:
            # Under BEGIN IMMEDIATE no other writer runs, so a record already there
            # means a duplicate, however many are in flight.
            acceptance = await sqlite_puppets.record(conn, key, digest, now)
            if acceptance:
                await sqlite_inbox.append(conn, items, rejected, now)
            return acceptance

        return await self._in_transaction(accept)

    def _accept_now(
        self,
        txn_id: str | bytes,
        digest: bytes,
        items: Sequence[NewInboxItem],
        rejected: Sequence[NewDeadLetter],
        now: float,
    ) -> Acceptance | None:
        """Accept on the plain connection, on the loop: ``None`` if the database is busy.

        A transaction's rows committed in the WAL take a fraction of a millisecond,
        less than the trip to aiosqlite's thread and back (see the records connection
        above); when another connection holds the write lock, the caller takes the
        thread path instead of waiting here.
        """

        def accept(records: sqlite3.Connection) -> Acceptance:
            acceptance = sqlite_puppets.record_now(records, txn_id, digest, now)
            if acceptance:
                sqlite_inbox.append_now(records, items, rejected, now)
            return acceptance

        return self._on_loop(accept)

    def _on_loop(
        self,
        work: Callable[[sqlite3.Connection], _T],
        *,
        transaction: bool = True,
        write: bool = True,
    ) -> _T | None:
        """``work`` on the plain connection, on the event loop, in one write transaction
        (or, ``transaction=False``, one statement that commits on its own, or a read):
        its result, or ``None`` if another connection holds the write lock, or if a
        write's commit would be synced (``sync: full``: an fsync must not block the loop)."""
        if write and self.sync == "full":
            return None
        records = self._records_connection()
        try:
            with self._errors():
                if transaction:
                    records.execute("BEGIN IMMEDIATE")
                try:
                    result = work(records)
                    if transaction:
                        records.execute("COMMIT")
                except BaseException:
                    if transaction:
                        with contextlib.suppress(sqlite3.Error):
                            records.execute("ROLLBACK")
                    raise
        except StoreError as error:
            if getattr(error.__cause__, "sqlite_errorcode", None) == sqlite3.SQLITE_BUSY:
                return None
            raise
        if write:
            self._after_loop_commit()
        return result

    def _after_loop_commit(self) -> None:
        """Every so many commits on the loop's connection, checkpoint on the thread."""
        self._loop_commits += 1
        if self._loop_commits < _CHECKPOINT_EVERY:
            return
        if self._checkpoint_task is None or self._checkpoint_task.done():
            self._loop_commits = 0
            self._checkpoint_task = asyncio.create_task(self._checkpoint())

    async def _checkpoint(self) -> None:
        # The handled items go first (see sqlite_inbox.purge_done), in bulk: far fewer
        # pages written than one delete per commit, and no longer in the WAL to copy.
        try:
            await self._in_transaction(sqlite_inbox.purge_done)
        except StoreError as error:
            log.warning("SQLite: could not delete handled inbox items; will try again: %s", error)
        # PASSIVE: copies what it can without waiting for readers or blocking writers.
        try:
            with self._errors():
                async with self._lock:
                    await self._connection().execute("PRAGMA wal_checkpoint(PASSIVE)")
        except StoreError as error:
            log.warning("SQLite checkpoint failed; will try again later: %s", error)

    async def _claim_lanes(
        self, owner: str, lease: float, limit: int, exclude: Collection[str]
    ) -> list[str]:
        now = time.time()
        # A read first: most claims during a flood find nothing (see claimable).
        if not await self._locked(lambda c: sqlite_inbox.claimable(c, owner, limit, exclude, now)):
            return []
        return await self._in_transaction(
            lambda conn: sqlite_inbox.claim(conn, owner, now + lease, limit, exclude, now)
        )

    async def _renew_lanes(self, owner: str, lanes: Collection[str], lease: float) -> set[str]:
        until = time.time() + lease
        return await self._in_transaction(
            lambda conn: sqlite_inbox.renew(conn, owner, lanes, until)
        )

    async def _release_lane(self, owner: str, lane: str) -> None:
        await self._in_transaction(lambda conn: sqlite_inbox.release(conn, owner, lane))

    async def _lane_items(self, lane: str, limit: int) -> list[InboxItem]:
        """Read on the loop's connection: a lane's next items take less time to read
        than the trip to aiosqlite's thread, and the inbox reads them all the time."""
        read = functools.partial(sqlite_inbox.lane_items_now, lane=lane, limit=limit)
        items = self._on_loop(read, transaction=False, write=False)
        if items is not None:
            return items
        return await self._locked(lambda conn: sqlite_inbox.lane_items(conn, lane, limit))

    async def complete_item(self, item_id: int) -> None:
        await self._locked(lambda conn: sqlite_inbox.complete(conn, item_id))

    async def complete_items(self, item_ids: Collection[int]) -> None:
        """Remove the items in one commit, on the loop's connection like an accept:
        the inbox commits after every handled event (a group commit of the lanes), and
        on aiosqlite's connection each commit would queue for the write lock behind the
        acknowledgements, in SQLite's busy handler, which sleeps. The items are marked
        handled, and deleted in bulk with the next checkpoint (see sqlite_inbox)."""
        if not item_ids:
            return
        many = len(item_ids) > _MAX_VARIABLES  # then more than one statement
        mark = functools.partial(sqlite_inbox.complete_now, item_ids=item_ids)
        if self._on_loop(mark, transaction=many) is None:
            run = self._in_transaction if many else self._locked
            await run(lambda conn: sqlite_inbox.complete_many(conn, item_ids))

    async def fail_item(
        self,
        item_id: int,
        done_handlers: Sequence[str],
        not_before: float,
        *,
        count_attempt: bool = True,
    ) -> None:
        now = time.time()
        await self._in_transaction(
            lambda conn: sqlite_inbox.fail(
                conn, item_id, done_handlers, not_before, now, count_attempt
            )
        )

    async def _bury_item(self, item_id: int, letter: NewDeadLetter) -> None:
        now = time.time()
        await self._in_transaction(lambda conn: sqlite_inbox.bury(conn, item_id, letter, now))

    async def _dead_letters(self, limit: int | None) -> list[DeadLetter]:
        return await self._locked(lambda conn: sqlite_inbox.dead_letters(conn, limit))

    async def replay_dead_letters(
        self, ids: Collection[int] | None = None, *, all_handlers: bool = False
    ) -> int:
        now = time.time()
        return await self._in_transaction(
            lambda conn: sqlite_inbox.replay(conn, ids, now, all_handlers)
        )

    async def drop_dead_letters(self, ids: Collection[int] | None = None) -> int:
        return await self._in_transaction(lambda conn: sqlite_inbox.drop(conn, ids))

    async def inbox_stats(self) -> InboxStats:
        return await self._locked(sqlite_inbox.stats)

    async def _prune_dead_letters(self, keep: int, before: float) -> int:
        return await sqlite_retention.in_chunks(
            self._locked, lambda conn: sqlite_retention.prune_dead_letters(conn, keep, before)
        )

    async def _prune_crypto(self, kind: str, before: float) -> int:
        return await sqlite_retention.in_chunks(
            self._locked, lambda conn: sqlite_retention.prune_crypto(conn, kind, before)
        )

    async def to_device_since(self) -> float | None:
        return await self._locked(sqlite_retention.to_device_since)

    # -- room state (SQL in sqlite_state) -------------------------------------

    async def _joined_among(self, pairs: list[tuple[str, str]]) -> set[tuple[str, str]]:
        rows = await self._locked(lambda conn: sqlite_state.joined_among(conn, pairs))
        return set(rows)

    async def _profiles_among(self, user_ids: list[str]) -> dict[str, dict[str, str | None]]:
        rows = await self._locked(lambda conn: sqlite_state.profiles_among(conn, user_ids))
        return profiles_of(rows)

    # -- devices and crypto state (SQL in _devices_sql and sqlite_devices) ----------

    # Crypto values are read and written on the loop's connection, like the inbox's
    # accepts: a lookup by primary key or a small upsert committed into the WAL takes
    # microseconds, and each trip to aiosqlite's thread costs more than that (decrypting
    # a room event reads and commits its replay record; one trip each way was most of
    # its cost). Each write still commits before it returns: nothing is deferred.

    async def _crypto_get(self, owner: str, kind: str, key: str) -> bytes | None:
        read = functools.partial(sqlite_devices.crypto_value_now, owner=owner, kind=kind, key=key)
        rows = self._on_loop(read, transaction=False, write=False)
        if rows is None:  # busy: the thread's connection, which waits its turn
            return await super()._crypto_get(owner, kind, key)
        return bytes(rows[0][0]) if rows else None

    async def _crypto_put_many(self, owner: str, kind: str, items: dict[str, bytes]) -> None:
        now = time.time()
        write = functools.partial(
            sqlite_devices.crypto_put_many_now, owner=owner, kind=kind, items=items, now=now
        )
        # One row is one statement, which commits on its own; more need a transaction.
        small = len(items) <= _LOOP_CRYPTO_BATCH
        on_loop = small and self._crypto_loop_free(owner, kind, items)
        if on_loop and self._on_loop(write, transaction=len(items) > 1) is not None:
            return
        with self._crypto_thread_write(owner, kind, items):
            await self._in_transaction(
                lambda conn: sqlite_devices.crypto_put_many(conn, owner, kind, items, now)
            )

    async def _crypto_put_new(self, owner: str, kind: str, key: str, value: bytes) -> bytes | None:
        now = time.time()
        # The insert and the read of what stopped it, in one transaction: nothing in between.
        add = functools.partial(
            sqlite_devices.crypto_put_new_now, owner=owner, kind=kind, key=key, value=value, now=now
        )
        found = self._on_loop(add) if self._crypto_loop_free(owner, kind, [key]) else None
        if found is not None:
            return found[0] if found else None
        with self._crypto_thread_write(owner, kind, [key]):
            return await self._in_transaction(
                lambda conn: sqlite_devices.crypto_put_new(conn, owner, kind, key, value, now)
            )

    async def _crypto_delete(self, owner: str, kind: str, key: str) -> None:
        with self._crypto_thread_write(owner, kind, [key]):
            await super()._crypto_delete(owner, kind, key)

    async def _crypto_delete_many(self, owner: str, kind: str, keys: list[str]) -> None:
        with self._crypto_thread_write(owner, kind, keys):
            await super()._crypto_delete_many(owner, kind, keys)

    # A crypto write that waits for the thread (the file was busy, or a big batch)
    # commits when its turn comes there; a later write of the same key committed on
    # the loop meanwhile would be overwritten by the older value (a device list
    # marked outdated, then saved as up to date). So while one waits, the later
    # ones of the same keys queue behind it on the thread, in order (the others,
    # such as the next messages' replay records, still commit on the loop).

    def _crypto_loop_free(self, owner: str, kind: str, keys: Iterable[str]) -> bool:
        waiting = self._crypto_on_thread
        return not waiting or all((owner, kind, key) not in waiting for key in keys)

    @contextlib.contextmanager
    def _crypto_thread_write(self, owner: str, kind: str, keys: Iterable[str]) -> Iterator[None]:
        scoped = [(owner, kind, key) for key in keys]
        waiting = self._crypto_on_thread
        waiting.update(scoped)
        try:
            yield
        finally:
            for one in scoped:
                waiting[one] -= 1
                if waiting[one] <= 0:
                    del waiting[one]

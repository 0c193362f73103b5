"""The embedded default store: one SQLite file, through aiosqlite."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from pathlib import Path
from typing import ClassVar

import aiosqlite

from bridge_kit.errors import StoreError
from bridge_kit.store.base import Store, pending_migrations, unique_chunks

#: SQLite refuses statements with more than 999 variables on old builds; stay well below.
_MAX_VARIABLES = 500

_V1 = (
    # WITHOUT ROWID: the table *is* the primary-key b-tree, so a lookup is one descent
    # and millions of puppets cost no more memory than the page cache.
    "CREATE TABLE bridge_kit_puppets (user_id TEXT PRIMARY KEY NOT NULL) WITHOUT ROWID",
    "CREATE TABLE bridge_kit_transactions ("
    " txn_id TEXT PRIMARY KEY NOT NULL,"
    " seq INTEGER NOT NULL,"
    " done_at REAL NOT NULL)",
    "CREATE UNIQUE INDEX bridge_kit_transactions_seq ON bridge_kit_transactions (seq)",
)


class SQLiteStore(Store):
    """A :class:`Store` in one SQLite file (WAL journal, one connection).

    ``path`` is relative to the current directory unless absolute; the file is
    created if missing, but its directory must exist. Writes are serialised on
    the single connection and each batch is one transaction.
    """

    #: One tuple of SQL statements per schema version; step ``i`` goes from ``i`` to ``i + 1``.
    MIGRATIONS: ClassVar[Sequence[Sequence[str]]] = (_V1,)

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).absolute()
        self._conn: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"SQLiteStore({str(self.path)!r})"

    # -- life cycle ----------------------------------------------------------

    async def open(self) -> None:
        if self._conn is not None:
            return
        try:
            self._conn = await aiosqlite.connect(self.path, isolation_level=None)
            await self._conn.execute("PRAGMA journal_mode=WAL")
            # NORMAL survives a crash of this process; only transaction records, which the
            # homeserver is told about, need FULL (see mark_transaction_done).
            await self._conn.execute("PRAGMA synchronous=NORMAL")
            await self._migrate()
        except sqlite3.Error as error:
            await self.close()
            raise StoreError(self._open_problem(error)) from error
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()

    def _open_problem(self, error: sqlite3.Error) -> str:
        where = f"cannot open SQLite store {self.path}"
        parent = self.path.parent
        if not parent.exists():
            return f"{where}: directory {parent} does not exist"
        if not parent.is_dir():
            return f"{where}: {parent} is not a directory"
        if self.path.is_dir():
            return f"{where}: it is a directory"
        if not os.access(self.path if self.path.exists() else parent, os.R_OK | os.W_OK):
            return f"{where}: permission denied"
        return f"{where}: {error}"

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

    # -- puppets -------------------------------------------------------------

    async def registered_among(self, user_ids: Iterable[str]) -> set[str]:
        conn = self._connection()
        found: set[str] = set()
        with self._errors():
            async with self._lock:
                for chunk in unique_chunks(user_ids, _MAX_VARIABLES):
                    rows = await conn.execute_fetchall(_select_puppets(len(chunk)), chunk)
                    found.update(row[0] for row in rows)
        return found

    async def mark_registered(self, user_ids: Iterable[str]) -> None:
        # Sorted, the rows go into the b-tree in key order: fewer page splits.
        rows = [(user_id,) for user_id in sorted(set(user_ids))]
        if not rows:
            return
        with self._errors():
            async with self._transaction() as conn:
                await conn.executemany(
                    "INSERT OR IGNORE INTO bridge_kit_puppets (user_id) VALUES (?)", rows
                )

    async def forget_registered(self, user_ids: Iterable[str] | None = None) -> None:
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

    async def is_transaction_done(self, txn_id: str) -> bool:
        sql = "SELECT COUNT(*) FROM bridge_kit_transactions WHERE txn_id = ?"
        return await self._fetch_int(sql, (txn_id,)) > 0

    async def mark_transaction_done(self, txn_id: str) -> None:
        with self._errors():
            conn = self._connection()
            async with self._lock:
                # The homeserver drops a transaction once we acknowledge it, so this record
                # must survive a power cut too: sync the WAL on this one commit.
                await conn.execute("PRAGMA synchronous=FULL")
                try:
                    await conn.execute(
                        "INSERT OR IGNORE INTO bridge_kit_transactions (txn_id, seq, done_at)"
                        " SELECT ?, COALESCE(MAX(seq), 0) + 1, ? FROM bridge_kit_transactions",
                        (txn_id, time.time()),
                    )
                finally:
                    await conn.execute("PRAGMA synchronous=NORMAL")

    async def prune_transactions(self, keep: int) -> int:
        if keep < 0:
            raise ValueError(f"keep must be >= 0, not {keep}")
        with self._errors():
            async with self._transaction() as conn:
                cursor = await conn.execute(
                    "DELETE FROM bridge_kit_transactions WHERE seq <= ("
                    " SELECT seq FROM bridge_kit_transactions ORDER BY seq DESC LIMIT 1 OFFSET ?)",
                    (keep,),
                )
                return cursor.rowcount

    async def schema_version(self) -> int:
        return await self._fetch_int("SELECT MAX(version) FROM bridge_kit_schema")

    async def _fetch_int(self, sql: str, parameters: Sequence[object] = ()) -> int:
        conn = self._connection()
        with self._errors():
            async with self._lock:
                rows = list(await conn.execute_fetchall(sql, parameters))
        return int(rows[0][0])


def _select_puppets(count: int) -> str:
    placeholders = ",".join("?" * count)
    # Only "?" placeholders are interpolated; the values travel as parameters.
    return f"SELECT user_id FROM bridge_kit_puppets WHERE user_id IN ({placeholders})"  # noqa: S608

"""The thin query layer both SQL backends share: statements written once, where the
dialects agree, with PostgreSQL's numbered marks (``$1``, ``$2``...), run through an
adapter per database.

SQLite takes numbered marks too, spelt ``?1``: :func:`sqlite_marks` converts. What
the dialects do not share stays in the backend's own module, named there (the
schemas' column types, PostgreSQL's array parameters and ``unnest`` batches,
SQLite's variable limit, and the inbox's claim and lease logic).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence
from typing import Any, Final, Protocol

import aiosqlite

#: A numbered mark outside any quoted text (no shared statement quotes a "$").
_MARK: Final = re.compile(r"\$(\d+)")


class Query(Protocol):
    """What a shared statement needs of a database: rows back, or just run."""

    async def rows(self, sql: str, *args: object) -> Sequence[Sequence[Any]]:
        """The rows ``sql`` selects with ``args`` for its marks."""
        ...

    async def run(self, sql: str, *args: object) -> None:
        """Run ``sql`` with ``args`` for its marks (in the caller's transaction, if any)."""
        ...

    async def many(self, sql: str, rows: Iterable[Sequence[object]]) -> None:
        """Run ``sql`` once per row of arguments (in the caller's transaction, if any)."""
        ...


@functools.cache
def sqlite_marks(sql: str) -> str:
    """``sql`` with each ``$n`` mark spelt as SQLite's ``?n`` (cached: the statements
    are constants)."""
    return _MARK.sub(r"?\1", sql)


class SQLiteQuery:
    """:class:`Query` over an aiosqlite connection (the store holds its lock)."""

    def __init__(self, conn: aiosqlite.Connection) -> None:
        self._conn = conn

    async def rows(self, sql: str, *args: object) -> Sequence[Sequence[Any]]:
        return list(await self._conn.execute_fetchall(sqlite_marks(sql), args))

    async def run(self, sql: str, *args: object) -> None:
        await self._conn.execute(sqlite_marks(sql), args)

    async def many(self, sql: str, rows: Iterable[Sequence[object]]) -> None:
        await self._conn.executemany(sqlite_marks(sql), rows)


class PostgresQuery:
    """:class:`Query` over an asyncpg pool or connection (each statement commits on
    its own outside a transaction)."""

    def __init__(self, pool: Any) -> None:
        self._pool = pool

    async def rows(self, sql: str, *args: object) -> Sequence[Sequence[Any]]:
        return list(await self._pool.fetch(sql, *args))

    async def run(self, sql: str, *args: object) -> None:
        await self._pool.execute(sql, *args)

    async def many(self, sql: str, rows: Iterable[Sequence[object]]) -> None:
        await self._pool.executemany(sql, rows)

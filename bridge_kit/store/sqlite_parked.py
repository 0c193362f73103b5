"""Parked inbox items in SQLite: the version 5 table and the statements behind
:class:`~bridge_kit.store.sqlite.SQLiteStore`'s parked-item methods.

A parked item is an inbox row moved, in one transaction, into
``bridge_kit_parked`` (keeping its inbox id, which orders it), and moved back
to the end of its lane, with a new inbox id, when its key is released.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

import aiosqlite

from bridge_kit.inbox.records import NewDeadLetter, ParkedItem, Parking
from bridge_kit.store import inbox_rows
from bridge_kit.store._sql import SQLiteQuery
from bridge_kit.store.inbox_rows import encode_handlers
from bridge_kit.store.sqlite_inbox import NOT_DONE

_T = TypeVar("_T")

# -- schema v5 (park): parked items ----------------------------------------------------
V5 = (
    "CREATE TABLE bridge_kit_parked ("
    " id INTEGER PRIMARY KEY NOT NULL,"  # the item's id in the inbox: it keeps their order
    " lane TEXT NOT NULL,"
    " kind TEXT NOT NULL,"
    " event_json TEXT NOT NULL,"
    " received_at REAL NOT NULL,"
    " attempts INTEGER NOT NULL,"
    " done_handlers TEXT NOT NULL,"
    " first_failed_at REAL NOT NULL,"
    " park_key TEXT NOT NULL,"
    " reason TEXT NOT NULL,"
    " give_up_at REAL NOT NULL)",
    "CREATE INDEX bridge_kit_parked_key ON bridge_kit_parked (park_key, id)",
    "CREATE INDEX bridge_kit_parked_due ON bridge_kit_parked (give_up_at)",
)
# -- end of schema v5 (park) -----------------------------------------------------------


async def park(conn: aiosqlite.Connection, item_id: int, parking: Parking) -> bool:
    """Move one item from the inbox to the parked items (in the caller's transaction)."""
    cursor = await conn.execute(
        "INSERT INTO bridge_kit_parked (id, lane, kind, event_json, received_at, attempts,"  # noqa: S608 (constants)
        " done_handlers, first_failed_at, park_key, reason, give_up_at)"
        " SELECT id, lane, kind, event_json, received_at, attempts, ?, ?, ?, ?, ?"
        # An item marked handled is no longer in the inbox (see sqlite_inbox.NOT_DONE).
        f" FROM bridge_kit_inbox i WHERE id = ? AND {NOT_DONE}",
        (
            encode_handlers(parking.done_handlers),
            parking.first_failed_at,
            parking.key,
            parking.reason,
            parking.give_up_at,
            item_id,
        ),
    )
    if cursor.rowcount == 0:
        return False
    await conn.execute("DELETE FROM bridge_kit_inbox WHERE id = ?", (item_id,))
    return True


async def unpark(conn: aiosqlite.Connection, key: str) -> int:
    """Move the items parked under ``key`` back into their lanes (in the caller's transaction)."""
    # Every lane with items has its row in bridge_kit_lanes, or it is never claimed.
    await conn.execute(
        "INSERT INTO bridge_kit_lanes (lane) SELECT DISTINCT lane FROM bridge_kit_parked"
        " WHERE park_key = ? ORDER BY lane ON CONFLICT (lane) DO NOTHING",
        (key,),
    )
    await conn.execute(
        "INSERT INTO bridge_kit_inbox (lane, kind, event_json, received_at, attempts,"
        " done_handlers, first_failed_at)"
        " SELECT lane, kind, event_json, received_at, attempts, done_handlers, first_failed_at"
        " FROM bridge_kit_parked WHERE park_key = ? ORDER BY id",
        (key,),
    )
    cursor = await conn.execute("DELETE FROM bridge_kit_parked WHERE park_key = ?", (key,))
    return cursor.rowcount


async def bury(conn: aiosqlite.Connection, item_id: int, letter: NewDeadLetter, now: float) -> bool:
    """Move a parked item to the dead letters (in the caller's transaction); the letter
    is written only if the item was still parked."""
    cursor = await conn.execute(
        "INSERT INTO bridge_kit_dead_letters (lane, kind, event_json, error, handler, attempts,"
        " event_id, event_type, last_failed_at, done_handlers, first_failed_at, received_at)"
        " SELECT ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, COALESCE(?, first_failed_at), received_at"
        " FROM bridge_kit_parked WHERE id = ?",
        (
            *(letter.lane, letter.kind.value, letter.event_json),
            *(letter.error, letter.handler, letter.attempts),
            *(letter.event_id, letter.event_type, now),
            *(encode_handlers(letter.done_handlers), letter.first_failed_at, item_id),
        ),
    )
    if cursor.rowcount == 0:
        return False
    await conn.execute("DELETE FROM bridge_kit_parked WHERE id = ?", (item_id,))
    return True


class _Connection(Protocol):
    """What :class:`SQLiteParkedItems` needs of the store it is mixed into."""

    async def _locked(self, operation: Callable[[aiosqlite.Connection], Awaitable[_T]]) -> _T: ...

    async def _in_transaction(
        self, operation: Callable[[aiosqlite.Connection], Awaitable[_T]]
    ) -> _T: ...


class SQLiteParkedItems:
    """The parked-item hooks of :class:`~bridge_kit.store.sqlite.SQLiteStore` (see
    :class:`~bridge_kit.store.concerns.ParkingStore`), each one transaction."""

    async def _park_item(self: _Connection, item_id: int, parking: Parking) -> bool:
        return await self._in_transaction(lambda conn: park(conn, item_id, parking))

    async def _unpark_items(self: _Connection, key: str) -> int:
        return await self._in_transaction(lambda conn: unpark(conn, key))

    async def _parked_items(
        self: _Connection, key: str | None, due_by: float | None, limit: int
    ) -> list[ParkedItem]:
        return await self._locked(
            lambda conn: inbox_rows.parked_items(SQLiteQuery(conn), key, due_by, limit)
        )

    async def count_parked(self: _Connection) -> int:
        return await self._locked(lambda conn: inbox_rows.count_parked(SQLiteQuery(conn)))

    async def _bury_parked(self: _Connection, item_id: int, letter: NewDeadLetter) -> bool:
        now = time.time()
        return await self._in_transaction(lambda conn: bury(conn, item_id, letter, now))

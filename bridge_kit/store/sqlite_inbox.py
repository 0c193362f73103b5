"""The durable inbox in SQLite: the version 2 and 5 schema and the statements behind
:class:`~bridge_kit.store.sqlite.SQLiteStore`'s inbox methods.

Each function takes the store's aiosqlite connection; the store decides which
of them share one transaction, and holds its lock around them.

Since version 5, ``bridge_kit_lanes`` holds a row for every lane with items in
the inbox (not only for leased ones): its lease, and until when its head item
waits (a retry or a deferral). A lane is ready when both have passed, which an
index on the later of the two finds without visiting the lanes that wait, so a
claim costs O(ready lanes). Whatever adds items adds their lanes' rows
(:data:`ADD_LANE`); a lane's row goes when its worker releases it empty.

Also since version 5, a handled item is not deleted at once: its id goes into
``bridge_kit_done`` (one small page per commit; deleting the item rewrote a table
page and one index page per lane in the commit), every statement here passes
over the items listed there (:data:`NOT_DONE`), and :func:`purge_done` deletes
them in bulk now and then. The inbox commits after every handled event, so this
is most of what handling an event costs the store.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Collection, Iterator, Sequence

import aiosqlite

from bridge_kit.inbox.records import DeadLetter, InboxItem, InboxStats, NewDeadLetter, NewInboxItem
from bridge_kit.store import sqlite_retention
from bridge_kit.store.inbox_rows import (
    ITEM_COLUMNS,
    LETTER_COLUMNS,
    encode_handlers,
    item_from_row,
    letter_from_row,
)

#: SQLite refuses statements with more than 999 variables on old builds; stay well below.
MAX_VARIABLES = 500

V2 = (
    # AUTOINCREMENT: an id is never handed out twice, so a worker that lost its lease
    # and completes an item late cannot delete a newer item that reused the id.
    "CREATE TABLE bridge_kit_inbox ("
    " id INTEGER PRIMARY KEY AUTOINCREMENT,"
    " lane TEXT NOT NULL,"
    " kind TEXT NOT NULL,"
    " event_json TEXT NOT NULL,"
    " received_at REAL NOT NULL,"
    " attempts INTEGER NOT NULL DEFAULT 0,"
    " done_handlers TEXT NOT NULL DEFAULT '[]',"
    " not_before REAL NOT NULL DEFAULT 0,"
    " first_failed_at REAL)",
    "CREATE INDEX bridge_kit_inbox_lane ON bridge_kit_inbox (lane, id)",
    "CREATE TABLE bridge_kit_dead_letters ("
    " id INTEGER PRIMARY KEY AUTOINCREMENT,"
    " lane TEXT NOT NULL,"
    " kind TEXT NOT NULL,"
    " event_json TEXT NOT NULL,"
    " error TEXT NOT NULL,"
    " handler TEXT,"
    " attempts INTEGER NOT NULL,"
    " first_failed_at REAL NOT NULL,"
    " last_failed_at REAL NOT NULL,"
    " event_id TEXT,"
    " event_type TEXT)",
    # A row is a lease: claiming writes it, releasing deletes it.
    "CREATE TABLE bridge_kit_lanes ("
    " lane TEXT PRIMARY KEY NOT NULL,"
    " owner TEXT NOT NULL,"
    " lease_until REAL NOT NULL) WITHOUT ROWID",
)

# -- version 5 (the inbox branch): the lanes table becomes the lane queue ----------------
V5_LANES = (
    "CREATE TABLE bridge_kit_lanes_v5 ("
    " lane TEXT PRIMARY KEY NOT NULL,"
    " owner TEXT,"  # NULL: nobody holds a lease
    " lease_until REAL NOT NULL DEFAULT 0,"
    " not_before REAL NOT NULL DEFAULT 0) WITHOUT ROWID",
    "INSERT INTO bridge_kit_lanes_v5 (lane, owner, lease_until, not_before)"
    " SELECT i.lane, l.owner, COALESCE(l.lease_until, 0),"
    " (SELECT h.not_before FROM bridge_kit_inbox h WHERE h.lane = i.lane ORDER BY h.id LIMIT 1)"
    " FROM (SELECT DISTINCT lane FROM bridge_kit_inbox) i"
    " LEFT JOIN bridge_kit_lanes l ON l.lane = i.lane",
    "DROP TABLE bridge_kit_lanes",
    "ALTER TABLE bridge_kit_lanes_v5 RENAME TO bridge_kit_lanes",
    # The claim's index: a lane is ready once max(lease_until, not_before) has passed.
    "CREATE INDEX bridge_kit_lanes_ready ON bridge_kit_lanes (max(lease_until, not_before))",
    "CREATE INDEX bridge_kit_lanes_owner ON bridge_kit_lanes (owner) WHERE owner IS NOT NULL",
    # Items handled and not deleted yet (see the module's docstring).
    "CREATE TABLE bridge_kit_done (id INTEGER PRIMARY KEY)",
)
# -- end of version 5 (the inbox branch) ----------------------------------------------

#: An inbox item (``i``) not handled yet: every statement reading items checks it.
NOT_DONE = "NOT EXISTS (SELECT 1 FROM bridge_kit_done d WHERE d.id = i.id)"

#: Adds a lane's row if it has none: run it for every lane that gets items.
ADD_LANE = "INSERT INTO bridge_kit_lanes (lane) VALUES (?) ON CONFLICT (lane) DO NOTHING"

_INSERT_ITEM = (
    "INSERT INTO bridge_kit_inbox (lane, kind, event_json, received_at) VALUES (?, ?, ?, ?)"
)
_INSERT_LETTER = (
    "INSERT INTO bridge_kit_dead_letters (lane, kind, event_json, error, handler, attempts,"
    " first_failed_at, last_failed_at, event_id, event_type, done_handlers, received_at)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)

# The ready lanes (by the index on the later of lease and wait; and this owner's own,
# by the owner index), each with its head item, oldest head first. The head's own
# not_before is checked too: only the head is what the worker looks at. A lane with
# no items (its process died before releasing it) comes first: its worker finds
# nothing and releases it, which removes its row.
CLAIMABLE = f"""
SELECT ready.lane FROM (
    SELECT lane FROM bridge_kit_lanes WHERE max(lease_until, not_before) <= :now
    UNION
    SELECT lane FROM bridge_kit_lanes WHERE owner = :owner AND not_before <= :now
) ready
LEFT JOIN bridge_kit_inbox head ON head.id = (
    SELECT i.id FROM bridge_kit_inbox i WHERE i.lane = ready.lane AND {NOT_DONE}
    ORDER BY i.id LIMIT 1)
WHERE head.id IS NULL OR head.not_before <= :now
ORDER BY head.id
LIMIT :limit
"""  # noqa: S608 (constants only)

# The lane of an item waits as long as its head does.
_LANE_WAITS_FOR_HEAD = f"""
UPDATE bridge_kit_lanes SET not_before = (
    SELECT i.not_before FROM bridge_kit_inbox i WHERE i.lane = bridge_kit_lanes.lane
    AND {NOT_DONE} ORDER BY i.id LIMIT 1)
WHERE lane = (SELECT lane FROM bridge_kit_inbox WHERE id = ?)
"""  # noqa: S608 (constants only)

_TAKE_LEASE = "UPDATE bridge_kit_lanes SET owner = ?, lease_until = ? WHERE lane = ?"


def _chunks(values: Sequence[object]) -> Iterator[Sequence[object]]:
    for start in range(0, len(values), MAX_VARIABLES):
        yield values[start : start + MAX_VARIABLES]


def _marks(values: Sequence[object]) -> str:
    return ",".join("?" * len(values))


async def append(
    conn: aiosqlite.Connection,
    items: Sequence[NewInboxItem],
    rejected: Sequence[NewDeadLetter],
    now: float,
) -> None:
    """Add an accepted transaction's items and dead letters (the caller's transaction);
    key counts replace the older ones of their device still waiting."""
    if items:
        await sqlite_retention.supersede(conn, items)
        rows = _item_rows(items, now)
        await conn.executemany(_INSERT_ITEM, rows)
        await conn.executemany(ADD_LANE, _lanes_of(rows))
    if rejected:
        await conn.executemany(_INSERT_LETTER, _letter_rows(rejected, now))


def append_now(
    conn: sqlite3.Connection,
    items: Sequence[NewInboxItem],
    rejected: Sequence[NewDeadLetter],
    now: float,
) -> None:
    """:func:`append` on a plain connection, on the calling thread."""
    if items:
        sqlite_retention.supersede_now(conn, items)
        rows = _item_rows(items, now)
        conn.executemany(_INSERT_ITEM, rows)
        conn.executemany(ADD_LANE, _lanes_of(rows))
    if rejected:
        conn.executemany(_INSERT_LETTER, _letter_rows(rejected, now))


def _lanes_of(rows: list[tuple[object, ...]]) -> list[tuple[object]]:
    """Each lane of these item rows once, in a fixed order."""
    return [(lane,) for lane in sorted({str(row[0]) for row in rows})]


def _item_rows(items: Sequence[NewInboxItem], now: float) -> list[tuple[object, ...]]:
    # Cleaned as in PostgreSQL: SQLite takes NUL, but no str with a lone surrogate.
    return [(item.lane, item.kind.value, item.event_json, now) for item in items]


def _letter_rows(rejected: Sequence[NewDeadLetter], now: float) -> list[tuple[object, ...]]:
    return [_letter_row(letter, letter.first_failed_at, now) for letter in rejected]


def _letter_row(
    letter: NewDeadLetter, first_failed_at: float | None, now: float
) -> tuple[object, ...]:
    return (
        letter.lane,
        letter.kind.value,
        letter.event_json,
        letter.error,
        letter.handler,
        letter.attempts,
        first_failed_at if first_failed_at is not None else now,
        now,
        letter.event_id,
        letter.event_type,
        encode_handlers(letter.done_handlers),
        now,  # a letter made at acceptance arrived now
    )


async def claim(
    conn: aiosqlite.Connection,
    owner: str,
    until: float,
    limit: int,
    exclude: Collection[str],
    now: float,
) -> list[str]:
    """Lease the oldest claimable lanes to ``owner`` (in the caller's transaction)."""
    lanes = await claimable(conn, owner, limit, exclude, now)
    await conn.executemany(_TAKE_LEASE, [(owner, until, lane) for lane in lanes])
    return lanes


async def claimable(
    conn: aiosqlite.Connection, owner: str, limit: int, exclude: Collection[str], now: float
) -> list[str]:
    """The lanes :func:`claim` would lease now. A read: outside a transaction it takes
    no write lock, so the store asks this first. While one room floods, the inbox
    looks for lanes after every accepted transaction and nearly always finds none;
    a write transaction each time took SQLite's write lock from the acknowledgements."""
    if limit == 0:
        return []
    exclude = set(exclude)
    # Each lane comes once, so reading len(exclude) more rows leaves ``limit`` after
    # the excluded ones are dropped here (SQLite has no array parameter to do it in SQL).
    parameters = {"now": now, "owner": owner, "limit": limit + len(exclude)}
    rows = await conn.execute_fetchall(CLAIMABLE, parameters)
    return [lane for (lane,) in rows if lane not in exclude][:limit]


async def renew(
    conn: aiosqlite.Connection, owner: str, lanes: Collection[str], until: float
) -> set[str]:
    """Extend the leases ``owner`` still holds (in the caller's transaction)."""
    held: set[str] = set()
    for chunk in _chunks(sorted(lanes)):
        where = f"WHERE owner = ? AND lane IN ({_marks(chunk)})"
        rows = await conn.execute_fetchall(
            f"SELECT lane FROM bridge_kit_lanes {where}",  # noqa: S608 (only "?" marks)
            (owner, *chunk),
        )
        held.update(lane for (lane,) in rows)
        await conn.execute(
            f"UPDATE bridge_kit_lanes SET lease_until = ? {where}",  # noqa: S608
            (until, owner, *chunk),
        )
    return held


async def release(conn: aiosqlite.Connection, owner: str, lane: str) -> None:
    """Give up ``owner``'s lease on ``lane``; an empty lane's row goes (in the caller's
    transaction: under SQLite's one writer, no item can arrive between the two)."""
    parameters = (lane, owner)
    await conn.execute(
        "DELETE FROM bridge_kit_lanes WHERE lane = ?1 AND owner = ?2"  # noqa: S608 (constants)
        f" AND NOT EXISTS (SELECT 1 FROM bridge_kit_inbox i WHERE i.lane = ?1 AND {NOT_DONE})",
        parameters,
    )
    await conn.execute(
        "UPDATE bridge_kit_lanes SET owner = NULL, lease_until = 0 WHERE lane = ?1 AND owner = ?2",
        parameters,
    )


async def forget_leases(conn: aiosqlite.Connection) -> None:
    """No process holds a lease (the daemon's lock says so): clear them all, and drop
    the rows of lanes left empty by a process that died before it released them."""
    await conn.execute("UPDATE bridge_kit_lanes SET owner = NULL, lease_until = 0")
    await purge_done(conn)
    await conn.execute(
        "DELETE FROM bridge_kit_lanes"
        " WHERE NOT EXISTS (SELECT 1 FROM bridge_kit_inbox i WHERE i.lane = bridge_kit_lanes.lane)"
    )


async def purge_done(conn: aiosqlite.Connection) -> None:
    """Delete the handled items (in the caller's transaction)."""
    await conn.execute("DELETE FROM bridge_kit_inbox WHERE id IN (SELECT id FROM bridge_kit_done)")
    await conn.execute("DELETE FROM bridge_kit_done")


_LANE_ITEMS = (
    f"SELECT {ITEM_COLUMNS} FROM bridge_kit_inbox i"  # noqa: S608 (constants)
    f" WHERE lane = ? AND {NOT_DONE} ORDER BY id LIMIT ?"
)


async def lane_items(conn: aiosqlite.Connection, lane: str, limit: int) -> list[InboxItem]:
    rows = await conn.execute_fetchall(_LANE_ITEMS, (lane, limit))
    return [item_from_row(row) for row in rows]


def lane_items_now(conn: sqlite3.Connection, lane: str, limit: int) -> list[InboxItem]:
    """:func:`lane_items` on a plain connection (fetchall: no read transaction left open)."""
    rows = conn.execute(_LANE_ITEMS, (lane, limit)).fetchall()
    return [item_from_row(row) for row in rows]


async def complete(conn: aiosqlite.Connection, item_id: int) -> None:
    await conn.execute("DELETE FROM bridge_kit_inbox WHERE id = ?", (item_id,))
    await conn.execute("DELETE FROM bridge_kit_done WHERE id = ?", (item_id,))


async def complete_many(conn: aiosqlite.Connection, item_ids: Collection[int]) -> None:
    """Remove these items: up to MAX_VARIABLES of them in one DELETE, which commits on
    its own (one trip to aiosqlite's thread); more only in the caller's transaction."""
    for chunk in _chunks(sorted(set(item_ids))):
        await conn.execute(
            f"DELETE FROM bridge_kit_inbox WHERE id IN ({_marks(chunk)})",  # noqa: S608 ("?" only)
            chunk,
        )


def complete_now(conn: sqlite3.Connection, item_ids: Collection[int]) -> int:
    """Mark these items handled, on a plain connection (up to MAX_VARIABLES of them in
    one statement, which commits on its own; more only in the caller's transaction):
    :func:`purge_done` deletes them later. Ids no longer in the inbox are skipped, so
    that no id is marked before its item exists. How many were marked."""
    marked = 0
    for chunk in _chunks(sorted(set(item_ids))):
        marked += conn.execute(
            "INSERT OR IGNORE INTO bridge_kit_done (id)"  # noqa: S608 (only "?" marks)
            f" SELECT id FROM bridge_kit_inbox WHERE id IN ({_marks(chunk)})",
            chunk,
        ).rowcount
    return marked


async def fail(
    conn: aiosqlite.Connection,
    item_id: int,
    done_handlers: Sequence[str],
    not_before: float,
    now: float,
    count_attempt: bool = True,
) -> None:
    """Record a failed or deferred attempt (in the caller's transaction): the item and
    its lane wait until ``not_before``."""
    await conn.execute(
        "UPDATE bridge_kit_inbox AS i SET attempts = attempts + ?, done_handlers = ?,"  # noqa: S608
        " not_before = ?, first_failed_at = COALESCE(first_failed_at, ?)"
        f" WHERE id = ? AND {NOT_DONE}",
        (int(count_attempt), encode_handlers(done_handlers), not_before, now, item_id),
    )
    await conn.execute(_LANE_WAITS_FOR_HEAD, (item_id,))


async def bury(conn: aiosqlite.Connection, item_id: int, letter: NewDeadLetter, now: float) -> None:
    """Move an item to the dead letters (in the caller's transaction).

    The letter is written only if the item was still there: a worker whose lease
    ran out may bury an item another worker already completed or buried.
    """
    await conn.execute(
        "INSERT INTO bridge_kit_dead_letters (lane, kind, event_json, error, handler, attempts,"  # noqa: S608
        " event_id, event_type, last_failed_at, done_handlers, first_failed_at, received_at)"
        # The item's own first failure stands in for a letter that names none.
        " SELECT ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, COALESCE(?, first_failed_at, ?), received_at"
        f" FROM bridge_kit_inbox i WHERE id = ? AND {NOT_DONE}",
        (
            *(letter.lane, letter.kind.value, letter.event_json),
            *(letter.error, letter.handler, letter.attempts),
            *(letter.event_id, letter.event_type, now),
            *(encode_handlers(letter.done_handlers), letter.first_failed_at, now, item_id),
        ),
    )
    await complete(conn, item_id)


async def dead_letters(conn: aiosqlite.Connection, limit: int | None) -> list[DeadLetter]:
    rows = await conn.execute_fetchall(
        f"SELECT {LETTER_COLUMNS} FROM bridge_kit_dead_letters"  # noqa: S608 (a constant)
        " ORDER BY id LIMIT ?",
        (-1 if limit is None else limit,),  # -1: no limit
    )
    return [letter_from_row(row) for row in rows]


def _letter_filters(ids: Collection[int] | None) -> Iterator[tuple[str, Sequence[object]]]:
    """WHERE clauses (and their parameters) that pick these letters, oldest first."""
    if ids is None:
        yield "", ()
        return
    for chunk in _chunks(sorted(set(ids))):
        yield f"WHERE id IN ({_marks(chunk)})", chunk


async def replay(
    conn: aiosqlite.Connection, ids: Collection[int] | None, now: float, all_handlers: bool
) -> int:
    """Move dead letters back into the inbox, in order, with their done handlers
    unless ``all_handlers`` (in the caller's transaction)."""
    moved = 0
    for where, parameters in _letter_filters(ids):
        await conn.execute(
            "INSERT INTO bridge_kit_lanes (lane)"  # noqa: S608 (only "?" marks in ``where``)
            f" SELECT DISTINCT lane FROM bridge_kit_dead_letters {where}"
            " ORDER BY lane ON CONFLICT (lane) DO NOTHING",
            parameters,
        )
        await conn.execute(
            # Only "?" marks in ``where``.
            "INSERT INTO bridge_kit_inbox (lane, kind, event_json, received_at, done_handlers)"  # noqa: S608
            " SELECT lane, kind, event_json, COALESCE(received_at, ?),"
            " CASE WHEN ? THEN '[]' ELSE done_handlers END"
            f" FROM bridge_kit_dead_letters {where} ORDER BY id",
            (now, all_handlers, *parameters),
        )
        moved += await _delete_letters(conn, where, parameters)
    return moved


async def drop(conn: aiosqlite.Connection, ids: Collection[int] | None) -> int:
    dropped = 0
    for where, parameters in _letter_filters(ids):
        dropped += await _delete_letters(conn, where, parameters)
    return dropped


async def _delete_letters(
    conn: aiosqlite.Connection, where: str, parameters: Sequence[object]
) -> int:
    cursor = await conn.execute(
        f"DELETE FROM bridge_kit_dead_letters {where}",  # noqa: S608 (only "?" marks)
        parameters,
    )
    return cursor.rowcount


async def stats(conn: aiosqlite.Connection) -> InboxStats:
    rows = list(
        await conn.execute_fetchall(
            "SELECT COUNT(*), MIN(received_at),"  # noqa: S608 (constants)
            " (SELECT COUNT(*) FROM bridge_kit_dead_letters)"
            f" FROM bridge_kit_inbox i WHERE {NOT_DONE}"
        )
    )
    depth, oldest, letters = rows[0]
    return InboxStats(depth=depth, oldest_received_at=oldest, dead_letters=letters)

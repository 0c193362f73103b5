"""Room state in SQLite: the version 3 schema and the batch lookups for bulk runs
(over SQLite's ``VALUES`` lists); the other statements are shared, in
:mod:`bridge_kit.store._state_sql`."""

from __future__ import annotations

from collections.abc import Sequence

import aiosqlite

from bridge_kit.store.sqlite_inbox import MAX_VARIABLES

V3 = (
    "CREATE TABLE bridge_kit_members ("
    " room_id TEXT NOT NULL,"
    " user_id TEXT NOT NULL,"
    " membership TEXT NOT NULL,"
    " displayname TEXT,"
    " avatar_url TEXT,"
    " origin_ts INTEGER NOT NULL,"
    " PRIMARY KEY (room_id, user_id)) WITHOUT ROWID",
    # members(room, "join") reads one index range instead of the room's every row.
    "CREATE INDEX bridge_kit_members_by_membership ON bridge_kit_members (room_id, membership)",
    "CREATE TABLE bridge_kit_room_state ("
    " room_id TEXT NOT NULL,"
    " event_type TEXT NOT NULL,"
    " content TEXT NOT NULL,"
    " sender TEXT,"
    " origin_ts INTEGER NOT NULL,"
    " PRIMARY KEY (room_id, event_type)) WITHOUT ROWID",
    # A row: the store saw the room's whole membership (a snapshot, or its creation).
    "CREATE TABLE bridge_kit_rooms (room_id TEXT PRIMARY KEY NOT NULL) WITHOUT ROWID",
    "CREATE TABLE bridge_kit_profiles ("
    " user_id TEXT NOT NULL,"
    " field TEXT NOT NULL,"
    " value TEXT,"
    " PRIMARY KEY (user_id, field)) WITHOUT ROWID",
)


async def joined_among(
    conn: aiosqlite.Connection, pairs: Sequence[tuple[str, str]]
) -> list[tuple[str, str]]:
    """The (room, user) pairs whose membership is join: one indexed probe each."""
    found: list[tuple[str, str]] = []
    step = MAX_VARIABLES // 3
    for start in range(0, len(pairs), step):
        batch = pairs[start : start + step]
        rows = "(?, ?, ?)," * (len(batch) - 1) + "(?, ?, ?)"
        # Only "(?, ?, ?)" placeholders are interpolated; the values travel as parameters.
        # CROSS JOIN keeps the asked pairs as the outer loop, each one index probe;
        # "(room_id, user_id) IN (VALUES ...)" scans the whole table instead (50x slower).
        # The answer is the asked pair's position: a re-run asks about every pair of its
        # input, and reading each back as two new strings cost a fifth of its time.
        sql = (
            f"SELECT p.column3 FROM (VALUES {rows}) AS p"  # noqa: S608
            " CROSS JOIN bridge_kit_members m ON m.room_id = p.column1 AND m.user_id = p.column2"
            " WHERE m.membership = 'join'"
        )
        parameters = [
            value for index, (room, user) in enumerate(batch) for value in (room, user, index)
        ]
        found.extend(batch[row[0]] for row in await conn.execute_fetchall(sql, parameters))
    return found


async def profiles_among(
    conn: aiosqlite.Connection, user_ids: Sequence[str]
) -> list[tuple[str, str, str | None]]:
    """The stored (user, field, value) rows of ``user_ids``."""
    found: list[tuple[str, str, str | None]] = []
    for start in range(0, len(user_ids), MAX_VARIABLES):
        batch = user_ids[start : start + MAX_VARIABLES]
        marks = ",".join("?" * len(batch))
        # Only "?" placeholders are interpolated; the values travel as parameters.
        sql = f"SELECT user_id, field, value FROM bridge_kit_profiles WHERE user_id IN ({marks})"  # noqa: S608
        found.extend((row[0], row[1], row[2]) for row in await conn.execute_fetchall(sql, batch))
    return found

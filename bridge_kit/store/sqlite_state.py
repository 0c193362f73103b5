"""Room state in SQLite: the version 3 schema and the statements behind
:class:`~bridge_kit.store.sqlite.SQLiteStore`'s room-state and profile methods.

Each function takes the store's aiosqlite connection; the store holds its lock
(and, for writes, one transaction) around it.
"""

from __future__ import annotations

from collections.abc import Sequence

import aiosqlite

from bridge_kit.store.base import state_event_from
from bridge_kit.store.sqlite_inbox import MAX_VARIABLES
from bridge_kit.store.state_records import MemberRow, StateRow
from bridge_kit.types.events import Event
from bridge_kit.types.state import Member

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

# The WHERE on the update is the stale-state rule: an older event leaves the row.
_UPSERT_MEMBER = (
    "INSERT INTO bridge_kit_members"
    " (room_id, user_id, membership, displayname, avatar_url, origin_ts)"
    " VALUES (?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (room_id, user_id) DO UPDATE SET"
    " membership = excluded.membership, displayname = excluded.displayname,"
    " avatar_url = excluded.avatar_url, origin_ts = excluded.origin_ts"
    " WHERE excluded.origin_ts >= bridge_kit_members.origin_ts"
)
_UPSERT_STATE = (
    "INSERT INTO bridge_kit_room_state (room_id, event_type, content, sender, origin_ts)"
    " VALUES (?, ?, ?, ?, ?)"
    " ON CONFLICT (room_id, event_type) DO UPDATE SET"
    " content = excluded.content, sender = excluded.sender, origin_ts = excluded.origin_ts"
    " WHERE excluded.origin_ts >= bridge_kit_room_state.origin_ts"
)


async def apply(
    conn: aiosqlite.Connection,
    members: Sequence[MemberRow],
    states: Sequence[StateRow],
    known_room: str | None,
) -> None:
    await conn.executemany(
        _UPSERT_MEMBER,
        [
            (r.room_id, r.user_id, r.member.membership, r.member.displayname,
             r.member.avatar_url, r.origin_ts)
            for r in members
        ],
    )  # fmt: skip
    await conn.executemany(
        _UPSERT_STATE,
        [(r.room_id, r.event_type, r.content_json, r.sender, r.origin_ts) for r in states],
    )
    if known_room is not None:
        await conn.execute(
            "INSERT OR IGNORE INTO bridge_kit_rooms (room_id) VALUES (?)", (known_room,)
        )


async def membership(conn: aiosqlite.Connection, room_id: str, user_id: str) -> Member | None:
    rows = list(
        await conn.execute_fetchall(
            "SELECT displayname, avatar_url, membership FROM bridge_kit_members"
            " WHERE room_id = ? AND user_id = ?",
            (room_id, user_id),
        )
    )
    return Member(rows[0][0], rows[0][1], rows[0][2]) if rows else None


async def members(conn: aiosqlite.Connection, room_id: str, membership: str) -> dict[str, Member]:
    rows = await conn.execute_fetchall(
        "SELECT user_id, displayname, avatar_url FROM bridge_kit_members"
        " WHERE room_id = ? AND membership = ?",
        (room_id, membership),
    )
    return {row[0]: Member(row[1], row[2], membership) for row in rows}


async def state_event(conn: aiosqlite.Connection, room_id: str, event_type: str) -> Event | None:
    rows = list(
        await conn.execute_fetchall(
            "SELECT content, sender, origin_ts FROM bridge_kit_room_state"
            " WHERE room_id = ? AND event_type = ?",
            (room_id, event_type),
        )
    )
    if not rows:
        return None
    return state_event_from(room_id, event_type, rows[0][0], rows[0][1], rows[0][2])


async def room_known(conn: aiosqlite.Connection, room_id: str) -> bool:
    rows = await conn.execute_fetchall(
        "SELECT 1 FROM bridge_kit_rooms WHERE room_id = ?", (room_id,)
    )
    return bool(list(rows))


async def profile(conn: aiosqlite.Connection, user_id: str) -> dict[str, str | None]:
    rows = await conn.execute_fetchall(
        "SELECT field, value FROM bridge_kit_profiles WHERE user_id = ?", (user_id,)
    )
    return {row[0]: row[1] for row in rows}


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


async def set_profiles(
    conn: aiosqlite.Connection, values: Sequence[tuple[str, str, str | None]]
) -> None:
    await conn.executemany(
        "INSERT INTO bridge_kit_profiles (user_id, field, value) VALUES (?, ?, ?)"
        " ON CONFLICT (user_id, field) DO UPDATE SET value = excluded.value",
        values,
    )

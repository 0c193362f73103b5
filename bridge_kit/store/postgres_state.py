"""Room state in PostgreSQL: the version 3 schema and the statements behind
:class:`~bridge_kit.store.postgres.PostgresStore`'s room-state and profile methods.

Each function takes the store's asyncpg pool; a batch of state is written on one
connection, in one transaction.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bridge_kit.store.base import state_event_from
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
    " origin_ts BIGINT NOT NULL,"
    " PRIMARY KEY (room_id, user_id))",
    # members(room, "join") reads one index range instead of the room's every row.
    "CREATE INDEX bridge_kit_members_by_membership ON bridge_kit_members (room_id, membership)",
    "CREATE TABLE bridge_kit_room_state ("
    " room_id TEXT NOT NULL,"
    " event_type TEXT NOT NULL,"
    " content TEXT NOT NULL,"
    " sender TEXT,"
    " origin_ts BIGINT NOT NULL,"
    " PRIMARY KEY (room_id, event_type))",
    # A row: the store saw the room's whole membership (a snapshot, or its creation).
    "CREATE TABLE bridge_kit_rooms (room_id TEXT PRIMARY KEY)",
    "CREATE TABLE bridge_kit_profiles ("
    " user_id TEXT NOT NULL,"
    " field TEXT NOT NULL,"
    " value TEXT,"
    " PRIMARY KEY (user_id, field))",
)

# The WHERE on the update is the stale-state rule: an older event leaves the row.
_UPSERT_MEMBER = (
    "INSERT INTO bridge_kit_members"
    " (room_id, user_id, membership, displayname, avatar_url, origin_ts)"
    " VALUES ($1, $2, $3, $4, $5, $6)"
    " ON CONFLICT (room_id, user_id) DO UPDATE SET"
    " membership = excluded.membership, displayname = excluded.displayname,"
    " avatar_url = excluded.avatar_url, origin_ts = excluded.origin_ts"
    " WHERE excluded.origin_ts >= bridge_kit_members.origin_ts"
)
_UPSERT_STATE = (
    "INSERT INTO bridge_kit_room_state (room_id, event_type, content, sender, origin_ts)"
    " VALUES ($1, $2, $3, $4, $5)"
    " ON CONFLICT (room_id, event_type) DO UPDATE SET"
    " content = excluded.content, sender = excluded.sender, origin_ts = excluded.origin_ts"
    " WHERE excluded.origin_ts >= bridge_kit_room_state.origin_ts"
)


async def apply(
    pool: Any, members: Sequence[MemberRow], states: Sequence[StateRow], known_room: str | None
) -> None:
    async with pool.acquire() as conn, conn.transaction():
        if members:
            await conn.executemany(
                _UPSERT_MEMBER,
                [
                    (r.room_id, r.user_id, r.member.membership, r.member.displayname,
                     r.member.avatar_url, r.origin_ts)
                    for r in members
                ],
            )  # fmt: skip
        if states:
            await conn.executemany(
                _UPSERT_STATE,
                [(r.room_id, r.event_type, r.content_json, r.sender, r.origin_ts) for r in states],
            )
        if known_room is not None:
            await conn.execute(
                "INSERT INTO bridge_kit_rooms (room_id) VALUES ($1) ON CONFLICT DO NOTHING",
                known_room,
            )


async def membership(pool: Any, room_id: str, user_id: str) -> Member | None:
    row = await pool.fetchrow(
        "SELECT displayname, avatar_url, membership FROM bridge_kit_members"
        " WHERE room_id = $1 AND user_id = $2",
        room_id,
        user_id,
    )
    return None if row is None else Member(row[0], row[1], row[2])


async def members(pool: Any, room_id: str, membership: str) -> dict[str, Member]:
    rows = await pool.fetch(
        "SELECT user_id, displayname, avatar_url FROM bridge_kit_members"
        " WHERE room_id = $1 AND membership = $2",
        room_id,
        membership,
    )
    return {row[0]: Member(row[1], row[2], membership) for row in rows}


async def state_event(pool: Any, room_id: str, event_type: str) -> Event | None:
    row = await pool.fetchrow(
        "SELECT content, sender, origin_ts FROM bridge_kit_room_state"
        " WHERE room_id = $1 AND event_type = $2",
        room_id,
        event_type,
    )
    return None if row is None else state_event_from(room_id, event_type, *row)


async def room_known(pool: Any, room_id: str) -> bool:
    sql = "SELECT EXISTS (SELECT 1 FROM bridge_kit_rooms WHERE room_id = $1)"
    return bool(await pool.fetchval(sql, room_id))


async def profile(pool: Any, user_id: str) -> dict[str, str | None]:
    rows = await pool.fetch(
        "SELECT field, value FROM bridge_kit_profiles WHERE user_id = $1", user_id
    )
    return {row[0]: row[1] for row in rows}


#: Keys sent per lookup query (an array parameter each).
_LOOKUP_CHUNK = 10_000


async def joined_among(pool: Any, pairs: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    for start in range(0, len(pairs), _LOOKUP_CHUNK):
        batch = pairs[start : start + _LOOKUP_CHUNK]
        rows = await pool.fetch(
            "SELECT m.room_id, m.user_id FROM bridge_kit_members m"
            " JOIN unnest($1::text[], $2::text[]) AS p(room_id, user_id)"
            " ON m.room_id = p.room_id AND m.user_id = p.user_id"
            " WHERE m.membership = 'join'",
            [room for room, _ in batch],
            [user for _, user in batch],
        )
        found.extend((row[0], row[1]) for row in rows)
    return found


async def profiles_among(pool: Any, user_ids: Sequence[str]) -> list[tuple[str, str, str | None]]:
    found: list[tuple[str, str, str | None]] = []
    for start in range(0, len(user_ids), _LOOKUP_CHUNK):
        rows = await pool.fetch(
            "SELECT user_id, field, value FROM bridge_kit_profiles WHERE user_id = ANY($1::text[])",
            list(user_ids[start : start + _LOOKUP_CHUNK]),
        )
        found.extend((row[0], row[1], row[2]) for row in rows)
    return found


async def set_profiles(pool: Any, values: Sequence[tuple[str, str, str | None]]) -> None:
    async with pool.acquire() as conn, conn.transaction():
        await conn.executemany(
            "INSERT INTO bridge_kit_profiles (user_id, field, value) VALUES ($1, $2, $3)"
            " ON CONFLICT (user_id, field) DO UPDATE SET value = excluded.value",
            values,
        )

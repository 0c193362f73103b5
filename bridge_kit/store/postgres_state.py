"""Room state in PostgreSQL: the version 3 schema and the batch lookups for bulk runs
(over PostgreSQL's array parameters); the other statements are shared, in
:mod:`bridge_kit.store._state_sql`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

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

"""Room state and profiles: the statements both SQL backends run, written once (see
:mod:`bridge_kit.store._sql`). Each backend keeps its version 3 schema, its batch
lookups (PostgreSQL's array parameters, SQLite's ``VALUES`` lists) and the
transaction around a write."""

from __future__ import annotations

from collections.abc import Sequence

from bridge_kit.store._sql import Query
from bridge_kit.store.base import state_event_from
from bridge_kit.store.state_records import MemberRow, StateRow
from bridge_kit.types.events import Event
from bridge_kit.types.room_state import Member

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
_UPSERT_PROFILE = (
    "INSERT INTO bridge_kit_profiles (user_id, field, value) VALUES ($1, $2, $3)"
    " ON CONFLICT (user_id, field) DO UPDATE SET value = excluded.value"
)


async def apply(
    q: Query, members: Sequence[MemberRow], states: Sequence[StateRow], known_room: str | None
) -> None:
    """Write the rows and mark ``known_room`` (in the caller's transaction)."""
    if members:
        await q.many(
            _UPSERT_MEMBER,
            [
                (r.room_id, r.user_id, r.member.membership, r.member.displayname,
                 r.member.avatar_url, r.origin_ts)
                for r in members
            ],
        )  # fmt: skip
    if states:
        await q.many(
            _UPSERT_STATE,
            [(r.room_id, r.event_type, r.content_json, r.sender, r.origin_ts) for r in states],
        )
    if known_room is not None:
        await q.run(
            "INSERT INTO bridge_kit_rooms (room_id) VALUES ($1) ON CONFLICT DO NOTHING", known_room
        )


async def membership(q: Query, room_id: str, user_id: str) -> Member | None:
    rows = await q.rows(
        "SELECT displayname, avatar_url, membership FROM bridge_kit_members"
        " WHERE room_id = $1 AND user_id = $2",
        room_id,
        user_id,
    )
    return Member(rows[0][0], rows[0][1], rows[0][2]) if rows else None


async def members(q: Query, room_id: str, membership: str) -> dict[str, Member]:
    rows = await q.rows(
        "SELECT user_id, displayname, avatar_url FROM bridge_kit_members"
        " WHERE room_id = $1 AND membership = $2",
        room_id,
        membership,
    )
    return {row[0]: Member(row[1], row[2], membership) for row in rows}


async def state_event(q: Query, room_id: str, event_type: str) -> Event | None:
    rows = await q.rows(
        "SELECT content, sender, origin_ts FROM bridge_kit_room_state"
        " WHERE room_id = $1 AND event_type = $2",
        room_id,
        event_type,
    )
    if not rows:
        return None
    return state_event_from(room_id, event_type, rows[0][0], rows[0][1], rows[0][2])


async def room_known(q: Query, room_id: str) -> bool:
    return bool(await q.rows("SELECT 1 FROM bridge_kit_rooms WHERE room_id = $1", room_id))


async def profile(q: Query, user_id: str) -> dict[str, str | None]:
    rows = await q.rows("SELECT field, value FROM bridge_kit_profiles WHERE user_id = $1", user_id)
    return {row[0]: row[1] for row in rows}


async def set_profiles(q: Query, rows: Sequence[tuple[str, str, str | None]]) -> None:
    """Upsert the ``(user_id, field, value)`` rows (in the caller's transaction)."""
    await q.many(_UPSERT_PROFILE, rows)

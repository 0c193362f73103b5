"""The room-state records: what the store keeps of each room's state, as rows.

A state event becomes a :class:`MemberRow` (``m.room.member``) or a
:class:`StateRow` (the room-wide types in :data:`TRACKED`); every other state
event is not kept. Each row carries the event's ``origin_server_ts``: a row is
only replaced by one at least as recent (the stale-state rule).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any, Final

import attrs

from bridge_kit.store._clean import optional_storable_text, storable_text
from bridge_kit.types.events import Event
from bridge_kit.types.room_state import Member

__all__ = ["TRACKED", "MemberRow", "ProfileField", "StateRow", "rows_of"]

MEMBER: Final = "m.room.member"
CREATE: Final = "m.room.create"
#: The room-wide state types (state key ``""``) the store keeps.
TRACKED: Final = frozenset({"m.room.power_levels", CREATE, "m.room.encryption", "m.room.name"})

#: The profile fields kept per puppet (see ``Store.profile``).
ProfileField = str


@attrs.frozen
class MemberRow:
    """One user's membership of one room, from an ``m.room.member`` event."""

    room_id: str
    user_id: str
    member: Member
    origin_ts: int


@attrs.frozen
class StateRow:
    """One room-wide state event: its content as JSON text, and its sender."""

    room_id: str
    event_type: str
    content_json: str
    sender: str | None
    origin_ts: int


def rows_of(room_id: str, events: Iterable[Event]) -> tuple[list[MemberRow], list[StateRow]]:
    """The rows ``events`` make in ``room_id``; events without a state key, of
    another room, or of an untracked type make none."""
    members: list[MemberRow] = []
    states: list[StateRow] = []
    # NUL and lone surrogates, which no database takes, become U+FFFD (storable_text);
    # lookups clean their keys the same way, so such a row is still found.
    room = storable_text(room_id)
    for event in events:
        if event.state_key is None or event.room_id not in (None, room_id):
            continue
        ts = event.origin_server_ts if isinstance(event.origin_server_ts, int) else 0
        if event.type == MEMBER and event.state_key:
            member = Member.from_event(event)
            member = attrs.evolve(
                member,
                displayname=optional_storable_text(member.displayname),
                avatar_url=optional_storable_text(member.avatar_url),
                membership=storable_text(member.membership),
            )
            members.append(MemberRow(room, storable_text(event.state_key), member, ts))
        elif event.type in TRACKED and event.state_key == "":
            # ASCII JSON: escapes carry NUL and lone surrogates losslessly.
            content = json.dumps(event.content, ensure_ascii=True)
            states.append(
                StateRow(room, event.type, content, optional_storable_text(event.sender), ts)
            )
    return members, states


def known_room(room_id: str, states: Iterable[StateRow], complete: bool) -> str | None:
    """The room to mark as fully known: on a snapshot, or when its creation is seen."""
    if complete or any(row.event_type == CREATE for row in states):
        return storable_text(room_id)
    return None


def content_of(content_json: str) -> dict[str, Any]:
    """Stored content back as a dict (a non-object, which no stored row holds, as ``{}``)."""
    value = json.loads(content_json)
    return value if isinstance(value, dict) else {}

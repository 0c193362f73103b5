"""Membership calls of :class:`~bridge_kit.intent.Intent` that the room-state store hears of:
join, leave, invite, kick, ban and unban."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from bridge_kit.client.homeserver import quote_segment, structure_reply
from bridge_kit.intent import convenience
from bridge_kit.intent._actor import CLIENT, room_path
from bridge_kit.types.room import InviteRequest, JoinRoomResponse, MembershipRequest
from bridge_kit.types.room_state import MembershipChange

if TYPE_CHECKING:
    from bridge_kit.intent import Intent

#: What the store records after each of :func:`change`'s actions.
_RESULT = {"kick": "leave", "ban": "ban", "unban": "leave"}


async def join_room(
    intent: Intent, room_id_or_alias: str, via: Sequence[str], reason: str | None
) -> str:
    query: dict[str, Any] = {}
    if via:
        # ``server_name`` is the pre-v1.12 name of ``via``; older homeservers know only it.
        query = {"via": list(via), "server_name": list(via)}
    reply = await intent._request(
        "POST",
        f"{CLIENT}/join/{quote_segment(room_id_or_alias)}",
        "/join/{roomIdOrAlias}",
        body=MembershipRequest(reason),
        query=query,
    )
    room_id = structure_reply(reply, JoinRoomResponse, "join").room_id
    await convenience.observe_membership(intent, room_id, intent.user_id, "join")
    return room_id


async def leave_room(intent: Intent, room_id: str, reason: str | None) -> None:
    await intent._request(
        "POST",
        f"{room_path(room_id)}/leave",
        "/rooms/{roomId}/leave",
        body=MembershipRequest(reason),
    )
    await convenience.observe_membership(intent, room_id, intent.user_id, "leave")


async def invite(intent: Intent, room_id: str, user_id: str, reason: str | None) -> None:
    await intent._request(
        "POST",
        f"{room_path(room_id)}/invite",
        "/rooms/{roomId}/invite",
        body=InviteRequest(user_id, reason),
    )
    await convenience.observe_membership(intent, room_id, user_id, "invite")


async def change(
    intent: Intent, action: str, room_id: str, user_id: str, reason: str | None
) -> None:
    """``kick``, ``ban`` or ``unban`` ``user_id``; a repeat finds it done, so it may be resent."""
    await intent._request(
        "POST",
        f"{room_path(room_id)}/{action}",
        f"/rooms/{{roomId}}/{action}",
        body=MembershipChange(user_id, reason),
    )
    await convenience.observe_membership(intent, room_id, user_id, _RESULT[action])

"""Room creation, member lists, state, alias, directory and account-data calls of an Intent."""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Mapping
from typing import Any, Final

import attrs
import cattrs

from bridge_kit.client.homeserver import quote_segment, structure_reply
from bridge_kit.errors import (
    MatrixRequestError,
    PowerLevelConflict,
    PowerLevelRefused,
    UnexpectedReply,
    json_type,
)
from bridge_kit.intent._actor import CLIENT, Actor, content_json, device_query, room_path
from bridge_kit.types.converter import converter, describe_error
from bridge_kit.types.events import Event
from bridge_kit.types.room import CreateRoomRequest, CreateRoomResponse, RoomVisibility
from bridge_kit.types.room_state import (
    DirectoryVisibilityRequest,
    JoinedMembersResponse,
    JoinedRoomsResponse,
    Member,
    MembersResponse,
    PowerLevels,
    ResolvedAlias,
    RoomAliasRequest,
    RoomTag,
    with_creators,
)

POWER_LEVELS = "m.room.power_levels"


async def create_room(
    actor: Actor, request: CreateRoomRequest | None, fields: Mapping[str, Any]
) -> str:
    if request is None:
        request = CreateRoomRequest(**fields)
    elif fields:
        request = attrs.evolve(request, **fields)
    # Not resent after a lost reply: a repeat would make a second room.
    reply = await actor._request(
        "POST", f"{CLIENT}/createRoom", "/createRoom", body=request, resend=False
    )
    return structure_reply(reply, CreateRoomResponse, "createRoom").room_id


async def get_joined_members(actor: Actor, room_id: str) -> dict[str, Member]:
    reply = await actor._request(
        "GET", f"{room_path(room_id)}/joined_members", "/rooms/{roomId}/joined_members", body=None
    )
    joined = structure_reply(reply, JoinedMembersResponse, "joined_members").joined
    return {
        user_id: Member(displayname=m.display_name, avatar_url=m.avatar_url)
        for user_id, m in joined.items()
    }


async def joined_rooms(actor: Actor) -> list[str]:
    reply = await actor._request("GET", f"{CLIENT}/joined_rooms", "/joined_rooms", body=None)
    return structure_reply(reply, JoinedRoomsResponse, "joined_rooms").joined_rooms


async def get_members(actor: Actor, room_id: str, membership: str | None) -> dict[str, Member]:
    query = {} if membership is None else {"membership": membership}
    reply = await actor._request(
        "GET", f"{room_path(room_id)}/members", "/rooms/{roomId}/members", body=None, query=query
    )
    chunk = structure_reply(reply, MembersResponse, "members").chunk
    return {
        event.state_key: Member.from_event(event)
        for event in chunk
        if event.type == "m.room.member" and event.state_key
    }


async def get_state_event(
    actor: Actor, room_id: str, event_type: str, state_key: str
) -> dict[str, Any]:
    return await actor._request(
        "GET",
        f"{room_path(room_id)}/state/{quote_segment(event_type)}/{quote_segment(state_key)}",
        "/rooms/{roomId}/state/{eventType}/{stateKey}",
        body=None,
    )


async def get_state(actor: Actor, room_id: str) -> list[Event]:
    await actor.ensure_registered()
    reply = await actor.client.request_json(
        "GET",
        f"{room_path(room_id)}/state",
        query=device_query(actor.device_id),
        user_id=actor.user_id,
        endpoint=f"{CLIENT}/rooms/{{roomId}}/state",
    )
    if not isinstance(reply, list):
        raise UnexpectedReply(200, f"expected an array of state events, got {json_type(reply)}")
    try:
        return converter.structure(reply, list[Event])
    except (cattrs.BaseValidationError, ValueError, TypeError) as exc:
        raise UnexpectedReply(200, f"unexpected state reply: {describe_error(exc)}", reply) from exc


async def get_power_levels(actor: Actor, room_id: str) -> PowerLevels:
    return (await _read_power_levels(actor, room_id))[1]


async def _read_power_levels(actor: Actor, room_id: str) -> tuple[dict[str, Any], PowerLevels]:
    """The power-levels content as it is, and as :class:`PowerLevels` with the creators."""
    content = await get_state_event(actor, room_id, POWER_LEVELS, "")
    levels = structure_reply(content, PowerLevels, "power levels")
    reply = await actor._request(
        "GET",
        f"{room_path(room_id)}/state/m.room.create/",
        "/rooms/{roomId}/state/{eventType}/{stateKey}",
        body=None,
        query={"format": "event"},
    )
    return content, with_creators(levels, structure_reply(reply, Event, "m.room.create"))


#: Writes of one change at most, when a re-read finds another writer (another process,
#: a moderator's client) replaced the power levels between our read and our write.
_POWER_ATTEMPTS: Final = 3
#: One lock per room, whichever client writes: the bot and the puppets share one
#: client, but each double puppet has its own, and all of them read and write back the
#: same power levels. A lock goes when nobody holds or awaits it. (Room IDs are
#: unique across homeservers, so two apps in one process at worst take turns.)
_power_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()


def _power_lock(room_id: str) -> asyncio.Lock:
    lock = _power_locks.get(room_id)
    if lock is None:
        lock = _power_locks[room_id] = asyncio.Lock()
    return lock


async def set_power_level(actor: Actor, room_id: str, user_id: str, level: int) -> str:
    async with _power_lock(room_id):
        for attempt in range(1, _POWER_ATTEMPTS + 1):
            event_id, before = await _write_power_level(actor, room_id, user_id, level)
            # Read back: a writer outside this process may have replaced our event.
            # (Creators are refused above, so the content alone says the level.)
            after = await get_state_event(actor, room_id, POWER_LEVELS, "")
            now = structure_reply(after, PowerLevels, "power levels").user_level(user_id)
            if now == level:
                return event_id
            if now != before:
                # Not a stale copy of the levels written back over ours: someone set
                # this user's level on purpose after us (a moderator). Theirs stands.
                raise PowerLevelConflict(room_id, user_id, attempt, theirs=now)
    raise PowerLevelConflict(room_id, user_id, _POWER_ATTEMPTS)


async def _write_power_level(
    actor: Actor, room_id: str, user_id: str, level: int
) -> tuple[str, int | float]:
    """Write ``user_id``'s new level; the event's ID, and the level it had before."""
    # Read-modify-write of the content as it is: every other key goes back untouched.
    content, levels = await _read_power_levels(actor, room_id)
    check_power_change(levels, actor.user_id, room_id, user_id, level)
    users = dict(content.get("users") or {})
    if level == levels.users_default:
        users.pop(user_id, None)
    else:
        users[user_id] = level
    event_id = await actor.send_state(room_id, POWER_LEVELS, {**content, "users": users})
    return event_id, levels.user_level(user_id)


def check_power_change(
    levels: PowerLevels, changer: str, room_id: str, user_id: str, level: int
) -> None:
    """Raise :class:`~bridge_kit.errors.PowerLevelRefused` unless ``changer`` may give
    ``user_id`` ``level`` (the spec's rules: the level to send the power levels at
    all, never above one's own level, never for someone at or above it; a room
    version 12 creator has no level to change)."""
    if user_id in levels.creators:
        raise PowerLevelRefused(
            room_id, user_id, "it is a creator of the room (room version 12+), above every level"
        )
    own, current = levels.user_level(changer), levels.user_level(user_id)
    needed = levels.event_level(POWER_LEVELS, state=True)  # events, else state_default
    if own < needed:
        raise PowerLevelRefused(
            room_id, user_id, f"sending {POWER_LEVELS} needs {needed}, {changer} has {own}"
        )
    if level > own:
        raise PowerLevelRefused(room_id, user_id, f"{level} is above {changer}'s own {own}")
    if user_id != changer and current != level and current >= own:
        raise PowerLevelRefused(
            room_id, user_id, f"its level {current} is not below {changer}'s {own}"
        )


def _alias_path(alias: str) -> str:
    return f"{CLIENT}/directory/room/{quote_segment(alias)}"


async def create_alias(actor: Actor, alias: str, room_id: str) -> None:
    try:
        await actor._request(
            "PUT",
            _alias_path(alias),
            "/directory/room/{roomAlias}",
            body=RoomAliasRequest(room_id),
        )
    except MatrixRequestError as error:
        # 409: the alias exists. If it already points at this room (a repeat after a
        # lost reply, or a second call), the wanted state is there: not an error.
        if error.status != 409 or (await resolve_alias(actor, alias)).room_id != room_id:
            raise


async def delete_alias(actor: Actor, alias: str) -> None:
    await actor._request("DELETE", _alias_path(alias), "/directory/room/{roomAlias}", body=None)


async def resolve_alias(actor: Actor, alias: str) -> ResolvedAlias:
    reply = await actor._request(
        "GET", _alias_path(alias), "/directory/room/{roomAlias}", body=None
    )
    return structure_reply(reply, ResolvedAlias, "directory")


async def set_directory_visibility(
    actor: Actor, room_id: str, visibility: RoomVisibility | str
) -> None:
    await actor._request(
        "PUT",
        f"{CLIENT}/directory/list/room/{quote_segment(room_id)}",
        "/directory/list/room/{roomId}",
        body=DirectoryVisibilityRequest(RoomVisibility(visibility)),
    )


def _account_data_path(actor: Actor, event_type: str, room_id: str | None) -> tuple[str, str]:
    user = f"{CLIENT}/user/{quote_segment(actor.user_id)}"
    if room_id is None:
        return (
            f"{user}/account_data/{quote_segment(event_type)}",
            "/user/{userId}/account_data/{type}",
        )
    return (
        f"{user}/rooms/{quote_segment(room_id)}/account_data/{quote_segment(event_type)}",
        "/user/{userId}/rooms/{roomId}/account_data/{type}",
    )


async def get_account_data(actor: Actor, event_type: str, room_id: str | None) -> dict[str, Any]:
    path, endpoint = _account_data_path(actor, event_type, room_id)
    return await actor._request("GET", path, endpoint, body=None)


async def set_account_data(
    actor: Actor, event_type: str, content: Mapping[str, Any] | Any, room_id: str | None
) -> None:
    path, endpoint = _account_data_path(actor, event_type, room_id)
    await actor._request("PUT", path, endpoint, body=content_json(content))


def _tag_path(actor: Actor, room_id: str, tag: str) -> str:
    return (
        f"{CLIENT}/user/{quote_segment(actor.user_id)}/rooms/{quote_segment(room_id)}"
        f"/tags/{quote_segment(tag)}"
    )


_TAG_ENDPOINT = "/user/{userId}/rooms/{roomId}/tags/{tag}"


async def set_room_tag(actor: Actor, room_id: str, tag: str, order: float | None) -> None:
    await actor._request("PUT", _tag_path(actor, room_id, tag), _TAG_ENDPOINT, body=RoomTag(order))


async def remove_room_tag(actor: Actor, room_id: str, tag: str) -> None:
    await actor._request("DELETE", _tag_path(actor, room_id, tag), _TAG_ENDPOINT, body=None)

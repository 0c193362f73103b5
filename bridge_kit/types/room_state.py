"""Room state, membership, aliases, the room directory and account data: their wire models."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import attrs
import cattrs
from cattrs.gen import override

from bridge_kit.errors import WrongType
from bridge_kit.types.converter import keep_unknown_keys
from bridge_kit.types.events import Event
from bridge_kit.types.room import RoomVisibility


@attrs.frozen
class Member:
    """A room member: profile and ``membership`` (``join``, ``invite``, ``leave``, ``ban``...)."""

    displayname: str | None = None
    avatar_url: str | None = None
    membership: str = "join"

    @classmethod
    def from_event(cls, event: Event) -> Member:
        """The member an ``m.room.member`` state event describes."""
        content = event.content
        name, avatar = content.get("displayname"), content.get("avatar_url")
        return cls(
            displayname=name if isinstance(name, str) else None,
            avatar_url=avatar if isinstance(avatar, str) else None,
            membership=str(content.get("membership", "leave")),
        )


@attrs.frozen
class JoinedMember:
    """One entry of ``GET /rooms/{roomId}/joined_members`` (``display_name`` on the wire)."""

    display_name: str | None = None
    avatar_url: str | None = None


@attrs.frozen
class JoinedMembersResponse:
    """The reply of ``GET /rooms/{roomId}/joined_members``."""

    joined: dict[str, JoinedMember] = attrs.field(factory=dict)


@attrs.frozen
class JoinedRoomsResponse:
    """The reply of ``GET /joined_rooms``."""

    joined_rooms: list[str]


@attrs.frozen
class MembersResponse:
    """The reply of ``GET /rooms/{roomId}/members``: ``m.room.member`` state events."""

    chunk: list[Event] = attrs.field(factory=list)


@attrs.frozen
class MembershipChange:
    """The body of ``/kick``, ``/ban`` and ``/unban``."""

    user_id: str
    reason: str | None = None
    extra: dict[str, Any] = attrs.field(factory=dict)


def _frozen(users: Iterable[str]) -> frozenset[str]:
    return frozenset(users)


@attrs.frozen
class PowerLevels:
    """The content of ``m.room.power_levels``, with the spec's defaults for absent keys.

    Levels below are what the spec says apply when a key is absent from the
    event. (A room with no power-levels event at all uses other rules: the
    creator has 100 and everything else 0; this model describes an event.)
    Unknown keys stay in ``extra``.

    ``creators`` is not part of the event: from room version 12 on, the room's
    creators (``m.room.create``'s sender and ``additional_creators``) have an
    infinite level and are never listed in ``users``.
    :meth:`~bridge_kit.intent.Intent.get_power_levels` fills it in.
    """

    users: dict[str, int] = attrs.field(factory=dict)
    users_default: int = 0
    events: dict[str, int] = attrs.field(factory=dict)
    events_default: int = 0
    state_default: int = 50
    ban: int = 50
    kick: int = 50
    redact: int = 50
    invite: int = 0
    notifications: dict[str, int] = attrs.field(factory=dict)
    extra: dict[str, Any] = attrs.field(factory=dict)
    creators: frozenset[str] = attrs.field(default=frozenset(), converter=_frozen)

    def user_level(self, user_id: str) -> int | float:
        """The power level of ``user_id``: ``math.inf`` for a creator (room version 12+),
        else its entry in ``users``, else ``users_default``."""
        if user_id in self.creators:
            return math.inf
        return self.users.get(user_id, self.users_default)

    def event_level(self, event_type: str, state: bool = False) -> int:
        """The level needed to send ``event_type``: its entry in ``events``, else
        ``state_default`` for a state event or ``events_default`` for a message."""
        default = self.state_default if state else self.events_default
        return self.events.get(event_type, default)


# Room versions before 12 give creators no special power; later ones (and MSC4289's
# unstable versions) give them an infinite level. The unstable versions homeservers
# still create that are built on version 10 or 11 without MSC4289 (Synapse 1.163
# knows MSC3757's) are legacy too.
_LEGACY_ROOM_VERSIONS = frozenset(
    [str(n) for n in range(1, 12)] + ["org.matrix.msc3757.10", "org.matrix.msc3757.11"]
)


def with_creators(levels: PowerLevels, create: Event) -> PowerLevels:
    """``levels`` with ``creators`` filled in from the room's ``m.room.create`` event."""
    if str(create.content.get("room_version", "1")) in _LEGACY_ROOM_VERSIONS:
        return levels
    extra = create.content.get("additional_creators")
    named: list[Any] = [create.sender, *(extra if isinstance(extra, list) else [])]
    creators: frozenset[str] = frozenset(c for c in named if isinstance(c, str) and c)
    return attrs.evolve(levels, creators=creators)


@attrs.frozen
class RoomName:
    """The content of ``m.room.name``."""

    name: str


@attrs.frozen
class RoomTopic:
    """The content of ``m.room.topic``."""

    topic: str


@attrs.frozen
class RoomAvatar:
    """The content of ``m.room.avatar``: an ``mxc://`` URI, and optionally its ``info``."""

    url: str
    info: dict[str, Any] | None = None


@attrs.frozen
class RoomAliasRequest:
    """The body of ``PUT /directory/room/{roomAlias}``."""

    room_id: str


@attrs.frozen
class ResolvedAlias:
    """The reply of ``GET /directory/room/{roomAlias}``: the room and servers to join it via."""

    room_id: str
    servers: list[str] = attrs.field(factory=list)


@attrs.frozen
class DirectoryVisibilityRequest:
    """The body of ``PUT /directory/list/room/{roomId}``; also takes ``"public"``/``"private"``."""

    visibility: RoomVisibility = attrs.field(converter=RoomVisibility)


@attrs.frozen
class RoomTag:
    """The content of one room tag: ``order`` between 0 and 1, or none."""

    order: float | None = None
    extra: dict[str, Any] = attrs.field(factory=dict)


def configure_converter(converter: cattrs.Converter) -> None:
    """Register the hooks of this module's models on ``converter``."""
    keep_unknown_keys(converter, MembershipChange, omit_if_default=True)
    keep_unknown_keys(converter, PowerLevels, omit_if_default=True, creators=override(omit=True))
    keep_unknown_keys(converter, RoomTag, omit_if_default=True)
    converter.register_unstructure_hook(
        RoomAvatar,
        lambda a: {"url": a.url} | ({} if a.info is None else {"info": a.info}),
    )
    converter.register_unstructure_hook(
        JoinedMember, lambda m: {"display_name": m.display_name, "avatar_url": m.avatar_url}
    )
    converter.register_structure_hook(JoinedMember, _structure_joined_member)


def _structure_joined_member(value: Any, _: Any) -> JoinedMember:
    # A member's profile may hold nulls or junk (it is the user's to set): keep the strings.
    if not isinstance(value, dict):
        raise WrongType("a JSON object for JoinedMember", value)
    name, avatar = value.get("display_name"), value.get("avatar_url")
    return JoinedMember(
        display_name=name if isinstance(name, str) else None,
        avatar_url=avatar if isinstance(avatar, str) else None,
    )

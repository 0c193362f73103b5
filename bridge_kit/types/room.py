"""Bodies of the client-server requests an :class:`~bridge_kit.intent.Intent` sends.

Request models omit every field left at its default (``None``, ``False``, an
empty list), so the homeserver applies its own defaults; each request model
also has an ``extra`` dict for keys bridge_kit has no field for (MSC keys,
newer spec fields), which is sent as is.
"""

from __future__ import annotations

import enum
from typing import Any

import attrs
import cattrs
from cattrs.gen import override

from bridge_kit.types.converter import keep_unknown_keys

HTML_FORMAT = "org.matrix.custom.html"
"""The ``format`` of an HTML ``formatted_body``."""


class RoomPreset(enum.Enum):
    """``preset`` of ``createRoom``: a bundle of join rule, history and guest access."""

    PRIVATE_CHAT = "private_chat"
    PUBLIC_CHAT = "public_chat"
    TRUSTED_PRIVATE_CHAT = "trusted_private_chat"


class RoomVisibility(enum.Enum):
    """``visibility`` of ``createRoom``: whether the room is in the public directory."""

    PUBLIC = "public"
    PRIVATE = "private"


def _optional_preset(value: RoomPreset | str | None) -> RoomPreset | None:
    return None if value is None else RoomPreset(value)


def _optional_visibility(value: RoomVisibility | str | None) -> RoomVisibility | None:
    return None if value is None else RoomVisibility(value)


@attrs.frozen
class StateEventInput:
    """One event of ``initial_state``: a state event without sender or ID."""

    type: str
    content: dict[str, Any] = attrs.field(factory=dict)
    state_key: str = ""


@attrs.frozen
class CreateRoomRequest:
    """The body of ``POST /_matrix/client/v3/createRoom``.

    ``preset`` and ``visibility`` also accept their string values
    (``preset="private_chat"``). ``room_alias_name`` is the alias localpart only
    (``"_bk_chat"`` for ``#_bk_chat:example.org``).
    """

    preset: RoomPreset | None = attrs.field(default=None, converter=_optional_preset)
    visibility: RoomVisibility | None = attrs.field(default=None, converter=_optional_visibility)
    name: str | None = None
    topic: str | None = None
    invite: list[str] = attrs.field(factory=list)
    is_direct: bool = False
    room_alias_name: str | None = None
    initial_state: list[StateEventInput] = attrs.field(factory=list)
    power_level_content_override: dict[str, Any] | None = None
    creation_content: dict[str, Any] | None = None
    room_version: str | None = None
    extra: dict[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class CreateRoomResponse:
    """The reply of ``createRoom``; ``room_alias`` only when an alias was asked for."""

    room_id: str
    room_alias: str | None = None


@attrs.frozen
class JoinRoomResponse:
    """The reply of ``POST /join/{roomIdOrAlias}``."""

    room_id: str


@attrs.frozen
class SendEventResponse:
    """The reply of a send or state request."""

    event_id: str


@attrs.frozen
class MembershipRequest:
    """The body of ``/leave`` and ``/join``: an optional ``reason``; a join's
    ``displayname`` and ``avatar_url`` go into its member event (Synapse puts the
    global profile there only for what the body leaves out)."""

    reason: str | None = None
    displayname: str | None = None
    avatar_url: str | None = None
    extra: dict[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class InviteRequest:
    """The body of ``POST /rooms/{roomId}/invite``."""

    user_id: str
    reason: str | None = None
    extra: dict[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class DisplaynameUpdate:
    """The body of ``PUT /profile/{userId}/displayname``; ``None`` removes the name."""

    displayname: str | None


@attrs.frozen
class AvatarUrlUpdate:
    """The body of ``PUT /profile/{userId}/avatar_url``: an ``mxc://`` URI."""

    avatar_url: str


class MessageType(enum.Enum):
    """The ``msgtype`` values of a text-like ``m.room.message``."""

    TEXT = "m.text"
    NOTICE = "m.notice"
    EMOTE = "m.emote"


@attrs.frozen
class TextMessage:
    """The content of a text-like ``m.room.message`` (``m.text``, ``m.notice``, ``m.emote``).

    Build it with :meth:`plain` or :meth:`html` rather than by hand. ``extra``
    carries anything else (``m.relates_to``, ``m.mentions``...).
    """

    body: str
    msgtype: MessageType = MessageType.TEXT
    format: str | None = None
    formatted_body: str | None = None
    extra: dict[str, Any] = attrs.field(factory=dict)

    @classmethod
    def plain(cls, body: str, msgtype: MessageType = MessageType.TEXT) -> TextMessage:
        """A message with a plain-text body only."""
        return cls(body=body, msgtype=msgtype)

    @classmethod
    def html(cls, body: str, html: str, msgtype: MessageType = MessageType.TEXT) -> TextMessage:
        """A message with an HTML ``formatted_body`` and ``body`` as its plain-text fallback."""
        return cls(body=body, msgtype=msgtype, format=HTML_FORMAT, formatted_body=html)


def configure_converter(converter: cattrs.Converter) -> None:
    """Register the hooks of this module's models on ``converter``."""
    keep_unknown_keys(converter, CreateRoomRequest, omit_if_default=True)
    keep_unknown_keys(converter, MembershipRequest, omit_if_default=True)
    keep_unknown_keys(converter, InviteRequest, omit_if_default=True)
    # msgtype is required on the wire even when it is the default m.text.
    keep_unknown_keys(
        converter, TextMessage, omit_if_default=True, msgtype=override(omit_if_default=False)
    )

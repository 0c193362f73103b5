"""Remote events: what happened on the remote network, as a connector tells the layer.

A connector builds one of these and hands it to
:meth:`~bridge_kit.bridge.core.BridgeCore.handle_remote`. The layer stores it in the
durable inbox (lane ``remote:<portal key>``) before that call returns, then
handles each portal's events one at a time, in order, with the inbox's retries
and dead letters. An event with an ``id`` is accepted once: the same id for the
same portal again (a remote network redelivering after a reconnect) is dropped,
and a message already in the message map is never posted twice.

Every event is a plain attrs record that travels as JSON, so it holds only
strings, numbers and other records of this module.
"""

from __future__ import annotations

import enum
from typing import Any, ClassVar, Final

import attrs

from bridge_kit.bridge.records import PortalKey
from bridge_kit.types.converter import converter

__all__ = [
    "EVENT_TYPES",
    "Membership",
    "MessageKind",
    "RemoteChatInfoChange",
    "RemoteEdit",
    "RemoteEvent",
    "RemoteMedia",
    "RemoteMembership",
    "RemoteMessage",
    "RemoteProfileChange",
    "RemoteReaction",
    "RemoteReactionRemove",
    "RemoteRedaction",
    "Sender",
]


class MessageKind(enum.Enum):
    """What a remote message is; the Matrix ``msgtype`` it becomes."""

    TEXT = "m.text"
    EMOTE = "m.emote"  # "/me waves"
    NOTICE = "m.notice"  # automated text: bots, server notices
    IMAGE = "m.image"
    FILE = "m.file"
    AUDIO = "m.audio"
    VIDEO = "m.video"


class Membership(enum.Enum):
    """A change of a remote user's membership in a remote chat."""

    JOIN = "join"
    LEAVE = "leave"
    KICK = "kick"
    BAN = "ban"


@attrs.frozen
class Sender:
    """Who did it on the remote network: a remote user ``id`` (their ghost's key).

    ``name`` is their display name when the network tells it with the event (the
    ghost's profile is updated when it differs); ``None``: ask the connector's
    :meth:`~bridge_kit.bridge.connector.NetworkConnector.get_user_info` once.
    """

    id: str
    name: str | None = None


@attrs.frozen
class RemoteMedia:
    """A file on the remote network: fetched from ``url`` (``http(s)``) and uploaded
    as the sender's ghost, or an ``mxc://`` URI the connector uploaded itself."""

    url: str
    name: str = "file"
    mimetype: str | None = None
    size: int | None = None


@attrs.frozen(kw_only=True)
class RemoteEvent:
    """What every remote event has: the ``portal`` (remote chat) it happened in,
    who did it, and ``id``, the remote network's id for this event (``""``: it
    has none, and is not deduplicated). ``timestamp`` is Unix seconds (0: now)."""

    type: ClassVar[str] = ""

    portal: PortalKey
    sender: Sender
    id: str = ""
    timestamp: float = 0.0


@attrs.frozen(kw_only=True)
class RemoteMessage(RemoteEvent):
    """A new message: ``text`` (plain) and optionally ``html`` (Matrix HTML).

    ``reply_to`` is the remote id of the message it answers (found through the
    message map). ``media`` makes it a file of ``kind`` IMAGE, FILE, AUDIO or
    VIDEO, with ``text`` as its caption. ``id`` is required: it keys the message
    map for later edits, replies, reactions and redactions.
    """

    type: ClassVar[str] = "message"

    text: str
    html: str | None = None
    kind: MessageKind = MessageKind.TEXT
    reply_to: str | None = None
    media: RemoteMedia | None = None


@attrs.frozen(kw_only=True)
class RemoteEdit(RemoteEvent):
    """``target`` (a remote message id) now reads ``text`` / ``html``."""

    type: ClassVar[str] = "edit"

    target: str
    text: str
    html: str | None = None


@attrs.frozen(kw_only=True)
class RemoteReaction(RemoteEvent):
    """The sender reacted to ``target`` with ``key`` (an emoji, or a short text)."""

    type: ClassVar[str] = "reaction"

    target: str
    key: str


@attrs.frozen(kw_only=True)
class RemoteReactionRemove(RemoteEvent):
    """The sender took back their reaction ``key`` to ``target``."""

    type: ClassVar[str] = "reaction_remove"

    target: str
    key: str


@attrs.frozen(kw_only=True)
class RemoteRedaction(RemoteEvent):
    """Message ``target`` was deleted."""

    type: ClassVar[str] = "redaction"

    target: str
    reason: str = ""


@attrs.frozen(kw_only=True)
class RemoteMembership(RemoteEvent):
    """``target`` joined, left, was kicked or banned (by ``sender`` for a kick or
    a ban; for a join or leave the sender is the target itself)."""

    type: ClassVar[str] = "membership"

    target: Sender
    membership: Membership
    reason: str = ""


@attrs.frozen(kw_only=True)
class RemoteProfileChange(RemoteEvent):
    """The sender's profile changed (a rename): their ghost gets ``name`` and
    ``avatar_url`` (``None``: unchanged). The ghost's profile is global on Matrix,
    so one event changes it in every portal; ``portal`` orders it among that
    portal's events."""

    type: ClassVar[str] = "profile"

    name: str | None = None
    avatar_url: str | None = None


@attrs.frozen(kw_only=True)
class RemoteChatInfoChange(RemoteEvent):
    """The chat's name, topic or avatar changed (``None``: unchanged, ``""``: removed)."""

    type: ClassVar[str] = "chat_info"

    name: str | None = None
    topic: str | None = None
    avatar_url: str | None = None


EVENT_TYPES: Final[dict[str, type[RemoteEvent]]] = {
    cls.type: cls
    for cls in (
        RemoteMessage,
        RemoteEdit,
        RemoteReaction,
        RemoteReactionRemove,
        RemoteRedaction,
        RemoteMembership,
        RemoteProfileChange,
        RemoteChatInfoChange,
    )
}
"""Every remote event class, by its ``type`` (how it is named in the inbox)."""


def event_payload(event: RemoteEvent) -> dict[str, Any]:
    """The event as the inbox stores it (see :func:`event_from_payload`)."""
    return {"type": event.type, "content": converter.unstructure(event)}


def event_from_payload(event_type: str, content: Any) -> RemoteEvent:
    """The event :func:`event_payload` stored; ``ValueError`` for an unknown type."""
    cls = EVENT_TYPES.get(event_type)
    if cls is None:
        raise ValueError(f"unknown remote event type {event_type!r}")
    event: RemoteEvent = converter.structure(content, cls)
    return event

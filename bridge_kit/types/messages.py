"""Message relations and the ephemeral requests an :class:`~bridge_kit.intent.Intent` sends.

Relations (``m.relates_to``): replies, edits (``m.replace``) and reactions
(``m.annotation``). Ephemeral requests: typing notices, read markers, presence.
Request models omit fields left at their default; ``extra`` carries keys
bridge_kit has no field for.
"""

from __future__ import annotations

import enum
from typing import Any

import attrs
import cattrs
from cattrs.gen import override

from bridge_kit.types.converter import keep_unknown_keys

REL_ANNOTATION = "m.annotation"
"""``rel_type`` of a reaction."""
REL_REPLACE = "m.replace"
"""``rel_type`` of an edit."""


@attrs.frozen
class InReplyTo:
    """``m.in_reply_to``: the event a message replies to."""

    event_id: str
    extra: dict[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class RelatesTo:
    """``m.relates_to`` of an event's content.

    A reply has only ``in_reply_to``; an edit has ``rel_type`` ``m.replace`` and
    ``event_id``; a reaction ``m.annotation``, ``event_id`` and ``key``.
    """

    rel_type: str | None = None
    event_id: str | None = None
    key: str | None = None
    in_reply_to: InReplyTo | None = None
    extra: dict[str, Any] = attrs.field(factory=dict)

    @classmethod
    def reply(cls, event_id: str) -> RelatesTo:
        """The relation of a reply to ``event_id``."""
        return cls(in_reply_to=InReplyTo(event_id))

    @classmethod
    def replace(cls, event_id: str) -> RelatesTo:
        """The relation of an edit of ``event_id``."""
        return cls(rel_type=REL_REPLACE, event_id=event_id)

    @classmethod
    def annotation(cls, event_id: str, key: str) -> RelatesTo:
        """The relation of a reaction ``key`` (an emoji, usually) to ``event_id``."""
        return cls(rel_type=REL_ANNOTATION, event_id=event_id, key=key)


@attrs.frozen
class ReactionContent:
    """The content of an ``m.reaction`` event."""

    relates_to: RelatesTo
    extra: dict[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class RedactRequest:
    """The body of ``PUT /rooms/{roomId}/redact/{eventId}/{txnId}``."""

    reason: str | None = None
    extra: dict[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class TypingRequest:
    """The body of ``PUT /rooms/{roomId}/typing/{userId}``; ``timeout`` in ms, when typing."""

    typing: bool
    timeout: int | None = None


@attrs.frozen
class ReadMarkersRequest:
    """The body of ``POST /rooms/{roomId}/read_markers``: event IDs per marker."""

    fully_read: str | None = None
    read: str | None = None
    read_private: str | None = None
    extra: dict[str, Any] = attrs.field(factory=dict)


class Presence(enum.Enum):
    """A user's presence state."""

    ONLINE = "online"
    OFFLINE = "offline"
    UNAVAILABLE = "unavailable"


def _presence(value: Presence | str) -> Presence:
    return Presence(value)


@attrs.frozen
class PresenceRequest:
    """The body of ``PUT /presence/{userId}/status``; ``presence`` also takes its string value."""

    presence: Presence = attrs.field(converter=_presence)
    status_msg: str | None = None
    extra: dict[str, Any] = attrs.field(factory=dict)


def configure_converter(converter: cattrs.Converter) -> None:
    """Register the hooks of this module's models on ``converter``."""
    keep_unknown_keys(converter, InReplyTo)
    keep_unknown_keys(
        converter, RelatesTo, omit_if_default=True, in_reply_to=override(rename="m.in_reply_to")
    )
    keep_unknown_keys(converter, ReactionContent, relates_to=override(rename="m.relates_to"))
    keep_unknown_keys(converter, RedactRequest, omit_if_default=True)
    converter.register_unstructure_hook(
        TypingRequest,
        lambda r: {"typing": r.typing} | ({} if r.timeout is None else {"timeout": r.timeout}),
    )
    keep_unknown_keys(
        converter,
        ReadMarkersRequest,
        omit_if_default=True,
        fully_read=override(rename="m.fully_read"),
        read=override(rename="m.read"),
        read_private=override(rename="m.read.private"),
    )
    keep_unknown_keys(converter, PresenceRequest, omit_if_default=True)

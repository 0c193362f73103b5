"""Messaging and ephemeral calls of :class:`~bridge_kit.intent.Intent`: the implementations."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import attrs

from bridge_kit.client.homeserver import quote_segment, structure_reply
from bridge_kit.inbox.delivery import next_txn_id
from bridge_kit.intent._actor import CLIENT, Actor, content_json, room_path
from bridge_kit.intent.state_store import own_state_event
from bridge_kit.types.converter import converter
from bridge_kit.types.messages import (
    Presence,
    PresenceRequest,
    ReactionContent,
    ReadMarkersRequest,
    RedactRequest,
    RelatesTo,
    TypingRequest,
)
from bridge_kit.types.room import MessageType, SendEventResponse, TextMessage

if TYPE_CHECKING:
    from bridge_kit.intent import Intent

DEFAULT_TYPING_MS = 30_000


async def send_event(
    actor: Actor,
    room_id: str,
    event_type: str,
    content: Mapping[str, Any] | Any,
    txn_id: str | None,
    timestamp: int | None,
) -> str:
    # Derived from the type the caller sent, so a retried handler reuses it even
    # though the encrypted content differs each time.
    txn_id = txn_id or next_txn_id(actor.user_id, room_id, event_type)
    body = content_json(content)
    if actor.encryption is not None:
        event_type, body = await actor.encryption.outgoing(actor, room_id, event_type, body)
    reply = await actor._request(
        "PUT",
        f"{room_path(room_id)}/send/{quote_segment(event_type)}/{quote_segment(txn_id)}",
        "/rooms/{roomId}/send/{eventType}/{txnId}",
        body=body,
        query=_timestamp_query(timestamp),
    )
    return structure_reply(reply, SendEventResponse, "send").event_id


async def send_state(
    intent: Intent,
    room_id: str,
    event_type: str,
    content: Mapping[str, Any] | Any,
    state_key: str,
    timestamp: int | None,
) -> str:
    body = content_json(content)
    reply = await intent._request(
        "PUT",
        f"{room_path(room_id)}/state/{quote_segment(event_type)}/{quote_segment(state_key)}",
        "/rooms/{roomId}/state/{eventType}/{stateKey}",
        body=body,
        query=_timestamp_query(timestamp),
    )
    event_id = structure_reply(reply, SendEventResponse, "state").event_id
    if intent.room_state is not None and isinstance(body, dict):
        event = own_state_event(intent.user_id, room_id, event_type, body, state_key)
        await intent.room_state.observe(room_id, [event])
    return event_id


def _timestamp_query(timestamp: int | None) -> dict[str, str]:
    return {} if timestamp is None else {"ts": str(int(timestamp))}


def text_content(
    text: str, html: str | None, msgtype: MessageType, reply_to: str | None = None
) -> TextMessage:
    """An ``m.room.message`` text-like content, replying to ``reply_to`` when given."""
    content = (
        TextMessage.plain(text, msgtype) if html is None else TextMessage.html(text, html, msgtype)
    )
    if reply_to is None:
        return content
    relation = converter.unstructure(RelatesTo.reply(reply_to))
    return attrs.evolve(content, extra={**content.extra, "m.relates_to": relation})


async def send_message(
    actor: Actor,
    room_id: str,
    text: str,
    msgtype: MessageType,
    *,
    html: str | None = None,
    reply_to: str | None = None,
    timestamp: int | None = None,
) -> str:
    content = text_content(text, html, msgtype, reply_to)
    return await actor.send_event(room_id, "m.room.message", content, timestamp=timestamp)


async def send_reaction(actor: Actor, room_id: str, event_id: str, key: str) -> str:
    content = ReactionContent(RelatesTo.annotation(event_id, key))
    return await actor.send_event(room_id, "m.reaction", content)


async def edit_message(
    actor: Actor,
    room_id: str,
    event_id: str,
    new_text: str,
    html: str | None,
    msgtype: MessageType,
) -> str:
    new_content = text_content(new_text, html, msgtype)
    # Clients that do not know edits show the fallback: the new text marked with "* ".
    fallback = text_content(f"* {new_text}", None if html is None else f"* {html}", msgtype)
    content = attrs.evolve(
        fallback,
        extra={
            "m.new_content": converter.unstructure(new_content),
            "m.relates_to": converter.unstructure(RelatesTo.replace(event_id)),
        },
    )
    return await actor.send_event(room_id, "m.room.message", content)


async def redact(
    actor: Actor, room_id: str, event_id: str, reason: str | None, txn_id: str | None
) -> str:
    txn_id = txn_id or next_txn_id(actor.user_id, room_id, "m.room.redaction")
    reply = await actor._request(
        "PUT",
        f"{room_path(room_id)}/redact/{quote_segment(event_id)}/{quote_segment(txn_id)}",
        "/rooms/{roomId}/redact/{eventId}/{txnId}",
        body=RedactRequest(reason),
    )
    return structure_reply(reply, SendEventResponse, "redact").event_id


async def set_typing(actor: Actor, room_id: str, timeout_ms: int | bool) -> None:
    if timeout_ms is True:
        timeout_ms = DEFAULT_TYPING_MS
    typing = timeout_ms is not False and timeout_ms > 0
    body = TypingRequest(True, int(timeout_ms)) if typing else TypingRequest(False)
    await actor._request(
        "PUT",
        f"{room_path(room_id)}/typing/{quote_segment(actor.user_id)}",
        "/rooms/{roomId}/typing/{userId}",
        body=body,
    )


async def mark_read(actor: Actor, room_id: str, event_id: str, private: bool) -> None:
    if private:
        body = ReadMarkersRequest(fully_read=event_id, read_private=event_id)
    else:
        body = ReadMarkersRequest(fully_read=event_id, read=event_id)
    await actor._request(
        "POST", f"{room_path(room_id)}/read_markers", "/rooms/{roomId}/read_markers", body=body
    )


async def set_presence(actor: Actor, presence: Presence | str, status_msg: str | None) -> None:
    await actor._request(
        "PUT",
        f"{CLIENT}/presence/{quote_segment(actor.user_id)}/status",
        "/presence/{userId}/status",
        body=PresenceRequest(presence, status_msg),
    )

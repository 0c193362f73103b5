"""Exactly-once sends from handlers: transaction IDs derived from the event being handled.

While a handler runs for an inbox event, :func:`next_txn_id` derives each
send's transaction ID from what identifies that send: the appservice, the
incoming event, the handler, the sending user, the room, the event type and
how many sends of that user, room and type the handler made before. A handler
that runs again for the same event (after a crash, a timeout or a retry) makes
the same IDs, so the homeserver answers with the event it already has instead
of posting a second copy. Outside a handler the IDs are random.

The number counts per (user, room, event type), not per handler run: what a
run sends elsewhere in between cannot shift it, nor can tasks the handler
started that send to other rooms at the same time. To-device messages (room
key shares above all) take no number at all: :func:`to_device_txn_id` derives
theirs from what they carry. A re-run often has nothing to share (the key
went out the first time), and a share that took a number would give every
later send of the re-run another ID, posting it twice.

A to-device message is known by its content: the same message sent again by
a re-run gets the same ID (the homeserver drops the copy), while an encrypted
one (new ciphertext each time) goes out again, which is what a room key needs:
a copy is harmless, a share answered from the homeserver's cache of an older
one would be lost.

The sending user is part of the hash on purpose: Synapse keys an appservice's
transaction IDs by request path and appservice only, not by the puppet the
request asserts, so two puppets must never derive the same ID.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import uuid
from collections.abc import Iterator, Mapping
from typing import Any, Final

import attrs

__all__ = ["HandlingContext", "handling", "next_txn_id", "to_device_txn_id"]

# Sorted keys: the same messages built in another order are the same messages.
_CANONICAL: Final = json.JSONEncoder(sort_keys=True, separators=(",", ":"), default=str)


@attrs.define
class HandlingContext:
    """What identifies one handler's run for one event, and what it sent so far."""

    appservice_id: str
    event_key: str
    handler: str
    #: Room sends so far, per (user, room, event type).
    sends: dict[tuple[str, str, str], int] = attrs.field(factory=dict)
    #: To-device sends so far, per (user, device, event type, content digest).
    to_device_sends: dict[tuple[str, str, str, str], int] = attrs.field(factory=dict)

    def derive(self, *parts: str) -> str:
        """A transaction ID from this run's identity and ``parts``."""
        # NUL cannot occur in these strings' meaningful forms, so the join is unambiguous.
        joined = "\0".join((self.appservice_id, self.event_key, self.handler, *parts))
        return f"bk{hashlib.sha256(joined.encode()).hexdigest()[:40]}"


_current: contextvars.ContextVar[HandlingContext | None] = contextvars.ContextVar(
    "bridge_kit_handling", default=None
)


@contextlib.contextmanager
def handling(appservice_id: str, event_key: str, handler: str) -> Iterator[HandlingContext]:
    """Derive the transaction IDs of sends inside the block from this event and handler.

    ``event_key`` is the incoming event's ID (or another key stable across retries
    for events without one). Tasks the handler starts inherit the context.
    """
    context = HandlingContext(appservice_id, event_key, handler)
    token = _current.set(context)
    try:
        yield context
    finally:
        _current.reset(token)


def next_txn_id(user_id: str, room_id: str, event_type: str) -> str:
    """The transaction ID for a send into a room: derived inside a handler, random outside."""
    context = _current.get()
    if context is None:
        return uuid.uuid4().hex
    key = (user_id, room_id, event_type)
    number = context.sends.get(key, 0) + 1
    context.sends[key] = number
    return context.derive(str(number), user_id, room_id, event_type)


def to_device_txn_id(
    user_id: str, device_id: str | None, event_type: str, messages: Mapping[str, Any]
) -> str:
    """The transaction ID for a ``/sendToDevice`` of ``messages`` (user -> device ->
    content, as JSON): derived from them inside a handler, random outside."""
    context = _current.get()
    if context is None:
        return uuid.uuid4().hex
    content = hashlib.sha256(_CANONICAL.encode(messages).encode()).hexdigest()
    key = (user_id, device_id or "", event_type, content)
    number = context.to_device_sends.get(key, 0) + 1
    context.to_device_sends[key] = number
    return context.derive("~to-device", str(number), *key)

"""Exactly-once sends from handlers: transaction IDs derived from the event being handled.

While a handler runs for an inbox event, :func:`next_txn_id` derives each
send's transaction ID from what identifies that send: the appservice, the
incoming event, the handler, the sending user, the room, the event type and
how many sends the handler made before. A handler that runs again for the
same event (after a crash, a timeout or a retry) makes the same IDs in the
same order, so the homeserver answers with the event it already has instead
of posting a second copy. Outside a handler the IDs are random.

The sending user is part of the hash on purpose: Synapse keys an appservice's
transaction IDs by request path and appservice only, not by the puppet the
request asserts, so two puppets must never derive the same ID.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import uuid
from collections.abc import Iterator

import attrs

__all__ = ["HandlingContext", "handling", "next_txn_id"]


@attrs.define
class HandlingContext:
    """What identifies one handler's run for one event; ``sends`` counts its sends."""

    appservice_id: str
    event_key: str
    handler: str
    sends: int = 0


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
    """The transaction ID for a send: derived inside a handler, random outside."""
    context = _current.get()
    if context is None:
        return uuid.uuid4().hex
    context.sends += 1
    parts = (
        context.appservice_id,
        context.event_key,
        context.handler,
        str(context.sends),
        user_id,
        room_id,
        event_type,
    )
    # NUL cannot occur in these strings' meaningful forms, so the join is unambiguous.
    digest = hashlib.sha256("\0".join(parts).encode()).hexdigest()
    return f"bk{digest[:40]}"

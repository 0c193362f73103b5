"""The records of the durable inbox, as the stores read and write them.

An accepted transaction becomes :class:`NewInboxItem` rows (one per event),
written in the same commit as its txnId. Workers read them back as
:class:`InboxItem`, in order per *lane* (a room, or a lane for events without
one). An item whose handlers keep failing, or that never was a valid event,
becomes a :class:`DeadLetter`.
"""

from __future__ import annotations

import enum

import attrs

from bridge_kit import defaults

__all__ = [
    "Acceptance",
    "DeadLetter",
    "InboxItem",
    "InboxStats",
    "ItemKind",
    "NewDeadLetter",
    "NewInboxItem",
    "ParkedItem",
    "Parking",
    "clipped_error",
    "storable",
]


class ItemKind(enum.Enum):
    """Which part of a transaction an item came from (and so which handlers get it)."""

    EVENT = "event"  # events: timeline and state events
    EPHEMERAL = "ephemeral"  # ephemeral: typing, receipts, presence
    # The device data MSC2409/MSC3202 add. The column is plain text: new kinds need
    # no migration (a bridge_kit older than these kinds cannot read them, though).
    TO_DEVICE = "to_device"  # to_device: one item per message
    DEVICE_LISTS = "device_lists"  # device_lists: one item per transaction
    OTK_COUNTS = "otk_counts"  # one-time-key counts: one item per (user, device)
    # Not from the homeserver: an event of the remote network a bridge accepted
    # (bridge_kit.bridge), in a lane per remote chat.
    REMOTE = "remote"


class Acceptance(enum.IntEnum):
    """What :meth:`~bridge_kit.store.InboxStore.accept_transaction` did; false only for
    a duplicate, so ``if await store.accept_transaction(...)`` means "stored"."""

    #: The txnId was seen before with the same body digest: nothing was stored.
    DUPLICATE = 0
    #: A txnId not seen before (or pruned since): stored.
    NEW = 1
    #: The txnId was seen before with another body (a homeserver that numbers its
    #: transactions from 1 again after a restart): stored as a new transaction.
    REUSED_ID = 2


@attrs.frozen
class NewInboxItem:
    """An event to append to the inbox: ``event_json`` is its JSON text, as received."""

    lane: str
    kind: ItemKind
    event_json: str


@attrs.frozen
class InboxItem:
    """An event in the inbox, waiting for (or between) attempts.

    ``id`` grows with arrival, so it orders a lane. ``attempts`` counts failed
    attempts so far; ``done_handlers`` names the handlers that already
    succeeded for it (they are not run again); ``not_before`` is the Unix time
    before which it must not be tried again (0: now).
    """

    id: int
    lane: str
    kind: ItemKind
    event_json: str
    received_at: float
    attempts: int = 0
    done_handlers: tuple[str, ...] = ()
    not_before: float = 0.0
    first_failed_at: float | None = None


@attrs.frozen
class NewDeadLetter:
    """An item set aside: its raw JSON, and why (with the traceback, for a handler)."""

    lane: str
    kind: ItemKind
    event_json: str
    error: str
    handler: str | None = None
    attempts: int = 0
    first_failed_at: float | None = None
    event_id: str | None = None
    event_type: str | None = None
    done_handlers: tuple[str, ...] = ()
    """The handlers that had succeeded for it: a replay does not run them again."""


@attrs.frozen
class DeadLetter:
    """A dead letter as stored; ``id`` is what replay and drop take.

    ``received_at`` is when its event first arrived (``None`` for letters stored
    before schema version 5); a replay keeps it, so retention knows how old the
    encryption state it needs may be.
    """

    id: int
    lane: str
    kind: ItemKind
    event_json: str
    error: str
    handler: str | None
    attempts: int
    first_failed_at: float
    last_failed_at: float
    event_id: str | None
    event_type: str | None
    done_handlers: tuple[str, ...] = ()
    received_at: float | None = None


@attrs.frozen
class Parking:
    """Why and until when an inbox item is parked (see :class:`~bridge_kit.inbox.signals.Park`).

    ``done_handlers`` and ``first_failed_at`` are the item's progress, kept for when
    it comes back into its lane; ``give_up_at`` is a Unix time."""

    key: str
    reason: str
    give_up_at: float
    first_failed_at: float
    done_handlers: tuple[str, ...] = ()


@attrs.frozen
class ParkedItem:
    """An item out of its lane, waiting for its parking's key. ``item.id`` is the id it
    had in the inbox; the parked items of a key come back into their lanes in its order."""

    item: InboxItem
    parking: Parking


@attrs.frozen
class InboxStats:
    """How full the inbox is: ``oldest_received_at`` is ``None`` when it is empty."""

    depth: int
    oldest_received_at: float | None
    dead_letters: int


def clipped_error(text: str, limit: int = defaults.DEAD_LETTER_ERROR_CHARS) -> str:
    """A dead letter's error as kept: at most about ``limit`` characters, its start
    and its end (where a traceback names the exception), with a note in between."""
    if len(text) <= limit:
        return text
    head, tail = limit // 4, limit - limit // 4
    cut = len(text) - head - tail
    return f"{text[:head]}\n[... {cut} characters left out ...]\n{text[-tail:]}"


def storable(text: str) -> str:
    """``text`` as every store can hold it: a lone surrogate (which UTF-8 cannot
    encode, as in a file name decoded with ``os.fsdecode``) becomes ``\\udXXX``."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text

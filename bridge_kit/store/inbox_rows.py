"""What the SQL stores share about inbox rows: the columns they select, in this
order, and how such a row becomes a record."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from bridge_kit.store.records import DeadLetter, InboxItem, ItemKind

ITEM_COLUMNS = (
    "id, lane, kind, event_json, received_at, attempts, done_handlers, not_before, first_failed_at"
)
LETTER_COLUMNS = (
    "id, lane, kind, event_json, error, handler, attempts,"
    " first_failed_at, last_failed_at, event_id, event_type"
)


def encode_handlers(names: Sequence[str]) -> str:
    """``done_handlers`` as stored: a JSON array (JSON escapes NUL, which PostgreSQL refuses)."""
    return json.dumps(list(names))


def item_from_row(row: Sequence[Any]) -> InboxItem:
    """An :class:`InboxItem` from a row of :data:`ITEM_COLUMNS`."""
    item_id, lane, kind, event_json, received_at, attempts, done, not_before, first = row
    return InboxItem(
        id=item_id,
        lane=lane,
        kind=ItemKind(kind),
        event_json=event_json,
        received_at=received_at,
        attempts=attempts,
        done_handlers=tuple(json.loads(done)),
        not_before=not_before,
        first_failed_at=first,
    )


def letter_from_row(row: Sequence[Any]) -> DeadLetter:
    """A :class:`DeadLetter` from a row of :data:`LETTER_COLUMNS`."""
    letter_id, lane, kind, event_json, error, handler, attempts, first, last, event_id, etype = row
    return DeadLetter(
        id=letter_id,
        lane=lane,
        kind=ItemKind(kind),
        event_json=event_json,
        error=error,
        handler=handler,
        attempts=attempts,
        first_failed_at=first,
        last_failed_at=last,
        event_id=event_id,
        event_type=etype,
    )

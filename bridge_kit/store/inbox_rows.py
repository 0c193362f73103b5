"""What the SQL stores share about inbox rows: the columns they select, in this
order, and how such a row becomes a record."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from bridge_kit.inbox.records import DeadLetter, InboxItem, ItemKind, ParkedItem, Parking

ITEM_COLUMNS = (
    "id, lane, kind, event_json, received_at, attempts, done_handlers, not_before, first_failed_at"
)
LETTER_COLUMNS = (
    "id, lane, kind, event_json, error, handler, attempts,"
    " first_failed_at, last_failed_at, event_id, event_type, done_handlers, received_at"
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
        done_handlers=() if done == "[]" else tuple(json.loads(done)),
        not_before=not_before,
        first_failed_at=first,
    )


def letter_from_row(row: Sequence[Any]) -> DeadLetter:
    """A :class:`DeadLetter` from a row of :data:`LETTER_COLUMNS`."""
    letter_id, lane, kind, event_json, error, handler, attempts, first, last = row[:9]
    event_id, event_type, done, received_at = row[9:]
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
        event_type=event_type,
        done_handlers=tuple(json.loads(done)),
        received_at=received_at,
    )


def parked_from_row(row: Sequence[Any]) -> ParkedItem:
    """A :class:`ParkedItem` from a row of the inbox's item columns, then
    ``park_key, reason, give_up_at`` (the same in both SQL stores)."""
    item = item_from_row(row[:9])
    key, reason, give_up_at = row[9:]
    first = item.first_failed_at if item.first_failed_at is not None else give_up_at
    return ParkedItem(item, Parking(key, reason, give_up_at, first, item.done_handlers))


def parked_filter(
    key: str | None, due_by: float | None, mark: Callable[[int], str]
) -> tuple[str, list[object]]:
    """The WHERE clause (empty for all) and its parameters that pick parked items under
    (the clean) ``key`` and/or due by ``due_by``; ``mark(n)`` writes the n-th parameter's mark."""
    clauses: list[str] = []
    parameters: list[object] = []
    if key is not None:
        parameters.append(key)
        clauses.append(f"park_key = {mark(len(parameters))}")
    if due_by is not None:
        parameters.append(due_by)
        clauses.append(f"give_up_at <= {mark(len(parameters))}")
    return (f"WHERE {' AND '.join(clauses)}" if clauses else ""), parameters

"""What the SQL stores share about inbox rows: the columns they select, in this
order, how such a row becomes a record, and the reads of parked items (through
:mod:`bridge_kit.store._sql`)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from bridge_kit.inbox.records import DeadLetter, InboxItem, ItemKind, ParkedItem, Parking
from bridge_kit.store._sql import Query

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


_PARKED_COLUMNS = (
    "id, lane, kind, event_json, received_at, attempts, done_handlers, 0, first_failed_at,"
    " park_key, reason, give_up_at"
)


async def parked_items(
    q: Query, key: str | None, due_by: float | None, limit: int
) -> list[ParkedItem]:
    """Up to ``limit`` parked items, oldest first, under ``key`` and/or due by ``due_by``."""
    # One statement per filter rather than "$2 IS NULL OR park_key = $2": a prepared
    # statement's generic plan would use no index for that.
    where, parameters = _parked_filter(key, due_by)
    rows = await q.rows(
        f"SELECT {_PARKED_COLUMNS} FROM bridge_kit_parked {where}"  # noqa: S608 (only "$n" marks)
        " ORDER BY id LIMIT $1",
        limit,
        *parameters,
    )
    return [parked_from_row(tuple(row)) for row in rows]


async def count_parked(q: Query) -> int:
    rows = await q.rows("SELECT COUNT(*) FROM bridge_kit_parked")
    return int(rows[0][0])


def _parked_filter(key: str | None, due_by: float | None) -> tuple[str, list[object]]:
    """The WHERE clause (empty for all) and its parameters, marked from ``$2`` on, that
    pick parked items under ``key`` and/or due by ``due_by``."""
    clauses: list[str] = []
    parameters: list[object] = []
    if key is not None:
        parameters.append(key)
        clauses.append(f"park_key = ${len(parameters) + 1}")
    if due_by is not None:
        parameters.append(due_by)
        clauses.append(f"give_up_at <= ${len(parameters) + 1}")
    return (f"WHERE {' AND '.join(clauses)}" if clauses else ""), parameters

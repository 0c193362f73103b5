"""What the SQL stores share about inbox rows: the columns they select, in this
order, and how such a row becomes a record."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from typing import Any, Final

from bridge_kit.inbox.records import DeadLetter, InboxItem, ItemKind, ParkedItem, Parking

ITEM_COLUMNS = (
    "id, lane, kind, event_json, received_at, attempts, done_handlers, not_before, first_failed_at"
)
LETTER_COLUMNS = (
    "id, lane, kind, event_json, error, handler, attempts,"
    " first_failed_at, last_failed_at, event_id, event_type, done_handlers, received_at"
)


#: What neither database takes in a text column: NUL (PostgreSQL) and lone surrogates,
#: which a str gets from a JSON escape such as "\ud800" and no UTF-8 encoder takes (both).
_UNSTORABLE: Final = re.compile("[\x00\ud800-\udfff]")


def clean_text(value: str) -> str:
    """``value`` with NUL and lone surrogates as U+FFFD, so any database stores it.

    Not one-to-one, which is harmless where it is used: two lanes that differ only
    there become one (still in order), owners and the dead letters' descriptive
    columns are compared with themselves or read by people. Cheap for the usual
    ASCII text.
    """
    if value.isascii() and "\x00" not in value:
        return value
    return _UNSTORABLE.sub("\ufffd", value)


def optional_text(value: str | None) -> str | None:
    """:func:`clean_text`, passing ``None`` through."""
    return None if value is None else clean_text(value)


def clean_json(value: str) -> str:
    """JSON text with NUL and lone surrogates written as ``\\uXXXX`` escapes.

    Lossless: in JSON text such characters can only stand inside a string, where
    the escape means the same character, so the event a handler gets is unchanged.
    """
    if value.isascii() and "\x00" not in value:
        return value
    return _UNSTORABLE.sub(lambda found: f"\\u{ord(found.group()):04x}", value)


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
    ``key`` and/or due by ``due_by``; ``mark(n)`` writes the n-th parameter's mark."""
    clauses: list[str] = []
    parameters: list[object] = []
    if key is not None:
        parameters.append(clean_text(key))
        clauses.append(f"park_key = {mark(len(parameters))}")
    if due_by is not None:
        parameters.append(due_by)
        clauses.append(f"give_up_at <= {mark(len(parameters))}")
    return (f"WHERE {' AND '.join(clauses)}" if clauses else ""), parameters

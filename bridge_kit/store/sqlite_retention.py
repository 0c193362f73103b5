"""Retention in SQLite: the schema version 5 statements of the retention work and
the statements that keep the store bounded (see :mod:`bridge_kit.store.retention`).

Each function takes the store's aiosqlite connection (or a plain one, for the
superseding done inside an acceptance's commit).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Awaitable, Callable, Sequence

import aiosqlite

from bridge_kit.inbox.records import ItemKind, NewInboxItem

# -- schema version 5: retention ------------------------------------------------
V5_RETENTION = (
    # A dead letter remembers which handlers had succeeded (a replay skips them) and
    # when its event arrived (a replay keeps that; retention reads it).
    "ALTER TABLE bridge_kit_dead_letters ADD COLUMN done_handlers TEXT NOT NULL DEFAULT '[]'",
    "ALTER TABLE bridge_kit_dead_letters ADD COLUMN received_at REAL",
    "CREATE INDEX bridge_kit_dead_letters_age ON bridge_kit_dead_letters (last_failed_at)",
    # When each crypto value was last written, to let replay records and sealed
    # payloads age out. Rows from before count as written at the migration.
    "ALTER TABLE bridge_kit_crypto_state ADD COLUMN written_at REAL NOT NULL DEFAULT 0",
    "UPDATE bridge_kit_crypto_state SET written_at = (julianday('now') - 2440587.5) * 86400.0",
    "CREATE INDEX bridge_kit_crypto_state_age ON bridge_kit_crypto_state (kind, written_at)",
)
# -- end of schema version 5: retention -----------------------------------------

_SUPERSEDE = "DELETE FROM bridge_kit_inbox WHERE kind = ? AND lane = ?"


def superseded_counts(items: Sequence[NewInboxItem]) -> list[tuple[str, str]]:
    """The parameters of :data:`_SUPERSEDE` for the key counts among ``items``: each
    device's lane, whose older counts the new one replaces."""
    kind = ItemKind.OTK_COUNTS
    return [(kind.value, item.lane) for item in items if item.kind is kind]


async def supersede(conn: aiosqlite.Connection, items: Sequence[NewInboxItem]) -> None:
    """Delete the waiting key counts that ``items`` hold newer ones of (the caller's
    transaction, before the items are added)."""
    if rows := superseded_counts(items):
        await conn.executemany(_SUPERSEDE, rows)


def supersede_now(conn: sqlite3.Connection, items: Sequence[NewInboxItem]) -> None:
    """:func:`supersede` on a plain connection, on the calling thread."""
    if rows := superseded_counts(items):
        conn.executemany(_SUPERSEDE, rows)


#: Rows one pruning statement deletes at most: the store's lock (and SQLite's write
#: lock) is held for one chunk, so acceptances and the inbox wait milliseconds, not
#: the seconds a million-row delete takes.
CHUNK = 2000


async def in_chunks(
    locked: Callable[[Callable[[aiosqlite.Connection], Awaitable[int]]], Awaitable[int]],
    step: Callable[[aiosqlite.Connection], Awaitable[int]],
) -> int:
    """Run ``step`` (which deletes at most :data:`CHUNK` rows) under ``locked`` until
    it deletes fewer; the total."""
    total = 0
    while True:
        deleted = await locked(step)
        total += deleted
        if deleted < CHUNK:
            return total


async def prune_dead_letters(conn: aiosqlite.Connection, keep: int, before: float) -> int:
    """Delete up to :data:`CHUNK` of the letters that last failed before ``before`` or
    are older than the newest ``keep``."""
    cursor = await conn.execute(
        "DELETE FROM bridge_kit_dead_letters WHERE id IN ("
        " SELECT id FROM bridge_kit_dead_letters WHERE last_failed_at < ? OR id <= ("
        "  SELECT id FROM bridge_kit_dead_letters ORDER BY id DESC LIMIT 1 OFFSET ?)"
        " LIMIT ?)",
        (before, keep, CHUNK),
    )
    return cursor.rowcount


async def prune_crypto(conn: aiosqlite.Connection, kind: str, before: float) -> int:
    """Delete up to :data:`CHUNK` values of ``kind`` (any owner) last written before ``before``."""
    cursor = await conn.execute(
        "DELETE FROM bridge_kit_crypto_state WHERE rowid IN ("
        " SELECT rowid FROM bridge_kit_crypto_state WHERE kind = ? AND written_at < ? LIMIT ?)",
        (kind, before, CHUNK),
    )
    return cursor.rowcount


async def to_device_since(conn: aiosqlite.Connection) -> float | None:
    """When the oldest to-device item still waiting (inbox or dead letter) arrived; a
    letter from before version 5 (no arrival time) counts as arriving at 0."""
    kind = ItemKind.TO_DEVICE.value
    rows = list(
        await conn.execute_fetchall(
            "SELECT MIN(t) FROM ("
            # Skipping the items marked handled (sqlite_inbox.NOT_DONE; not imported:
            # sqlite_inbox imports this module).
            " SELECT MIN(received_at) AS t FROM bridge_kit_inbox i WHERE kind = ?"
            " AND NOT EXISTS (SELECT 1 FROM bridge_kit_done d WHERE d.id = i.id)"
            " UNION ALL"
            " SELECT MIN(COALESCE(received_at, 0)) FROM bridge_kit_dead_letters WHERE kind = ?)",
            (kind, kind),
        )
    )
    found = rows[0][0]
    return None if found is None else float(found)

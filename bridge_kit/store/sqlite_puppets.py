"""SQL for the SQLite store's first tables: registered puppets and accepted transactions,
and the plain connection that records accepted transactions on the event loop."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Final

from bridge_kit.store.sqlite_files import connection_pragmas

#: Schema version 1.
V1: Final = (
    # WITHOUT ROWID: the table *is* the primary-key b-tree, so a lookup is one descent
    # and millions of puppets cost no more memory than the page cache.
    "CREATE TABLE bridge_kit_puppets (user_id TEXT PRIMARY KEY NOT NULL) WITHOUT ROWID",
    "CREATE TABLE bridge_kit_transactions ("
    " txn_id TEXT PRIMARY KEY NOT NULL,"
    " seq INTEGER NOT NULL,"
    " done_at REAL NOT NULL)",
    "CREATE UNIQUE INDEX bridge_kit_transactions_seq ON bridge_kit_transactions (seq)",
)


def select_puppets(count: int) -> str:
    """A query for which of `count` user IDs are registered puppets."""
    placeholders = ",".join("?" * count)
    # Only "?" placeholders are interpolated; the values travel as parameters.
    return f"SELECT user_id FROM bridge_kit_puppets WHERE user_id IN ({placeholders})"  # noqa: S608


SELECT_TRANSACTION: Final = "SELECT 1 FROM bridge_kit_transactions WHERE txn_id = ?"
INSERT_TRANSACTION: Final = (
    "INSERT OR IGNORE INTO bridge_kit_transactions (txn_id, seq, done_at)"
    " SELECT ?, COALESCE(MAX(seq), 0) + 1, ? FROM bridge_kit_transactions"
)


def connect_records(path: Path, sync: str = "normal") -> sqlite3.Connection:
    """The store's second connection, used on the event loop (see SQLiteStore._accept_now);
    ``sync`` is the ``synchronous`` pragma, as on the store's main connection."""
    # timeout=0: a busy database raises at once instead of blocking the event loop.
    records = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        for pragma in connection_pragmas(sync):
            records.execute(pragma)
        # Checkpoints write pages back and fsync: not on the event loop. The store
        # runs them on aiosqlite's thread instead (see _accept_now).
        records.execute("PRAGMA wal_autocheckpoint=0")
    except BaseException:
        records.close()
        raise
    return records

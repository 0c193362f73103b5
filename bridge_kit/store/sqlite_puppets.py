"""SQL for the SQLite store's first tables: registered puppets and accepted transactions,
and the plain connection that records accepted transactions on the event loop."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Final

import aiosqlite

from bridge_kit.inbox.records import Acceptance
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


def txn_key(txn_id: str) -> str | bytes:
    """How a txnId is stored: as text, or, when it holds a lone surrogate (which no
    UTF-8 encoder takes, as from a percent-decoded path), as its surrogatepass bytes.

    SQLite keeps such a BLOB as it is in the TEXT column, and no text equals a BLOB,
    so the key stays one-to-one for any str without a schema change (PostgreSQL keeps
    every txnId as bytes, see ``postgres._txn_key``).
    """
    try:
        txn_id.encode("utf-8")
    except UnicodeEncodeError:
        return txn_id.encode("utf-8", "surrogatepass")
    return txn_id


def select_puppets(count: int) -> str:
    """A query for which of `count` user IDs are registered puppets."""
    placeholders = ",".join("?" * count)
    # Only "?" placeholders are interpolated; the values travel as parameters.
    return f"SELECT user_id FROM bridge_kit_puppets WHERE user_id IN ({placeholders})"  # noqa: S608


# -- schema v5 (txn): dedup on txnId + body digest ---------------------------------
#: Schema version 5, the transaction part: each record keeps its body's digest, since a
#: homeserver may send another body under a txnId it used before (see
#: bridge_kit.inbox.transactions). A record without one (NULL) matches any body, so only the
#: newest record from before stays: the homeserver resends only the transaction it
#: sent last, and older ones would answer its reused txnIds as duplicates.
V5_TXN_DIGEST: Final = (
    "ALTER TABLE bridge_kit_transactions ADD COLUMN digest BLOB",
    "DELETE FROM bridge_kit_transactions"
    " WHERE seq < (SELECT MAX(seq) FROM bridge_kit_transactions)",
)
# -- end of schema v5 (txn) -------------------------------------------------------------

SELECT_TRANSACTION: Final = "SELECT 1 FROM bridge_kit_transactions WHERE txn_id = ?"
INSERT_TRANSACTION: Final = (
    "INSERT OR IGNORE INTO bridge_kit_transactions (txn_id, seq, done_at)"
    " SELECT ?, COALESCE(MAX(seq), 0) + 1, ? FROM bridge_kit_transactions"
)
SELECT_DIGEST: Final = "SELECT digest FROM bridge_kit_transactions WHERE txn_id = ?"
#: Inserts a new record, or makes a reused txnId's record the newest, with its new digest.
RECORD_TRANSACTION: Final = (
    "INSERT INTO bridge_kit_transactions (txn_id, seq, done_at, digest)"
    " SELECT ?, COALESCE(MAX(seq), 0) + 1, ?, ? FROM bridge_kit_transactions WHERE true"
    " ON CONFLICT (txn_id) DO UPDATE"
    " SET seq = excluded.seq, done_at = excluded.done_at, digest = excluded.digest"
)
PRUNE_TRANSACTIONS: Final = (
    "DELETE FROM bridge_kit_transactions WHERE seq <= ("
    " SELECT seq FROM bridge_kit_transactions ORDER BY seq DESC LIMIT 1 OFFSET ?)"
    " OR done_at < ?"
)


def acceptance_of(found: list[tuple[bytes | None]], digest: bytes) -> Acceptance:
    """What recording ``digest`` means, given the rows :data:`SELECT_DIGEST` found (a
    record without a digest matches any)."""
    if not found:
        return Acceptance.NEW
    recorded = found[0][0]
    return Acceptance.DUPLICATE if recorded in (None, digest) else Acceptance.REUSED_ID


def record_now(
    records: sqlite3.Connection, txn_id: str | bytes, digest: bytes, now: float
) -> Acceptance:
    """Record a transaction on the plain connection, inside the caller's write transaction."""
    acceptance = acceptance_of(records.execute(SELECT_DIGEST, (txn_id,)).fetchall(), digest)
    if acceptance:
        records.execute(RECORD_TRANSACTION, (txn_id, now, digest))
    return acceptance


async def record(
    conn: aiosqlite.Connection, txn_id: str | bytes, digest: bytes, now: float
) -> Acceptance:
    """:func:`record_now` on aiosqlite's connection."""
    found = await conn.execute_fetchall(SELECT_DIGEST, (txn_id,))
    acceptance = acceptance_of(list(found), digest)  # type: ignore[arg-type]
    if acceptance:
        await conn.execute(RECORD_TRANSACTION, (txn_id, now, digest))
    return acceptance


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

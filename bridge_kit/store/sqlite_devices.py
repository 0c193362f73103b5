"""Devices and crypto state in SQLite: the version 4 schema and the batch upsert of
crypto values, where the dialects differ; the other statements are shared, in
:mod:`bridge_kit.store._devices_sql`."""

from __future__ import annotations

from collections.abc import Mapping

import aiosqlite

V4 = (
    "CREATE TABLE bridge_kit_devices ("
    " user_id TEXT NOT NULL,"
    " device_id TEXT NOT NULL,"
    " display_name TEXT,"
    " PRIMARY KEY (user_id, device_id)) WITHOUT ROWID",
    # A rowid table: values (pickled sessions) can be kilobytes, and WITHOUT ROWID
    # suits only rows well under a page.
    "CREATE TABLE bridge_kit_crypto_state ("
    " owner TEXT NOT NULL,"
    " kind TEXT NOT NULL,"
    " key TEXT NOT NULL,"
    " value BLOB NOT NULL,"
    " PRIMARY KEY (owner, kind, key))",
)

_UPSERT_CRYPTO = (
    "INSERT INTO bridge_kit_crypto_state (owner, kind, key, value, written_at)"
    " VALUES (?, ?, ?, ?, ?) ON CONFLICT (owner, kind, key)"
    " DO UPDATE SET value = excluded.value, written_at = excluded.written_at"
)


async def crypto_put_many(
    conn: aiosqlite.Connection, owner: str, kind: str, items: Mapping[str, bytes], now: float
) -> None:
    """Upsert the values; ``now`` is when they count as written (see retention)."""
    await conn.executemany(
        _UPSERT_CRYPTO, [(owner, kind, key, value, now) for key, value in items.items()]
    )

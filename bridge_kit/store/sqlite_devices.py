"""Devices and crypto state in SQLite: the version 4 schema and the statements behind
:class:`~bridge_kit.store.sqlite.SQLiteStore`'s device and crypto methods.

Each function takes the store's aiosqlite connection; the store holds its lock
(and, for a batch, one transaction) around it.
"""

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


async def remember_device(
    conn: aiosqlite.Connection, user_id: str, device_id: str, display_name: str | None
) -> None:
    await conn.execute(
        "INSERT INTO bridge_kit_devices (user_id, device_id, display_name) VALUES (?, ?, ?)"
        # No name renames nothing, as on the homeserver (MSC4190's PUT).
        " ON CONFLICT (user_id, device_id) DO UPDATE"
        " SET display_name = COALESCE(excluded.display_name, bridge_kit_devices.display_name)",
        (user_id, device_id, display_name),
    )


async def forget_device(conn: aiosqlite.Connection, user_id: str, device_id: str) -> None:
    await conn.execute(
        "DELETE FROM bridge_kit_devices WHERE user_id = ? AND device_id = ?", (user_id, device_id)
    )


async def known_devices(conn: aiosqlite.Connection, user_id: str) -> dict[str, str | None]:
    rows = await conn.execute_fetchall(
        "SELECT device_id, display_name FROM bridge_kit_devices WHERE user_id = ?", (user_id,)
    )
    return {row[0]: row[1] for row in rows}


async def crypto_get(conn: aiosqlite.Connection, owner: str, kind: str, key: str) -> bytes | None:
    rows = list(
        await conn.execute_fetchall(
            "SELECT value FROM bridge_kit_crypto_state WHERE owner = ? AND kind = ? AND key = ?",
            (owner, kind, key),
        )
    )
    return bytes(rows[0][0]) if rows else None


async def crypto_put_many(
    conn: aiosqlite.Connection, owner: str, kind: str, items: Mapping[str, bytes], now: float
) -> None:
    """Upsert the values; ``now`` is when they count as written (see retention)."""
    await conn.executemany(
        _UPSERT_CRYPTO, [(owner, kind, key, value, now) for key, value in items.items()]
    )


async def crypto_items(conn: aiosqlite.Connection, owner: str, kind: str) -> dict[str, bytes]:
    rows = await conn.execute_fetchall(
        "SELECT key, value FROM bridge_kit_crypto_state WHERE owner = ? AND kind = ?",
        (owner, kind),
    )
    return {row[0]: bytes(row[1]) for row in rows}


async def crypto_delete(conn: aiosqlite.Connection, owner: str, kind: str, key: str) -> None:
    await conn.execute(
        "DELETE FROM bridge_kit_crypto_state WHERE owner = ? AND kind = ? AND key = ?",
        (owner, kind, key),
    )

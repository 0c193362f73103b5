"""Devices and crypto state in SQLite: the version 4 schema and the batch upsert of
crypto values, where the dialects differ; the other statements are shared, in
:mod:`bridge_kit.store._devices_sql`."""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping, Sequence
from typing import Any

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


_SELECT_CRYPTO = (
    "SELECT value FROM bridge_kit_crypto_state WHERE owner = ? AND kind = ? AND key = ?"
)


async def crypto_put_many(
    conn: aiosqlite.Connection, owner: str, kind: str, items: Mapping[str, bytes], now: float
) -> None:
    """Upsert the values; ``now`` is when they count as written (see retention)."""
    await conn.executemany(_UPSERT_CRYPTO, _crypto_rows(owner, kind, items, now))


def crypto_put_many_now(
    conn: sqlite3.Connection, owner: str, kind: str, items: Mapping[str, bytes], now: float
) -> bool:
    """:func:`crypto_put_many` on a plain connection, on the calling thread (True: a
    result the store's ``_on_loop`` tells from "busy")."""
    conn.executemany(_UPSERT_CRYPTO, _crypto_rows(owner, kind, items, now))
    return True


def crypto_value_now(
    conn: sqlite3.Connection, owner: str, kind: str, key: str
) -> Sequence[Sequence[Any]]:
    """The rows (none or one) of one crypto value, on a plain connection (fetchall: no
    read transaction left open; a list, which the store's ``_on_loop`` tells from "busy")."""
    rows: list[Sequence[Any]] = conn.execute(_SELECT_CRYPTO, (owner, kind, key)).fetchall()
    return rows


_INSERT_NEW_CRYPTO = (
    "INSERT INTO bridge_kit_crypto_state (owner, kind, key, value, written_at)"
    " VALUES (?, ?, ?, ?, ?) ON CONFLICT (owner, kind, key) DO NOTHING"
)


async def crypto_put_new(
    conn: aiosqlite.Connection, owner: str, kind: str, key: str, value: bytes, now: float
) -> bytes | None:
    """Insert the value unless the key has one (in the caller's transaction): ``None``
    if inserted, else the value there."""
    cursor = await conn.execute(_INSERT_NEW_CRYPTO, (owner, kind, key, value, now))
    if cursor.rowcount:
        return None
    rows = list(await conn.execute_fetchall(_SELECT_CRYPTO, (owner, kind, key)))
    return bytes(rows[0][0])


def crypto_put_new_now(
    conn: sqlite3.Connection, owner: str, kind: str, key: str, value: bytes, now: float
) -> list[bytes]:
    """:func:`crypto_put_new` on a plain connection, on the calling thread (in the
    caller's transaction): ``[]`` if inserted, else ``[the value there]`` (a list,
    which the store's ``_on_loop`` tells from "busy")."""
    if conn.execute(_INSERT_NEW_CRYPTO, (owner, kind, key, value, now)).rowcount:
        return []
    rows = conn.execute(_SELECT_CRYPTO, (owner, kind, key)).fetchall()
    return [bytes(rows[0][0])]


def _crypto_rows(
    owner: str, kind: str, items: Mapping[str, bytes], now: float
) -> list[tuple[str, str, str, bytes, float]]:
    return [(owner, kind, key, value, now) for key, value in items.items()]

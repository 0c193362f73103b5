"""Devices and crypto state in PostgreSQL: the version 4 schema and the batch upsert of
crypto values, where the dialects differ; the other statements are shared, in
:mod:`bridge_kit.store._devices_sql`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

V4 = (
    "CREATE TABLE bridge_kit_devices ("
    " user_id TEXT NOT NULL,"
    " device_id TEXT NOT NULL,"
    " display_name TEXT,"
    " PRIMARY KEY (user_id, device_id))",
    "CREATE TABLE bridge_kit_crypto_state ("
    " owner TEXT NOT NULL,"
    " kind TEXT NOT NULL,"
    " key TEXT NOT NULL,"
    " value BYTEA NOT NULL,"
    " PRIMARY KEY (owner, kind, key))",
)


async def crypto_put_many(
    pool: Any, owner: str, kind: str, items: Mapping[str, bytes], now: float
) -> None:
    """Upsert the values; ``now`` is when they count as written (see retention)."""
    # One statement, so one commit; the keys of a mapping are distinct, which
    # ON CONFLICT DO UPDATE needs (it cannot touch one row twice).
    await pool.execute(
        "INSERT INTO bridge_kit_crypto_state (owner, kind, key, value, written_at)"
        " SELECT $1, $2, k, v, $5 FROM unnest($3::text[], $4::bytea[]) AS batch (k, v)"
        " ON CONFLICT (owner, kind, key)"
        " DO UPDATE SET value = excluded.value, written_at = excluded.written_at",
        owner,
        kind,
        list(items.keys()),
        list(items.values()),
        now,
    )


async def crypto_put_new(
    pool: Any, owner: str, kind: str, key: str, value: bytes, now: float
) -> bytes | None:
    """Insert the value unless the key has one: ``None`` if inserted, else the value there."""
    while True:  # again only if the row that stopped the insert was deleted before the read
        inserted = await pool.fetchval(
            "INSERT INTO bridge_kit_crypto_state (owner, kind, key, value, written_at)"
            " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (owner, kind, key) DO NOTHING"
            " RETURNING 1",
            owner,
            kind,
            key,
            value,
            now,
        )
        if inserted is not None:
            return None
        found = await pool.fetchval(
            "SELECT value FROM bridge_kit_crypto_state WHERE owner = $1 AND kind = $2 AND key = $3",
            owner,
            kind,
            key,
        )
        if found is not None:
            return bytes(found)

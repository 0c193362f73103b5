"""Devices and crypto state in PostgreSQL: the version 4 schema and the statements behind
:class:`~bridge_kit.store.postgres.PostgresStore`'s device and crypto methods.

Each function takes the store's asyncpg pool; each is one statement, so one commit.
"""

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


async def remember_device(
    pool: Any, user_id: str, device_id: str, display_name: str | None
) -> None:
    await pool.execute(
        "INSERT INTO bridge_kit_devices (user_id, device_id, display_name) VALUES ($1, $2, $3)"
        # No name renames nothing, as on the homeserver (MSC4190's PUT).
        " ON CONFLICT (user_id, device_id) DO UPDATE"
        " SET display_name = COALESCE(excluded.display_name, bridge_kit_devices.display_name)",
        user_id,
        device_id,
        display_name,
    )


async def forget_device(pool: Any, user_id: str, device_id: str) -> None:
    await pool.execute(
        "DELETE FROM bridge_kit_devices WHERE user_id = $1 AND device_id = $2", user_id, device_id
    )


async def known_devices(pool: Any, user_id: str) -> dict[str, str | None]:
    rows = await pool.fetch(
        "SELECT device_id, display_name FROM bridge_kit_devices WHERE user_id = $1", user_id
    )
    return {row[0]: row[1] for row in rows}


async def crypto_get(pool: Any, owner: str, kind: str, key: str) -> bytes | None:
    value = await pool.fetchval(
        "SELECT value FROM bridge_kit_crypto_state WHERE owner = $1 AND kind = $2 AND key = $3",
        owner,
        kind,
        key,
    )
    return None if value is None else bytes(value)


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


async def crypto_items(pool: Any, owner: str, kind: str) -> dict[str, bytes]:
    rows = await pool.fetch(
        "SELECT key, value FROM bridge_kit_crypto_state WHERE owner = $1 AND kind = $2",
        owner,
        kind,
    )
    return {row[0]: bytes(row[1]) for row in rows}


async def crypto_delete(pool: Any, owner: str, kind: str, key: str) -> None:
    await pool.execute(
        "DELETE FROM bridge_kit_crypto_state WHERE owner = $1 AND kind = $2 AND key = $3",
        owner,
        kind,
        key,
    )

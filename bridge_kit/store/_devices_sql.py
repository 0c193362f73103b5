"""Devices and crypto state: the statements both SQL backends run, written once
(see :mod:`bridge_kit.store._sql`). Each backend keeps its version 4 schema and its
batch upsert of crypto values, where the dialects differ."""

from __future__ import annotations

from bridge_kit.store._sql import Query


async def remember_device(q: Query, user_id: str, device_id: str, display_name: str | None) -> None:
    await q.run(
        "INSERT INTO bridge_kit_devices (user_id, device_id, display_name) VALUES ($1, $2, $3)"
        # No name renames nothing, as on the homeserver (MSC4190's PUT).
        " ON CONFLICT (user_id, device_id) DO UPDATE"
        " SET display_name = COALESCE(excluded.display_name, bridge_kit_devices.display_name)",
        user_id,
        device_id,
        display_name,
    )


async def forget_device(q: Query, user_id: str, device_id: str) -> None:
    await q.run(
        "DELETE FROM bridge_kit_devices WHERE user_id = $1 AND device_id = $2", user_id, device_id
    )


async def known_devices(q: Query, user_id: str) -> dict[str, str | None]:
    rows = await q.rows(
        "SELECT device_id, display_name FROM bridge_kit_devices WHERE user_id = $1", user_id
    )
    return {row[0]: row[1] for row in rows}


async def crypto_get(q: Query, owner: str, kind: str, key: str) -> bytes | None:
    rows = await q.rows(
        "SELECT value FROM bridge_kit_crypto_state WHERE owner = $1 AND kind = $2 AND key = $3",
        owner,
        kind,
        key,
    )
    return bytes(rows[0][0]) if rows else None


async def crypto_items(q: Query, owner: str, kind: str) -> dict[str, bytes]:
    rows = await q.rows(
        "SELECT key, value FROM bridge_kit_crypto_state WHERE owner = $1 AND kind = $2",
        owner,
        kind,
    )
    return {row[0]: bytes(row[1]) for row in rows}


async def crypto_delete(q: Query, owner: str, kind: str, key: str) -> None:
    await q.run(
        "DELETE FROM bridge_kit_crypto_state WHERE owner = $1 AND kind = $2 AND key = $3",
        owner,
        kind,
        key,
    )


async def crypto_delete_many(q: Query, owner: str, kind: str, keys: list[str]) -> None:
    await q.many(
        "DELETE FROM bridge_kit_crypto_state WHERE owner = $1 AND kind = $2 AND key = $3",
        [(owner, kind, key) for key in keys],
    )

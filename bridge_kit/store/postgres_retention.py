"""Retention in PostgreSQL: the schema version 5 statements of the retention work
and the statements that keep the store bounded (see :mod:`bridge_kit.store.retention`).

Each function takes the store's asyncpg pool and runs one statement.
"""

from __future__ import annotations

from typing import Any

from bridge_kit.inbox.records import ItemKind

# -- schema version 5: retention ------------------------------------------------
V5_RETENTION = (
    # A dead letter remembers which handlers had succeeded (a replay skips them) and
    # when its event arrived (a replay keeps that; retention reads it).
    "ALTER TABLE bridge_kit_dead_letters ADD COLUMN done_handlers TEXT NOT NULL DEFAULT '[]'",
    "ALTER TABLE bridge_kit_dead_letters ADD COLUMN received_at DOUBLE PRECISION",
    "CREATE INDEX bridge_kit_dead_letters_age ON bridge_kit_dead_letters (last_failed_at)",
    # When each crypto value was last written, to let replay records and sealed
    # payloads age out. Rows from before count as written at the migration.
    "ALTER TABLE bridge_kit_crypto_state ADD COLUMN written_at DOUBLE PRECISION NOT NULL DEFAULT 0",
    "UPDATE bridge_kit_crypto_state SET written_at = extract(epoch FROM now())",
    "CREATE INDEX bridge_kit_crypto_state_age ON bridge_kit_crypto_state (kind, written_at)",
)
# -- end of schema version 5: retention -----------------------------------------


async def prune_dead_letters(pool: Any, keep: int, before: float) -> int:
    """Delete the letters that last failed before ``before`` and all but the newest ``keep``."""
    status: str = await pool.execute(
        "DELETE FROM bridge_kit_dead_letters WHERE last_failed_at < $1 OR id <= ("
        " SELECT id FROM bridge_kit_dead_letters ORDER BY id DESC LIMIT 1 OFFSET $2)",
        before,
        keep,
    )
    return int(status.rsplit(" ", 1)[-1])


async def prune_crypto(pool: Any, kind: str, before: float) -> int:
    """Delete every value of ``kind`` (any owner) last written before ``before``."""
    status: str = await pool.execute(
        "DELETE FROM bridge_kit_crypto_state WHERE kind = $1 AND written_at < $2", kind, before
    )
    return int(status.rsplit(" ", 1)[-1])


async def to_device_since(pool: Any) -> float | None:
    """When the oldest to-device item still waiting (inbox or dead letter) arrived; a
    letter from before version 5 (no arrival time) counts as arriving at 0."""
    found = await pool.fetchval(
        "SELECT LEAST("
        " (SELECT MIN(received_at) FROM bridge_kit_inbox WHERE kind = $1),"
        " (SELECT MIN(COALESCE(received_at, 0)) FROM bridge_kit_dead_letters WHERE kind = $1))",
        ItemKind.TO_DEVICE.value,
    )
    return None if found is None else float(found)

"""Parked inbox items in PostgreSQL: the version 5 table and the statements behind
:class:`~bridge_kit.store.postgres.PostgresStore`'s parked-item methods.

Each function is one statement, so one commit: a row is moved (``DELETE ...
RETURNING`` feeding an ``INSERT``) only by the statement that deleted it, and
of two processes that unpark or bury the same item, one moves it and the other
finds nothing.
"""

from __future__ import annotations

from typing import Any

from bridge_kit.inbox.records import NewDeadLetter, Parking
from bridge_kit.store.inbox_rows import (
    encode_handlers,
)
from bridge_kit.store.postgres_inbox import bury_parameters

# -- schema v5 (park): parked items ----------------------------------------------------
V5 = (
    "CREATE TABLE bridge_kit_parked ("
    " id BIGINT PRIMARY KEY,"  # the item's id in the inbox: it keeps their order
    ' lane TEXT COLLATE "C" NOT NULL,'
    " kind TEXT NOT NULL,"
    " event_json TEXT NOT NULL,"
    " received_at DOUBLE PRECISION NOT NULL,"
    " attempts INTEGER NOT NULL,"
    " done_handlers TEXT NOT NULL,"
    " first_failed_at DOUBLE PRECISION NOT NULL,"
    ' park_key TEXT COLLATE "C" NOT NULL,'
    " reason TEXT NOT NULL,"
    " give_up_at DOUBLE PRECISION NOT NULL)",
    "CREATE INDEX bridge_kit_parked_key ON bridge_kit_parked (park_key, id)",
    "CREATE INDEX bridge_kit_parked_due ON bridge_kit_parked (give_up_at)",
)
# -- end of schema v5 (park) -----------------------------------------------------------

_PARK = """
WITH gone AS (
    DELETE FROM bridge_kit_inbox WHERE id = $1
    RETURNING id, lane, kind, event_json, received_at, attempts
)
INSERT INTO bridge_kit_parked (id, lane, kind, event_json, received_at, attempts,
    done_handlers, first_failed_at, park_key, reason, give_up_at)
SELECT id, lane, kind, event_json, received_at, attempts, $2, $3, $4, $5, $6 FROM gone
"""

# Back to the end of their lanes, in their first order: new inbox ids, in id order.
_UNPARK = """
WITH gone AS (
    DELETE FROM bridge_kit_parked WHERE park_key = $1
    RETURNING id, lane, kind, event_json, received_at, attempts, done_handlers, first_failed_at
), back AS (
    INSERT INTO bridge_kit_inbox (lane, kind, event_json, received_at, attempts, done_handlers,
        first_failed_at)
    SELECT lane, kind, event_json, received_at, attempts, done_handlers, first_failed_at
    FROM gone ORDER BY id
    RETURNING 1
), lanes AS (
    -- Every lane with items has its row (DO UPDATE: the row lock, as in postgres_inbox).
    INSERT INTO bridge_kit_lanes (lane) SELECT DISTINCT lane FROM gone ORDER BY lane
    ON CONFLICT (lane) DO UPDATE SET lane = EXCLUDED.lane
)
SELECT count(*) FROM back
"""

_BURY = """
WITH gone AS (
    DELETE FROM bridge_kit_parked WHERE id = $1 RETURNING first_failed_at, received_at
)
INSERT INTO bridge_kit_dead_letters (lane, kind, event_json, error, handler, attempts,
    event_id, event_type, last_failed_at, first_failed_at, done_handlers, received_at)
SELECT $2, $3, $4, $5, $6, $7, $8, $9, $10, COALESCE($11::float8, gone.first_failed_at),
    $12, gone.received_at
FROM gone
"""


async def park(pool: Any, item_id: int, parking: Parking) -> bool:
    status: str = await pool.execute(
        _PARK,
        item_id,
        encode_handlers(parking.done_handlers),
        parking.first_failed_at,
        parking.key,
        parking.reason,
        parking.give_up_at,
    )
    return _count(status) > 0


async def unpark(pool: Any, key: str) -> int:
    return int(await pool.fetchval(_UNPARK, key))


async def bury(pool: Any, item_id: int, letter: NewDeadLetter, now: float) -> bool:
    status: str = await pool.execute(_BURY, *bury_parameters(item_id, letter, now))
    return _count(status) > 0


def _count(status: str) -> int:
    """The row count of a command tag such as ``INSERT 0 3``."""
    return int(status.rsplit(" ", 1)[-1])

"""The durable inbox in PostgreSQL: the version 2 and 5 schema and the statements
behind :class:`~bridge_kit.store.postgres.PostgresStore`'s inbox methods.

Each function takes the store's asyncpg pool and runs one statement, which
commits on its own: what must happen together is one statement (data-modifying
``WITH``), so no connection is held across round trips. The one exception is
:func:`release`, which must see what committed after it took a lane's lock.

Since version 5, ``bridge_kit_lanes`` holds a row for every lane with items (as in
SQLite, see :mod:`bridge_kit.store.sqlite_inbox`): its lease, and until when its
head waits; an index on the later of the two finds the ready lanes, so a claim
costs O(ready lanes). Whatever adds items upserts their lanes' rows *with a row
lock* (``DO UPDATE``, never ``DO NOTHING``): :func:`release` deletes an empty
lane's row only under that lock, so it never deletes the row of a lane whose new
items are being committed.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

from bridge_kit.inbox.records import (
    Acceptance,
    DeadLetter,
    InboxItem,
    InboxStats,
    ItemKind,
    NewDeadLetter,
    NewInboxItem,
)
from bridge_kit.store.inbox_rows import (
    ITEM_COLUMNS,
    LETTER_COLUMNS,
    encode_handlers,
    item_from_row,
    letter_from_row,
)

V2 = (
    # Bytes, not text: a txnId is whatever the homeserver put in the URL, NUL included,
    # and PostgreSQL text cannot hold NUL. Version 1 rows convert in place.
    "ALTER TABLE bridge_kit_transactions"
    " ALTER COLUMN txn_id TYPE BYTEA USING convert_to(txn_id, 'UTF8')",
    # Lanes collate as bytes: cheaper to compare, and the same order everywhere.
    "CREATE TABLE bridge_kit_inbox ("
    " id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
    ' lane TEXT COLLATE "C" NOT NULL,'
    " kind TEXT NOT NULL,"
    " event_json TEXT NOT NULL,"
    " received_at DOUBLE PRECISION NOT NULL,"
    " attempts INTEGER NOT NULL DEFAULT 0,"
    " done_handlers TEXT NOT NULL DEFAULT '[]',"
    " not_before DOUBLE PRECISION NOT NULL DEFAULT 0,"
    " first_failed_at DOUBLE PRECISION)",
    "CREATE INDEX bridge_kit_inbox_lane ON bridge_kit_inbox (lane, id)",
    "CREATE TABLE bridge_kit_dead_letters ("
    " id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
    " lane TEXT NOT NULL,"
    " kind TEXT NOT NULL,"
    " event_json TEXT NOT NULL,"
    " error TEXT NOT NULL,"
    " handler TEXT,"
    " attempts INTEGER NOT NULL,"
    " first_failed_at DOUBLE PRECISION NOT NULL,"
    " last_failed_at DOUBLE PRECISION NOT NULL,"
    " event_id TEXT,"
    " event_type TEXT)",
    # A row is a lease, or a lane about to be claimed (no owner yet): claims lock
    # these rows, and a row exists only while a lane is claimed or being claimed.
    "CREATE TABLE bridge_kit_lanes ("
    ' lane TEXT COLLATE "C" PRIMARY KEY,'
    " owner TEXT,"
    " lease_until DOUBLE PRECISION)",
)


# -- version 5 (the inbox branch): the lanes table becomes the lane queue ----------------
V5_LANES = (
    "ALTER TABLE bridge_kit_lanes ADD COLUMN not_before DOUBLE PRECISION NOT NULL DEFAULT 0",
    # Version 2's claim left rows with no owner and no lease for a moment.
    "UPDATE bridge_kit_lanes SET lease_until = 0 WHERE lease_until IS NULL",
    "ALTER TABLE bridge_kit_lanes ALTER COLUMN lease_until SET DEFAULT 0,"
    " ALTER COLUMN lease_until SET NOT NULL",
    "DELETE FROM bridge_kit_lanes k"
    " WHERE NOT EXISTS (SELECT FROM bridge_kit_inbox i WHERE i.lane = k.lane)",
    "INSERT INTO bridge_kit_lanes (lane) SELECT DISTINCT lane FROM bridge_kit_inbox"
    " ON CONFLICT DO NOTHING",
    "UPDATE bridge_kit_lanes k SET not_before = (SELECT i.not_before FROM bridge_kit_inbox i"
    " WHERE i.lane = k.lane ORDER BY i.id LIMIT 1)",
    # The claim's index: a lane is ready once the later of its lease and its wait passed.
    "CREATE INDEX bridge_kit_lanes_ready ON bridge_kit_lanes (GREATEST(lease_until, not_before))",
    "CREATE INDEX bridge_kit_lanes_owner ON bridge_kit_lanes (owner) WHERE owner IS NOT NULL",
)
# -- end of version 5 (the inbox branch) ----------------------------------------------

# One statement, so one commit: the txnId, the items and the letters, or, when the
# txnId is there already with the same digest or none (a concurrent duplicate waits for
# the first to commit, then finds it), nothing. A txnId there with another digest is
# reused: its record becomes the newest, with the new digest (xmax = 0 tells an insert
# from that update). Rows go in the order given, so their ids keep arrival order.
_ACCEPT = """
WITH txn AS (
    INSERT INTO bridge_kit_transactions AS t (txn_id, digest) VALUES ($1, $17)
    ON CONFLICT (txn_id) DO UPDATE SET digest = EXCLUDED.digest, done_at = now(), seq = DEFAULT
    WHERE t.digest <> EXCLUDED.digest
    RETURNING (t.xmax = 0) AS new
), items AS (
    INSERT INTO bridge_kit_inbox (lane, kind, event_json, received_at)
    SELECT lane, kind, event_json, $2
    FROM unnest($3::text[], $4::text[], $5::text[]) WITH ORDINALITY AS t(lane, kind, event_json, n)
    WHERE EXISTS (SELECT FROM txn)
    ORDER BY n
    RETURNING lane
), lanes AS (
    -- DO UPDATE, not DO NOTHING: the row lock keeps release from deleting it meanwhile.
    INSERT INTO bridge_kit_lanes (lane) SELECT DISTINCT lane FROM items ORDER BY lane
    ON CONFLICT (lane) DO UPDATE SET lane = EXCLUDED.lane
), superseded AS (
    -- A device's new key counts replace its older ones still waiting (schema v5 work).
    DELETE FROM bridge_kit_inbox
    WHERE kind = 'otk_counts' AND lane = ANY($16::text[]) AND EXISTS (SELECT FROM txn)
), letters AS (
    INSERT INTO bridge_kit_dead_letters (lane, kind, event_json, error, handler, attempts,
        event_id, event_type, first_failed_at, last_failed_at, done_handlers, received_at)
    SELECT lane, kind, event_json, error, handler, attempts, event_id, event_type,
        COALESCE(first_failed_at, $2), $2, done_handlers, $2
    FROM unnest($6::text[], $7::text[], $8::text[], $9::text[], $10::text[], $11::int[],
        $12::text[], $13::text[], $14::float8[], $15::text[]) WITH ORDINALITY
        AS t(lane, kind, event_json, error, handler, attempts, event_id, event_type,
            first_failed_at, done_handlers, n)
    WHERE EXISTS (SELECT FROM txn)
    ORDER BY n
)
SELECT (SELECT new FROM txn)
"""

# Lock the ready lanes (found by the index on the later of lease and wait, or this
# owner's own by the owner index), oldest head first, skipping those another claim
# has locked, and lease them. A row another claim leased since this statement's
# snapshot is re-read once locked, and then fails the test: no lane goes twice. A
# lane with no items (its process died before releasing it) comes first: its worker
# finds nothing and releases it, which removes its row.
TAKE_LEASES = """
WITH picked AS (
    SELECT k.lane, head.id FROM bridge_kit_lanes k
    LEFT JOIN LATERAL (
        SELECT i.id, i.not_before FROM bridge_kit_inbox i
        WHERE i.lane = k.lane ORDER BY i.id LIMIT 1
    ) head ON true
    WHERE (GREATEST(k.lease_until, k.not_before) <= $1
           OR (k.owner = $3 AND k.not_before <= $1))
      AND (head.id IS NULL OR head.not_before <= $1) AND k.lane <> ALL($2::text[])
    ORDER BY head.id NULLS FIRST LIMIT $4
    FOR UPDATE OF k SKIP LOCKED
)
UPDATE bridge_kit_lanes k SET owner = $3, lease_until = $5
FROM picked WHERE k.lane = picked.lane
RETURNING k.lane, picked.id
"""


async def accept(
    pool: Any,
    txn_key: bytes,
    items: Sequence[NewInboxItem],
    rejected: Sequence[NewDeadLetter],
    now: float,
    digest: bytes = b"",
) -> Acceptance:
    item_columns = (
        [item.lane for item in items],
        [item.kind.value for item in items],
        [item.event_json for item in items],
    )
    letter_columns = (
        [letter.lane for letter in rejected],
        [letter.kind.value for letter in rejected],
        [letter.event_json for letter in rejected],
        [letter.error for letter in rejected],
        [letter.handler for letter in rejected],
        [letter.attempts for letter in rejected],
        [letter.event_id for letter in rejected],
        [letter.event_type for letter in rejected],
        [letter.first_failed_at for letter in rejected],
        [encode_handlers(letter.done_handlers) for letter in rejected],
    )
    counted = [item.lane for item in items if item.kind is ItemKind.OTK_COUNTS]
    new = await pool.fetchval(
        _ACCEPT, txn_key, now, *item_columns, *letter_columns, counted, digest
    )
    if new is None:
        return Acceptance.DUPLICATE
    return Acceptance.NEW if new else Acceptance.REUSED_ID


async def claim(
    pool: Any, owner: str, until: float, limit: int, exclude: Collection[str], now: float
) -> list[str]:
    if limit == 0:
        return []
    excluded = list(exclude)
    rows = await pool.fetch(TAKE_LEASES, now, excluded, owner, limit, until)
    return [row["lane"] for row in sorted(rows, key=lambda row: (row["id"] is not None, row["id"]))]


async def renew(pool: Any, owner: str, lanes: Collection[str], until: float) -> set[str]:
    rows = await pool.fetch(
        # The rows locked in lane order, as an accept locks them (ORDER BY lane): in
        # any other order each could hold a row the other waits for, a deadlock.
        "UPDATE bridge_kit_lanes k SET lease_until = $3 FROM ("
        " SELECT lane FROM bridge_kit_lanes WHERE owner = $1 AND lane = ANY($2::text[])"
        " ORDER BY lane FOR UPDATE) mine"
        " WHERE k.lane = mine.lane RETURNING k.lane",
        owner,
        list(lanes),
        until,
    )
    return {row["lane"] for row in rows}


async def release(pool: Any, owner: str, lane: str) -> None:
    """Give up ``owner``'s lease on ``lane``, and remove the lane's row if it is empty.

    Three statements in one transaction: once the row is locked, an accept that
    upserted it has committed, and the next statement's snapshot sees its items;
    an accept that comes later waits for the lock, then adds the row again.
    """
    async with pool.acquire() as conn, conn.transaction():
        held = await conn.fetchval(
            "SELECT true FROM bridge_kit_lanes WHERE lane = $1 AND owner = $2 FOR UPDATE",
            lane,
            owner,
        )
        if not held:
            return
        await conn.execute(
            "DELETE FROM bridge_kit_lanes k WHERE k.lane = $1"
            " AND NOT EXISTS (SELECT FROM bridge_kit_inbox i WHERE i.lane = $1)",
            lane,
        )
        await conn.execute(
            "UPDATE bridge_kit_lanes SET owner = NULL, lease_until = 0 WHERE lane = $1", lane
        )


async def lane_items(pool: Any, lane: str, limit: int) -> list[InboxItem]:
    rows = await pool.fetch(
        f"SELECT {ITEM_COLUMNS} FROM bridge_kit_inbox"  # noqa: S608 (a constant)
        " WHERE lane = $1 ORDER BY id LIMIT $2",
        lane,
        limit,
    )
    return [item_from_row(row) for row in rows]


async def complete(pool: Any, item_id: int) -> None:
    await pool.execute("DELETE FROM bridge_kit_inbox WHERE id = $1", item_id)


async def complete_many(pool: Any, item_ids: Collection[int]) -> None:
    # One statement, so one commit: all of them or none.
    await pool.execute(
        "DELETE FROM bridge_kit_inbox WHERE id = ANY($1::bigint[])", sorted(set(item_ids))
    )


# The item waits, and its lane as long as its head does (the head as it is after
# this statement: a data-modifying WITH's changes are not visible to the outer one).
_FAIL = """
WITH failed AS (
    UPDATE bridge_kit_inbox SET attempts = attempts + $5, done_handlers = $2,
        not_before = $3, first_failed_at = COALESCE(first_failed_at, $4)
    WHERE id = $1 RETURNING id, lane, not_before
)
UPDATE bridge_kit_lanes k SET not_before = failed.not_before
FROM failed
WHERE k.lane = failed.lane AND NOT EXISTS (
    SELECT FROM bridge_kit_inbox i WHERE i.lane = failed.lane AND i.id < failed.id)
"""


async def fail(
    pool: Any,
    item_id: int,
    done_handlers: Sequence[str],
    not_before: float,
    now: float,
    count_attempt: bool = True,
) -> None:
    await pool.execute(
        _FAIL,
        item_id,
        encode_handlers(done_handlers),
        not_before,
        now,
        int(count_attempt),
    )


# The letter goes in only if the item was still there to delete: a worker whose
# lease ran out may bury an item that another worker completed or buried already.
_BURY = """
WITH gone AS (
    DELETE FROM bridge_kit_inbox WHERE id = $1 RETURNING first_failed_at, received_at
)
INSERT INTO bridge_kit_dead_letters (lane, kind, event_json, error, handler, attempts,
    event_id, event_type, last_failed_at, first_failed_at, done_handlers, received_at)
SELECT $2, $3, $4, $5, $6, $7, $8, $9, $10, COALESCE($11::float8, gone.first_failed_at, $10),
    $12, gone.received_at
FROM gone
"""


def bury_parameters(item_id: int, letter: NewDeadLetter, now: float) -> tuple[Any, ...]:
    """The parameters of a bury statement (this module's, or the parked items' one):
    ``$1`` the item, ``$2``-``$12`` the letter and the time it failed last."""
    return (
        item_id,
        letter.lane,
        letter.kind.value,
        letter.event_json,
        letter.error,
        letter.handler,
        letter.attempts,
        letter.event_id,
        letter.event_type,
        now,
        letter.first_failed_at,
        encode_handlers(letter.done_handlers),
    )


async def bury(pool: Any, item_id: int, letter: NewDeadLetter, now: float) -> None:
    await pool.execute(_BURY, *bury_parameters(item_id, letter, now))


async def dead_letters(pool: Any, limit: int | None) -> list[DeadLetter]:
    rows = await pool.fetch(
        f"SELECT {LETTER_COLUMNS} FROM bridge_kit_dead_letters"  # noqa: S608 (a constant)
        " ORDER BY id LIMIT $1",  # LIMIT NULL: all
        limit,
    )
    return [letter_from_row(row) for row in rows]


_PICK_LETTERS = "$1::bigint[] IS NULL OR id = ANY($1::bigint[])"


def _letter_ids(ids: Collection[int] | None) -> list[int] | None:
    return None if ids is None else sorted(set(ids))


async def replay(pool: Any, ids: Collection[int] | None, now: float, all_handlers: bool) -> int:
    """Move dead letters back into the inbox, with their done handlers unless ``all_handlers``."""
    status: str = await pool.execute(
        f"WITH gone AS (DELETE FROM bridge_kit_dead_letters WHERE {_PICK_LETTERS}"  # noqa: S608
        " RETURNING id, lane, kind, event_json, done_handlers, received_at),"
        # DO UPDATE: the row lock (see the module's docstring).
        " lanes AS (INSERT INTO bridge_kit_lanes (lane) SELECT DISTINCT lane FROM gone"
        " ORDER BY lane ON CONFLICT (lane) DO UPDATE SET lane = EXCLUDED.lane)"
        " INSERT INTO bridge_kit_inbox (lane, kind, event_json, received_at, done_handlers)"
        " SELECT lane, kind, event_json, COALESCE(received_at, $2),"
        " CASE WHEN $3 THEN '[]' ELSE done_handlers END FROM gone ORDER BY id",
        _letter_ids(ids),
        now,
        all_handlers,
    )
    return _count(status)


async def drop(pool: Any, ids: Collection[int] | None) -> int:
    status: str = await pool.execute(
        f"DELETE FROM bridge_kit_dead_letters WHERE {_PICK_LETTERS}",  # noqa: S608
        _letter_ids(ids),
    )
    return _count(status)


def _count(status: str) -> int:
    """The row count of a command tag such as ``INSERT 0 3`` or ``DELETE 3``."""
    return int(status.rsplit(" ", 1)[-1])


async def stats(pool: Any) -> InboxStats:
    row = await pool.fetchrow(
        "SELECT (SELECT COUNT(*) FROM bridge_kit_inbox),"
        " (SELECT MIN(received_at) FROM bridge_kit_inbox),"
        " (SELECT COUNT(*) FROM bridge_kit_dead_letters)"
    )
    depth, oldest, letters = row
    return InboxStats(depth=depth, oldest_received_at=oldest, dead_letters=letters)

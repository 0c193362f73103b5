"""What one lane claim costs while many lanes wait: it should grow with the ready lanes only.

A store gets ``--waiting`` lanes (one event each) that are not claimable: half
leased by another process, half with their head deferred for an hour (a retry
or a NotReady). Then 5 lanes become ready, and the inbox's claim
(``claim_lanes(owner, lease, 32)``, as the scheduler asks) is timed, each claim
released again. The baseline is the same claim on the same store kind with no
lane waiting, measured in the same run; the ratio shows how much the waiting
lanes cost (1.0: nothing).

    .venv/bin/python bench/bench_lane_claim.py [--waiting 10000,50000] [--claims 50]
        [--postgres postgresql://127.0.0.1:5432/test]

With ``--postgres DSN`` the PostgreSQL store is measured too, each size in a
scratch database created next to the one named (and dropped afterwards).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bridge_kit.inbox.records import ItemKind, NewInboxItem  # noqa: E402
from bridge_kit.store import PostgresStore, Store, open_store  # noqa: E402

CHUNK = 5_000
READY = 5
CONCURRENCY = 32


def item(lane: str) -> NewInboxItem:
    return NewInboxItem(lane, ItemKind.EVENT, json.dumps({"type": "m.room.message"}))


async def make_lanes_wait(store: Store, waiting: int) -> None:
    """``waiting`` lanes: the first half leased elsewhere, the second half deferred."""
    lanes = [f"!waiting{n}:bench" for n in range(waiting)]
    for start in range(0, waiting, CHUNK):
        await store.accept_transaction(f"w{start}", [item(lane) for lane in lanes[start:][:CHUNK]])
    leased = await store.claim_lanes("another-process", 3_600, waiting // 2)
    assert len(leased) == waiting // 2
    deferred = await store.claim_lanes("deferring", 3_600, waiting)
    later = time.time() + 3_600
    for lane in deferred:
        [head] = await store.lane_items(lane, 1)
        await store.fail_item(head.id, [], later, count_attempt=False)
        await store.release_lane("deferring", lane)


async def claim_ms(store: Store, claims: int) -> float:
    """The median time of one claim, with READY lanes ready."""
    await store.accept_transaction(
        f"ready-{uuid.uuid4().hex}", [item(f"!ready{n}:bench") for n in range(READY)]
    )
    times = []
    for _ in range(claims):
        started = time.perf_counter()
        got = await store.claim_lanes("me", 60, CONCURRENCY)
        times.append(time.perf_counter() - started)
        assert len(got) == READY, got
        for lane in got:
            await store.release_lane("me", lane)
    return statistics.median(times) * 1000


async def analyze(store: Store) -> None:
    """PostgreSQL: the statistics autovacuum would gather soon after such a change; without
    them the planner guesses a third of the lanes are ready and reads them all."""
    if isinstance(store, PostgresStore):
        import asyncpg

        conn = await asyncpg.connect(store.dsn)
        try:
            await conn.execute("ANALYZE")
        finally:
            await conn.close()


@asynccontextmanager
async def scratch_store(kind: str, postgres: str | None, tmp: Path) -> AsyncIterator[Store]:
    if kind == "sqlite":
        async with open_store(f"sqlite:///{tmp / uuid.uuid4().hex}.db") as store:
            yield store
        return
    import asyncpg  # type: ignore[import-untyped]

    assert postgres is not None
    name = f"bench_claim_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(postgres)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        try:
            async with open_store(postgres.rsplit("/", 1)[0] + f"/{name}") as store:
                yield store
        finally:
            await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def main(args: argparse.Namespace) -> None:
    kinds = ["sqlite"] + (["postgresql"] if args.postgres else [])
    sizes = [int(size) for size in args.waiting.split(",")]
    print(f"claim_lanes(limit={CONCURRENCY}) with {READY} ready lanes; median of {args.claims}")
    with tempfile.TemporaryDirectory(prefix="bk-claim-") as tmp:
        for kind in kinds:
            async with scratch_store(kind, args.postgres, Path(tmp)) as store:
                baseline = await claim_ms(store, args.claims)
            print(f"  {kind:>10}: {'no lane waiting':>22}: {baseline:7.3f} ms (the baseline)")
            for size in sizes:
                async with scratch_store(kind, args.postgres, Path(tmp)) as store:
                    await make_lanes_wait(store, size)
                    await analyze(store)
                    took = await claim_ms(store, args.claims)
                print(
                    f"  {kind:>10}: {f'{size:,} lanes waiting':>22}: {took:7.3f} ms, "
                    f"{took / baseline:.2f}x the baseline"
                )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--waiting", default="10000,50000", help="comma-separated lane counts")
    parser.add_argument("--claims", type=int, default=50, help="claims timed per size")
    parser.add_argument("--postgres", metavar="DSN", help="also measure PostgreSQL")
    return parser.parse_args()


if __name__ == "__main__":
    asyncio.run(main(parse_args()))

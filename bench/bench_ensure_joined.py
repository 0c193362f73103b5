"""``ensure_joined`` over 10,000 (puppet, room) pairs the store knows as joined.

No homeserver: the client points at a closed port, so any request would fail, and
its ``request_count`` must stay 0. The figure is set against a baseline of the
same number of bare ``store.membership`` lookups (the ratio is the overhead of the
Intent and RoomStateStore layers). Target: under 1 s, 0 requests.

    .venv/bin/python bench/bench_ensure_joined.py [--pairs 10000] [--store sqlite|memory]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bridge_kit.client.homeserver import HomeserverClient  # noqa: E402
from bridge_kit.intent import Intent  # noqa: E402
from bridge_kit.intent.state_store import RoomStateStore  # noqa: E402
from bridge_kit.store import MemoryStore, SQLiteStore, Store  # noqa: E402
from bridge_kit.types.events import Event  # noqa: E402

ROOMS = 100


def pairs(count: int) -> list[tuple[str, str]]:
    """``count`` (puppet, room) pairs: puppets spread over :data:`ROOMS` rooms."""
    return [(f"@_bk_p{n}:bench.local", f"!r{n % ROOMS}:bench.local") for n in range(count)]


async def fill(store: Store, joined: list[tuple[str, str]]) -> None:
    by_room: dict[str, list[Event]] = {}
    for user_id, room_id in joined:
        event = Event(
            "m.room.member", {"membership": "join"}, room_id=room_id, state_key=user_id,
            origin_server_ts=1,
        )  # fmt: skip
        by_room.setdefault(room_id, []).append(event)
    for room_id, events in by_room.items():
        await store.apply_state(room_id, events)


async def run(count: int, store: Store) -> None:
    joined = pairs(count)
    async with store, HomeserverClient("http://127.0.0.1:9", "unused") as client:
        await fill(store, joined)
        state = RoomStateStore(store, lambda: Intent(client, "@bot:bench.local", None, state))
        intents = [Intent(client, user_id, None, state) for user_id, _ in joined]

        started = time.perf_counter()
        for user_id, room_id in joined:
            await store.membership(room_id, user_id)
        baseline = time.perf_counter() - started

        started = time.perf_counter()
        for intent, (_, room_id) in zip(intents, joined, strict=True):
            await intent.ensure_joined(room_id)
        took = time.perf_counter() - started

        print(f"store:            {store!r}")
        print(f"pairs:            {count}")
        print(f"ensure_joined:    {took:.3f} s ({took / count * 1e6:.1f} us each)")
        print(f"bare lookups:     {baseline:.3f} s ({baseline / count * 1e6:.1f} us each)")
        print(f"ratio:            {took / baseline:.2f}")
        print(f"requests:         {client.request_count}")
        if client.request_count:
            raise SystemExit("FAIL: ensure_joined sent requests")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=10_000)
    parser.add_argument("--store", choices=["sqlite", "memory"], default="sqlite")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store: Store = (
            SQLiteStore(Path(tmp) / "bench.db") if args.store == "sqlite" else MemoryStore()
        )
        asyncio.run(run(args.pairs, store))


if __name__ == "__main__":
    main()

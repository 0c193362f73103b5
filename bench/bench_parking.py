"""How long one sender's keyless events hold up the rest of their room.

A room gets ``--bogus`` events whose "room key" never comes, then ``--plain``
ordinary events. Measured: the time from the start until the handler has seen
every plain event, and what each keyless event costs the room.

- ``deferred`` (the baseline, bridge_kit before parking): the preprocessor raises
  ``NotReady(give_up_after=key_wait)``; each keyless event holds the lane until it
  becomes a dead letter, so the room waits about ``bogus * key_wait``;
- ``parked``: it raises ``Park(key, give_up_after=key_wait)``; the keyless events
  leave the lane and the plain ones are handled at once.

Both run in the same process on a fresh SQLite store each, with the same inbox
settings; the ratio printed is deferred / parked.

    .venv/bin/python bench/bench_parking.py [--bogus 3] [--plain 100] [--key-wait 2]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bridge_kit.inbox.lanes import Inbox, InboxSettings  # noqa: E402
from bridge_kit.inbox.records import InboxItem, ItemKind  # noqa: E402
from bridge_kit.inbox.signals import NotReady, Park  # noqa: E402
from bridge_kit.inbox.transactions import split_transaction  # noqa: E402
from bridge_kit.store import Store, open_store  # noqa: E402
from bridge_kit.types import Event  # noqa: E402

ROOM = "!bench:bench.local"
SETTINGS = InboxSettings(poll=0.1)


def _event(n: int, bogus: bool) -> dict[str, Any]:
    return {
        "type": "m.room.message",
        "event_id": f"$e{n}",
        "room_id": ROOM,
        "sender": "@mallory:bench.local" if bogus else "@alice:bench.local",
        "origin_server_ts": 1_700_000_000_000 + n,
        "content": {"msgtype": "m.text", "body": str(n), "bogus": bogus},
    }


async def _run(mode: str, store: Store, bogus: int, plain: int, key_wait: float) -> float:
    seen: set[str] = set()
    all_seen = asyncio.Event()

    async def keyless(event: Event, record: InboxItem) -> Event:
        if not event.content.get("bogus"):
            return event
        if mode == "parked":
            raise Park(f"key:{event.event_id}", give_up_after=key_wait, reason="no room key")
        raise NotReady("no room key", retry_after=min(1.0, key_wait), give_up_after=key_wait)

    async def handler(event: Event) -> None:
        seen.add(event.content["body"])
        if len(seen) == plain:
            all_seen.set()

    inbox = Inbox(store, lambda kind, event_type: (handler,), appservice_id="bench",
                  settings=SETTINGS)  # fmt: skip
    inbox.add_preprocessor(ItemKind.EVENT, keyless)
    events = [_event(n, n < bogus) for n in range(bogus + plain)]
    items, _ = split_transaction({"events": events})
    await store.accept_transaction(f"{mode}-1", items)
    started = time.perf_counter()
    await inbox.start()
    try:
        await asyncio.wait_for(all_seen.wait(), timeout=bogus * key_wait * 3 + 60)
        return time.perf_counter() - started
    finally:
        await inbox.stop(grace=0)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bogus", type=int, default=3)
    parser.add_argument("--plain", type=int, default=100)
    parser.add_argument("--key-wait", type=float, default=2.0)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("deferred", "parked"):
            async with open_store(f"sqlite:///{Path(tmp) / mode}.db") as store:
                results[mode] = await _run(mode, store, args.bogus, args.plain, args.key_wait)
    print(f"{args.bogus} keyless events, then {args.plain} plain ones; key_wait {args.key_wait} s")
    for mode, seconds in results.items():
        print(f"  {mode:9} the plain events were all handled after {seconds * 1000:9.1f} ms")
    ratio = results["deferred"] / results["parked"]
    print(f"  parked is {ratio:.0f}x sooner (deferred / parked)")


if __name__ == "__main__":
    asyncio.run(main())

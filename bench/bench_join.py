"""Joins/s through ``join_many`` vs a bare aiohttp loop, against one real Synapse (SQLite).

One run starts its own Synapse (on SQLite, ``bench.local``), has a real user create
``--rooms`` public rooms, and measures:

1. join throughput, alternating for a few rounds, each with fresh puppets (registered
   beforehand for both, so that only joins are measured), spread over the rooms:
   - ``plain``: a bare aiohttp loop, ``concurrency`` workers posting
     ``/join/{roomId}?user_id=…`` with the as_token;
   - ``bridge_kit``: ``PuppetRegistrar.join_many`` with the SQLite store (which records
     every join), same concurrency;
   and the ratio bridge_kit / plain (medians of the per-round ratios; target >= 0.9);
2. a re-run over 100,000 (puppet, room) pairs the store knows as joined (rows written
   straight into the store's member table): its time (target < 2 s) and its HTTP
   requests, counted by a client observer (must be 0);
3. peak memory (``ru_maxrss`` of a fresh subprocess) of ``join_many`` over 1,000,000
   pairs streamed from a generator, all known joined to the SQLite store (the whole
   path: streaming, dedup, validation, batched store lookups; no request is due, so
   Synapse is not the bottleneck; target < 200 MB).

    .venv/bin/python bench/bench_join.py [--rounds 6] [--joins 1000] [--rooms 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bridge_kit.client.homeserver import ClientObserver, HomeserverClient, quote_segment  # noqa: E402
from bridge_kit.puppets import PuppetRegistrar  # noqa: E402
from bridge_kit.registration import Registration, generate_registration  # noqa: E402
from bridge_kit.store import SQLiteStore  # noqa: E402
from bridge_kit.testing.synapse import SynapseServer  # noqa: E402

SERVER = "bench.local"
PREFIX = "_bench_"
KNOWN = 100_000
MILLION = 1_000_000
KNOWN_ROOMS = 100


class Counting(ClientObserver):
    """Counts every attempt that got an HTTP reply, and every retry."""

    def __init__(self) -> None:
        self.count = 0

    def on_response(
        self, method: str, endpoint: str, status: int, errcode: str | None, seconds: float
    ) -> None:
        self.count += 1

    def on_retry(self, reason: str, delay: float) -> None:
        self.count += 1


def spread(tag: str, count: int, rooms: list[str]) -> list[tuple[str, str]]:
    return [(f"{PREFIX}{tag}_{i:06d}", rooms[i % len(rooms)]) for i in range(count)]


# -- 1. throughput ----------------------------------------------------------------------


async def plain_loop(url: str, as_token: str, pairs: list[tuple[str, str]], n: int) -> float:
    """What a bridge without bridge_kit would do: N workers posting /join."""
    pending = iter(pairs)
    headers = {"Authorization": f"Bearer {as_token}"}

    async def worker(session: aiohttp.ClientSession) -> None:
        for localpart, room in pending:
            path = f"{url}/_matrix/client/v3/join/{quote_segment(room)}"
            params = {"user_id": f"@{localpart}:{SERVER}"}
            async with session.post(path, json={}, params=params, headers=headers) as response:
                await response.read()
                if response.status != 200:
                    raise RuntimeError(f"plain loop: {response.status} for {localpart}")

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=n)) as session:
        started = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(n)))
        return len(pairs) / (time.perf_counter() - started)


async def bridge_kit_run(
    url: str, registration: Registration, pairs: list[tuple[str, str]], n: int, db: Path
) -> float:
    async with HomeserverClient(url, registration.as_token) as client, SQLiteStore(db) as store:
        await store.mark_registered({f"@{lp}:{SERVER}" for lp, _ in pairs})
        registrar = PuppetRegistrar(client, store, registration, SERVER)
        started = time.perf_counter()
        result = await registrar.join_many(pairs, concurrency=n)
        elapsed = time.perf_counter() - started
        if result.joined != len(pairs):
            raise RuntimeError(f"bridge_kit run: {result.summary()}")
        return len(pairs) / elapsed


async def register_all(
    url: str, registration: Registration, localparts: list[str], db: Path
) -> None:
    async with HomeserverClient(url, registration.as_token) as client, SQLiteStore(db) as store:
        registrar = PuppetRegistrar(client, store, registration, SERVER)
        result = await registrar.register_many(localparts, concurrency=16)
        if result.failed or result.invalid:
            raise RuntimeError(f"registering: {result.summary()}")


async def throughput(
    hs: SynapseServer, registration: Registration, rooms: list[str], args: argparse.Namespace,
    work: Path,
) -> dict[str, Any]:  # fmt: skip
    rates: dict[str, list[float]] = {"plain": [], "bridge_kit": []}
    rounds = {
        (r, kind): spread(f"{kind[0]}{r}", args.joins, rooms)
        for r in range(args.rounds)
        for kind in rates
    }
    warm = spread("warm", 200, rooms)
    every = [lp for pairs in [warm, *rounds.values()] for lp, _ in pairs]
    print(f"   registering {len(every):,} puppets first ...", flush=True)
    await register_all(hs.url, registration, every, work / "registered.db")
    await plain_loop(hs.url, registration.as_token, warm, args.concurrency)
    for r in range(args.rounds):
        order = ("plain", "bridge_kit") if r % 2 == 0 else ("bridge_kit", "plain")
        for kind in order:
            pairs = rounds[r, kind]
            if kind == "plain":
                rate = await plain_loop(hs.url, registration.as_token, pairs, args.concurrency)
            else:
                db = work / f"throughput-{r}.db"
                rate = await bridge_kit_run(hs.url, registration, pairs, args.concurrency, db)
            rates[kind].append(rate)
            print(f"  round {r + 1}: {kind:<10} {rate:7.0f} joins/s", flush=True)
    ratios = [ours / plain for ours, plain in zip(rates["bridge_kit"], rates["plain"], strict=True)]
    return {
        "plain_per_s": statistics.median(rates["plain"]),
        "bridge_kit_per_s": statistics.median(rates["bridge_kit"]),
        "ratio": statistics.median(ratios),
        "round_ratios": ratios,
    }


# -- 2. and 3.: known pairs ------------------------------------------------------------


def known_pairs(count: int) -> Iterator[tuple[str, str]]:
    """``count`` pairs over KNOWN_ROOMS rooms (made-up room IDs: nothing is sent for them)."""
    return ((f"{PREFIX}k_{i:07d}", f"!known{i % KNOWN_ROOMS}:{SERVER}") for i in range(count))


async def populate(db: Path, count: int) -> None:
    """Record ``count`` pairs as joined, straight into the store's member table."""
    async with SQLiteStore(db):
        pass  # creates the schema
    with sqlite3.connect(db) as conn:
        conn.executemany(
            "INSERT INTO bridge_kit_members (room_id, user_id, membership, origin_ts)"
            " VALUES (?, ?, 'join', 1)",
            ((room, f"@{lp}:{SERVER}") for lp, room in known_pairs(count)),
        )


async def known_rerun(url: str, registration: Registration, db: Path) -> dict[str, Any]:
    counting = Counting()
    async with HomeserverClient(url, registration.as_token) as client, SQLiteStore(db) as store:
        client.observers.append(counting)
        registrar = PuppetRegistrar(client, store, registration, SERVER)
        started = time.perf_counter()
        result = await registrar.join_many(known_pairs(KNOWN), concurrency=16)
        elapsed = time.perf_counter() - started
    if result.skipped_known != KNOWN or counting.count:
        raise RuntimeError(f"re-run: {result.summary()}, {counting.count} requests")
    return {"pairs": KNOWN, "seconds": elapsed, "requests": counting.count}


def memory_child(url: str, registration_path: str, db: str) -> None:
    """Runs in a fresh interpreter; prints JSON with its peak RSS."""

    async def main() -> dict[str, Any]:
        registration = Registration.load(registration_path)
        baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        counting = Counting()
        async with (
            HomeserverClient(url, registration.as_token) as client,
            SQLiteStore(db) as store,
        ):
            client.observers.append(counting)
            registrar = PuppetRegistrar(client, store, registration, SERVER)
            started = time.perf_counter()
            result = await registrar.join_many(known_pairs(MILLION), concurrency=16)
            elapsed = time.perf_counter() - started
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return {
            "seconds": elapsed,
            "baseline_mb": baseline / 1024,
            "peak_mb": peak / 1024,
            "requests": counting.count,
            "skipped_known": result.skipped_known,
        }

    print(json.dumps(asyncio.run(main())))


def measure_memory(url: str, registration_path: Path, db: Path) -> dict[str, Any]:
    command = [sys.executable, __file__, "--memory-child", url, str(registration_path), str(db)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    figures: dict[str, Any] = json.loads(output.strip().splitlines()[-1])
    return figures


# -- driver ----------------------------------------------------------------------------------


async def make_rooms(hs: SynapseServer, count: int) -> list[str]:
    token = await hs.create_user("bench_owner")
    async with HomeserverClient(hs.url, token) as owner:
        body = {"preset": "public_chat"}
        return [
            (await owner.request("POST", "/_matrix/client/v3/createRoom", body=body))["room_id"]
            for _ in range(count)
        ]


async def measure_throughput(
    hs: SynapseServer, registration: Registration, args: argparse.Namespace, work: Path
) -> dict[str, Any]:
    rooms = await make_rooms(hs, args.rooms)
    print(
        f"1. throughput, concurrency {args.concurrency}, {args.joins} joins per run "
        f"over {args.rooms} rooms",
        flush=True,
    )
    t = await throughput(hs, registration, rooms, args, work)
    print(
        f"   medians: plain aiohttp {t['plain_per_s']:.0f}/s, join_many "
        f"{t['bridge_kit_per_s']:.0f}/s; median ratio per round {t['ratio']:.3f} "
        "(target >= 0.9)"
    )
    return t


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-join-") as tmp:
        work = Path(tmp)
        registration = generate_registration("bench", None, SERVER, PREFIX)
        registration_path = work / "registration.yaml"
        registration.write(registration_path)
        print(f"starting Synapse in {work} ...", flush=True)
        async with SynapseServer(
            work / "synapse", registrations=[registration_path], server_name=SERVER
        ) as hs:
            figures: dict[str, Any] = {"concurrency": args.concurrency}
            if not args.no_throughput:
                figures["throughput"] = await measure_throughput(hs, registration, args, work)
            print(f"2. re-run over {KNOWN:,} pairs known joined to the store", flush=True)
            known_db = work / "known.db"
            await populate(known_db, KNOWN)
            figures["known_rerun"] = k = await known_rerun(hs.url, registration, known_db)
            print(f"   {k['seconds']:.2f} s, {k['requests']} HTTP requests (target < 2 s, 0)")
            print(f"3. peak memory of join_many over {MILLION:,} known pairs", flush=True)
            million_db = work / "million.db"
            await populate(million_db, MILLION)
            figures["memory"] = m = measure_memory(hs.url, registration_path, million_db)
            print(
                f"   peak RSS {m['peak_mb']:.0f} MB (interpreter and imports "
                f"{m['baseline_mb']:.0f} MB), {m['seconds']:.1f} s, {m['requests']} requests "
                "(target < 200 MB)"
            )
        return figures


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--memory-child":
        memory_child(*sys.argv[2:5])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--joins", type=int, default=1000, help="per method and round")
    parser.add_argument("--rooms", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument(
        "--no-throughput", action="store_true", help="only the re-run and the memory figures"
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    figures = asyncio.run(bench(args))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()

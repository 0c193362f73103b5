"""The production path, measured: Synapse on PostgreSQL, bridge_kit's PostgreSQL store.

One run creates two scratch databases on the local PostgreSQL (one for Synapse,
with the collation Synapse requires, one for the bridge's store), starts its own
Synapse on the first, and drops both at the end. It measures, each against a
bare aiohttp loop sending the same requests in the same run:

1. registration: ``--puppets`` (20,000) puppets per side, in ``--rounds``
   alternating rounds of fresh localparts: ``PuppetRegistrar.register_many``
   with the PostgreSQL store vs the bare loop posting ``/register``; the median
   of the per-round ratios (target >= 0.95);
2. joins: ``--joins`` (20,000) joins per side spread over ``--rooms`` (200)
   public rooms, each side joining the puppets it registered:
   ``app.puppets.join_many`` (``PuppetRegistrar.join_many``) vs the bare loop
   posting ``/join?user_id=`` (target >= 0.9), then ``join_many`` again over the
   same pairs (it must send nothing);
3. a re-run of ``register_many`` over 100,000 puppets the PostgreSQL store knows:
   its time (target < 2 s) and its HTTP requests (must be 0);
4. peak RSS (a fresh subprocess) of ``register_many`` over 1,000,000 localparts
   all known to the PostgreSQL store (target < 200 MB).

Synapse needs psycopg2 for PostgreSQL: ``pip install 'matrix-synapse[postgres]'``
(and bridge_kit's ``postgres`` extra for asyncpg). Synapse's rate limits are
raised (see bridge_kit.testing.synapse), so the bench measures the work, not the limiter.

    .venv/bin/python bench/bench_production_pg.py [--puppets 20000] [--joins 20000]
        [--rooms 200] [--rounds 4] [--concurrency 16] [--skip-memory] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_register import localparts, plain_loop  # noqa: E402

from bridge_kit.client.homeserver import HomeserverClient  # noqa: E402
from bridge_kit.puppets import JoinResult, PuppetRegistrar  # noqa: E402
from bridge_kit.registration import Registration, generate_registration  # noqa: E402
from bridge_kit.store import open_store  # noqa: E402
from bridge_kit.testing.synapse import SynapseServer  # noqa: E402

SERVER = "bench.local"
PREFIX = "_bench_"
KNOWN = 100_000
MILLION = 1_000_000
ADMIN_DSN = os.environ.get("BRIDGE_KIT_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
JOIN = "/_matrix/client/v3/join/"


@asynccontextmanager
async def scratch_database(prefix: str, *, for_synapse: bool) -> AsyncIterator[str]:
    """A new database on the local PostgreSQL, dropped on exit; its DSN."""
    import asyncpg

    admin = await asyncpg.connect(ADMIN_DSN, timeout=10)
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    # Synapse refuses a database whose collation is not C (its sort orders depend on it).
    options = " ENCODING 'UTF8' LC_COLLATE='C' LC_CTYPE='C' TEMPLATE template0"
    await admin.execute(f'CREATE DATABASE "{name}"' + (options if for_synapse else ""))
    try:
        yield ADMIN_DSN.rsplit("/", 1)[0] + f"/{name}"
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


def user_id(localpart: str) -> str:
    return f"@{localpart}:{SERVER}"


# -- 1. registration ------------------------------------------------------------------


async def register_with_bridge_kit(
    url: str, registration: Registration, names: list[str], concurrency: int, store_dsn: str
) -> tuple[float, int]:
    """register_many on the PostgreSQL store: (puppets/s, HTTP requests)."""
    async with (
        HomeserverClient(url, registration.as_token) as client,
        open_store(store_dsn) as store,
    ):
        registrar = PuppetRegistrar(client, store, registration, SERVER)
        started = time.perf_counter()
        result = await registrar.register_many(names, concurrency=concurrency)
        elapsed = time.perf_counter() - started
    if result.registered != len(names):
        raise RuntimeError(f"register_many: {result.summary()}")
    return len(names) / elapsed, client.request_count


def split(total: int, rounds: int) -> list[int]:
    """``total`` as ``rounds`` near-equal parts."""
    return [total // rounds + (1 if i < total % rounds else 0) for i in range(rounds)]


async def registration_rounds(
    hs: SynapseServer, registration: Registration, args: argparse.Namespace, store_dsn: str
) -> dict[str, Any]:
    rates: dict[str, list[float]] = {"plain": [], "bridge_kit": []}
    names: dict[str, list[str]] = {"plain": [], "bridge_kit": []}
    await plain_loop(hs.url, registration.as_token, list(localparts("warm", 300)), args.concurrency)
    for round_no, count in enumerate(split(args.puppets, args.rounds)):
        order = ("plain", "bridge_kit") if round_no % 2 == 0 else ("bridge_kit", "plain")
        for kind in order:
            batch = list(localparts(f"{kind[0]}{round_no}", count))
            if kind == "plain":
                rate = await plain_loop(hs.url, registration.as_token, batch, args.concurrency)
            else:
                rate, requests = await register_with_bridge_kit(
                    hs.url, registration, batch, args.concurrency, store_dsn
                )
                if requests != len(batch):
                    raise RuntimeError(f"{requests} requests for {len(batch)} puppets")
            rates[kind].append(rate)
            names[kind].extend(batch)
            print(f"  round {round_no + 1}: {kind:<10} {rate:7.0f} puppets/s", flush=True)
    pairs = [ours / plain for ours, plain in zip(rates["bridge_kit"], rates["plain"], strict=True)]
    return {
        "plain_per_s": statistics.median(rates["plain"]),
        "bridge_kit_per_s": statistics.median(rates["bridge_kit"]),
        "ratio": statistics.median(pairs),
        "round_ratios": pairs,
        "names": names,
    }


# -- 2. joins ---------------------------------------------------------------------------


async def create_rooms(url: str, as_token: str, count: int, concurrency: int) -> list[str]:
    """``count`` public rooms made by the appservice's bot."""
    headers = {"Authorization": f"Bearer {as_token}"}
    rooms: list[str] = []
    pending = iter(range(count))

    async def worker(session: aiohttp.ClientSession) -> None:
        for number in pending:
            body = {"preset": "public_chat", "name": f"bench room {number}"}
            async with session.post(
                url + "/_matrix/client/v3/createRoom", json=body, headers=headers
            ) as response:
                reply = await response.json()
                if response.status != 200:
                    raise RuntimeError(f"createRoom: {response.status} {reply}")
                rooms.append(reply["room_id"])

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(worker(session) for _ in range(min(concurrency, count))))
    return rooms


def join_pairs(names: list[str], rooms: list[str], count: int) -> list[tuple[str, str]]:
    """``count`` distinct (localpart, room) pairs, spread evenly over the rooms."""
    pairs = []
    for n in range(count):
        room = n % len(rooms)
        # Each puppet joins rooms len(rooms) apart in the pair list: distinct pairs as
        # long as count <= len(names) * len(rooms).
        pairs.append((names[(n // len(rooms) + room) % len(names)], rooms[room]))
    if len(set(pairs)) != len(pairs):
        raise ValueError("not enough puppets for distinct pairs")
    return pairs


async def plain_joins(
    url: str, as_token: str, pairs: list[tuple[str, str]], concurrency: int
) -> float:
    """What a bridge without bridge_kit would do: N workers posting /join as each puppet."""
    pending = iter(pairs)
    headers = {"Authorization": f"Bearer {as_token}"}

    async def worker(session: aiohttp.ClientSession) -> None:
        for localpart, room in pending:
            params = {"user_id": user_id(localpart)}
            async with session.post(
                url + JOIN + room, json={}, params=params, headers=headers
            ) as response:
                await response.read()
                if response.status != 200:
                    raise RuntimeError(f"plain join: {response.status} for {localpart} {room}")

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        return len(pairs) / (time.perf_counter() - started)


async def join_with_bridge_kit(
    url: str,
    registration: Registration,
    pairs: list[tuple[str, str]],
    concurrency: int,
    store_dsn: str,
) -> tuple[float, int, JoinResult]:
    """``join_many`` on the PostgreSQL store: (joins/s, HTTP requests, its result)."""
    async with (
        HomeserverClient(url, registration.as_token) as client,
        open_store(store_dsn) as store,
    ):
        registrar = PuppetRegistrar(client, store, registration, SERVER)
        started = time.perf_counter()
        result = await registrar.join_many(pairs, concurrency=concurrency)
        elapsed = time.perf_counter() - started
    if result.joined + result.skipped_known != len(pairs):
        raise RuntimeError(f"join_many: {result.summary()}")
    return len(pairs) / elapsed, client.request_count, result


async def join_rounds(
    hs: SynapseServer,
    registration: Registration,
    args: argparse.Namespace,
    store_dsn: str,
    names: dict[str, list[str]],
) -> dict[str, Any]:
    rooms = await create_rooms(hs.url, registration.as_token, args.rooms, args.concurrency)
    kinds = ("bridge_kit", "plain")
    pairs = {kind: join_pairs(names[kind], rooms, args.joins) for kind in kinds}
    rates: dict[str, list[float]] = {kind: [] for kind in kinds}
    done = dict.fromkeys(kinds, 0)
    for round_no, count in enumerate(split(args.joins, args.rounds)):
        order = kinds if round_no % 2 == 0 else kinds[::-1]
        for kind in order:
            batch = pairs[kind][done[kind] : done[kind] + count]
            done[kind] += count
            if kind == "plain":
                rate = await plain_joins(hs.url, registration.as_token, batch, args.concurrency)
            else:
                rate, _, _ = await join_with_bridge_kit(
                    hs.url, registration, batch, args.concurrency, store_dsn
                )
            rates[kind].append(rate)
            print(f"  round {round_no + 1}: {kind:<10} {rate:7.0f} joins/s", flush=True)
    ratios = [ours / plain for ours, plain in zip(*rates.values(), strict=True)]
    # The same work again: every pair is joined, per the store.
    started = time.perf_counter()
    _, requests, again = await join_with_bridge_kit(
        hs.url, registration, pairs["bridge_kit"], args.concurrency, store_dsn
    )
    if again.skipped_known != len(pairs["bridge_kit"]) or requests:
        raise RuntimeError(f"join re-run: {again.summary()}, {requests} requests")
    return {
        "pairs": args.joins,
        "plain_per_s": statistics.median(rates["plain"]),
        "bridge_kit_per_s": statistics.median(rates["bridge_kit"]),
        "ratio": statistics.median(ratios),
        "round_ratios": ratios,
        "rerun": {"seconds": time.perf_counter() - started, "requests": requests},
    }


# -- 3. re-run over known puppets, 4. memory ------------------------------------------------


async def populate(store_dsn: str, tag: str, count: int) -> None:
    async with open_store(store_dsn) as store:
        ids = (user_id(lp) for lp in localparts(tag, count))
        while batch := list(itertools.islice(ids, 50_000)):
            await store.mark_registered(batch)


async def known_rerun(url: str, registration: Registration, store_dsn: str) -> dict[str, Any]:
    await populate(store_dsn, "known", KNOWN)
    async with (
        HomeserverClient(url, registration.as_token) as client,
        open_store(store_dsn) as store,
    ):
        registrar = PuppetRegistrar(client, store, registration, SERVER)
        started = time.perf_counter()
        result = await registrar.register_many(localparts("known", KNOWN), concurrency=16)
        elapsed = time.perf_counter() - started
    if result.skipped_known != KNOWN or client.request_count != 0:
        raise RuntimeError(f"re-run: {result.summary()}, {client.request_count} requests")
    return {"puppets": KNOWN, "seconds": elapsed, "requests": client.request_count}


def memory_child(url: str, registration_path: str, store_dsn: str) -> None:
    """Runs in a fresh interpreter; prints JSON with its peak RSS."""

    async def main() -> dict[str, Any]:
        registration = Registration.load(registration_path)
        baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        async with (
            HomeserverClient(url, registration.as_token) as client,
            open_store(store_dsn) as store,
        ):
            registrar = PuppetRegistrar(client, store, registration, SERVER)
            started = time.perf_counter()
            result = await registrar.register_many(localparts("million", MILLION), concurrency=16)
            elapsed = time.perf_counter() - started
        return {
            "seconds": elapsed,
            "baseline_mb": baseline / 1024,
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "requests": client.request_count,
            "skipped_known": result.skipped_known,
        }

    print(json.dumps(asyncio.run(main())))


def measure_memory(url: str, registration_path: Path, store_dsn: str) -> dict[str, Any]:
    command = [sys.executable, __file__, "--memory-child", url, str(registration_path), store_dsn]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    figures: dict[str, Any] = json.loads(output.strip().splitlines()[-1])
    return figures


# -- driver ------------------------------------------------------------------------------


def report(figures: dict[str, Any]) -> Iterator[str]:
    r = figures["registration"]
    yield (
        f"registration: plain aiohttp {r['plain_per_s']:.0f}/s, register_many "
        f"{r['bridge_kit_per_s']:.0f}/s; median ratio per round {r['ratio']:.3f} (target >= 0.95)"
    )
    j = figures.get("joins")
    if j is not None:
        yield (
            f"joins: plain aiohttp {j['plain_per_s']:.0f}/s, join_many "
            f"{j['bridge_kit_per_s']:.0f}/s; median ratio per round {j['ratio']:.3f} "
            f"(target >= 0.9); re-run over the same {j['pairs']:,} pairs "
            f"{j['rerun']['seconds']:.2f} s, {j['rerun']['requests']} requests"
        )
    k = figures["known_rerun"]
    yield f"re-run over {k['puppets']:,} known: {k['seconds']:.2f} s, {k['requests']} requests"
    m = figures.get("memory")
    if m is not None:
        yield (
            f"peak RSS over {MILLION:,} known localparts: {m['peak_mb']:.0f} MB "
            f"(interpreter and imports {m['baseline_mb']:.0f} MB), {m['seconds']:.1f} s, "
            f"{m['requests']} requests (target < 200 MB)"
        )


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    figures: dict[str, Any] = {"concurrency": args.concurrency, "puppets": args.puppets}
    with tempfile.TemporaryDirectory(prefix="bench-pg-") as tmp:
        work = Path(tmp)
        registration = generate_registration("bench", None, SERVER, PREFIX)
        registration_path = work / "registration.yaml"
        registration.write(registration_path)
        async with (
            scratch_database("bk_bench_synapse", for_synapse=True) as synapse_dsn,
            scratch_database("bk_bench_store", for_synapse=False) as store_dsn,
        ):
            print("starting Synapse on PostgreSQL ...", flush=True)
            async with SynapseServer(
                work / "synapse",
                registrations=[registration_path],
                server_name=SERVER,
                postgres=synapse_dsn,
            ) as hs:
                print(f"1. registration, {args.puppets:,} puppets per side", flush=True)
                registered = await registration_rounds(hs, registration, args, store_dsn)
                names = registered.pop("names")
                figures["registration"] = registered
                if args.joins:
                    print(
                        f"2. joins, {args.joins:,} per side over {args.rooms} rooms",
                        flush=True,
                    )
                    figures["joins"] = await join_rounds(hs, registration, args, store_dsn, names)
                print(f"3. re-run over {KNOWN:,} known puppets", flush=True)
                figures["known_rerun"] = await known_rerun(hs.url, registration, store_dsn)
                if not args.skip_memory:
                    print(f"4. peak memory over {MILLION:,} known localparts", flush=True)
                    await populate(store_dsn, "million", MILLION)
                    figures["memory"] = await asyncio.to_thread(
                        measure_memory, hs.url, registration_path, store_dsn
                    )
    for line in report(figures):
        print(line)
    return figures


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--memory-child":
        memory_child(*sys.argv[2:5])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--puppets", type=int, default=20_000, help="registered per side")
    parser.add_argument("--joins", type=int, default=20_000, help="per side; 0 skips joins")
    parser.add_argument("--rooms", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--skip-memory", action="store_true", help="skip the 1,000,000 run")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    figures = asyncio.run(bench(args))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()

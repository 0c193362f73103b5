"""Puppets/s through ``register_many`` vs a bare aiohttp loop, against one real Synapse.

One run starts its own Synapse (on SQLite, ``bench.local``) and measures:

1. registration throughput, alternating for a few rounds, each with fresh localparts:
   - ``plain``: a bare aiohttp loop, ``concurrency`` workers posting ``/register``;
   - ``bridge_kit``: ``PuppetRegistrar.register_many`` with the SQLite store, same concurrency;
   and the ratio bridge_kit / plain of the totals (target >= 0.95);
2. a re-run over 100,000 puppets the store already knows (populated directly with
   ``mark_registered``): its time (target < 2 s) and its HTTP requests (must be 0);
3. peak memory (``ru_maxrss`` of a fresh subprocess) of ``register_many`` over
   1,000,000 input localparts (target < 200 MB), twice: all of them already in the
   SQLite store (the whole path: streaming, dedup, validation, batched store
   lookups; no request, so Synapse is not the bottleneck), and as a dry run
   against an empty store.

    .venv/bin/python bench/bench_register.py [--rounds 8] [--puppets 1500] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import resource
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

from bridge_kit.client.homeserver import HomeserverClient  # noqa: E402
from bridge_kit.puppets import PuppetRegistrar  # noqa: E402
from bridge_kit.registration import Registration, generate_registration  # noqa: E402
from bridge_kit.store import SQLiteStore  # noqa: E402
from bridge_kit.testing.synapse import SynapseServer  # noqa: E402

SERVER = "bench.local"
PREFIX = "_bench_"
KNOWN = 100_000
MILLION = 1_000_000
REGISTER = "/_matrix/client/v3/register"


def localparts(tag: str, count: int) -> Iterator[str]:
    return (f"{PREFIX}{tag}_{i:07d}" for i in range(count))


def user_ids(tag: str, count: int) -> Iterator[str]:
    return (f"@{lp}:{SERVER}" for lp in localparts(tag, count))


# -- 1. throughput ----------------------------------------------------------------------


async def plain_loop(url: str, as_token: str, names: list[str], concurrency: int) -> float:
    """What a bridge without bridge_kit would do: N workers posting /register."""
    pending = iter(names)
    headers = {"Authorization": f"Bearer {as_token}"}

    async def worker(session: aiohttp.ClientSession) -> None:
        for name in pending:
            body = {"type": "m.login.application_service", "username": name, "inhibit_login": True}
            async with session.post(url + REGISTER, json=body, headers=headers) as response:
                await response.read()
                if response.status != 200:
                    raise RuntimeError(f"plain loop: {response.status} for {name}")

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        return len(names) / (time.perf_counter() - started)


async def bridge_kit_run(
    url: str, registration: Registration, names: list[str], concurrency: int, db: Path
) -> float:
    async with (
        HomeserverClient(url, registration.as_token) as client,
        SQLiteStore(db) as store,
    ):
        registrar = PuppetRegistrar(client, store, registration, SERVER)
        started = time.perf_counter()
        result = await registrar.register_many(names, concurrency=concurrency)
        elapsed = time.perf_counter() - started
        if result.registered != len(names):
            raise RuntimeError(f"bridge_kit run: {result.summary()}")
        return len(names) / elapsed


async def throughput(
    hs: SynapseServer, registration: Registration, args: argparse.Namespace, work: Path
) -> dict[str, Any]:
    rates: dict[str, list[float]] = {"plain": [], "bridge_kit": []}
    # Warm Synapse up (caches, JIT-free but connection pools, SQLite pages).
    await plain_loop(hs.url, registration.as_token, list(localparts("warm", 300)), args.concurrency)
    for round_no in range(args.rounds):
        order = ("plain", "bridge_kit") if round_no % 2 == 0 else ("bridge_kit", "plain")
        for kind in order:
            names = list(localparts(f"{kind[0]}{round_no}", args.puppets))
            if kind == "plain":
                rate = await plain_loop(hs.url, registration.as_token, names, args.concurrency)
            else:
                db = work / f"throughput-{round_no}.db"
                rate = await bridge_kit_run(hs.url, registration, names, args.concurrency, db)
            rates[kind].append(rate)
            print(f"  round {round_no + 1}: {kind:<10} {rate:7.0f} puppets/s", flush=True)
    # Medians, and the ratio within each round: a round disturbed by another process
    # on the machine, or Synapse slowing as its database grows, must not decide.
    pairs = [ours / plain for ours, plain in zip(rates["bridge_kit"], rates["plain"], strict=True)]
    return {
        "plain_per_s": statistics.median(rates["plain"]),
        "bridge_kit_per_s": statistics.median(rates["bridge_kit"]),
        "ratio": statistics.median(pairs),
        "round_ratios": pairs,
        "rounds": rates,
    }


# -- 2. re-run over known puppets --------------------------------------------------------


async def populate(db: Path, tag: str, count: int) -> None:
    async with SQLiteStore(db) as store:
        ids = user_ids(tag, count)
        while batch := list(itertools.islice(ids, 50_000)):
            await store.mark_registered(batch)


async def known_rerun(hs: SynapseServer, registration: Registration, work: Path) -> dict[str, Any]:
    db = work / "known.db"
    await populate(db, "known", KNOWN)
    async with (
        HomeserverClient(hs.url, registration.as_token) as client,
        SQLiteStore(db) as store,
    ):
        registrar = PuppetRegistrar(client, store, registration, SERVER)
        started = time.perf_counter()
        result = await registrar.register_many(localparts("known", KNOWN), concurrency=16)
        elapsed = time.perf_counter() - started
    if result.skipped_known != KNOWN or client.request_count != 0:
        raise RuntimeError(f"re-run: {result.summary()}, {client.request_count} requests")
    return {"puppets": KNOWN, "seconds": elapsed, "requests": client.request_count}


# -- 3. peak memory over a million ----------------------------------------------------------


def memory_child(url: str, registration_path: str, db: str, mode: str) -> None:
    """Runs in a fresh interpreter; prints JSON with its peak RSS."""

    async def main() -> dict[str, Any]:
        registration = Registration.load(registration_path)
        baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        async with (
            HomeserverClient(url, registration.as_token) as client,
            SQLiteStore(db) as store,
        ):
            registrar = PuppetRegistrar(client, store, registration, SERVER)
            started = time.perf_counter()
            result = await registrar.register_many(
                localparts("million", MILLION), concurrency=16, dry_run=(mode == "dry-run")
            )
            elapsed = time.perf_counter() - started
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return {
            "mode": mode,
            "seconds": elapsed,
            "baseline_mb": baseline / 1024,
            "peak_mb": peak / 1024,
            "requests": client.request_count,
            "skipped_known": result.skipped_known,
            "would_register": result.would_register,
        }

    print(json.dumps(asyncio.run(main())))


def measure_memory(url: str, registration_path: Path, db: Path, mode: str) -> dict[str, Any]:
    command = [
        sys.executable,
        __file__,
        "--memory-child",
        url,
        str(registration_path),
        str(db),
        mode,
    ]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    figures: dict[str, Any] = json.loads(output.strip().splitlines()[-1])
    return figures


# -- driver ----------------------------------------------------------------------------------


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-register-") as tmp:
        work = Path(tmp)
        registration = generate_registration("bench", None, SERVER, PREFIX)
        registration_path = work / "registration.yaml"
        registration.write(registration_path)
        print(f"starting Synapse in {work} ...", flush=True)
        async with SynapseServer(
            work / "synapse", registrations=[registration_path], server_name=SERVER
        ) as hs:
            print(f"1. throughput, concurrency {args.concurrency}, {args.puppets} puppets per run")
            figures: dict[str, Any] = {"concurrency": args.concurrency}
            figures["throughput"] = await throughput(hs, registration, args, work)
            t = figures["throughput"]
            print(
                f"   medians: plain aiohttp {t['plain_per_s']:.0f}/s, register_many "
                f"{t['bridge_kit_per_s']:.0f}/s; median ratio per round {t['ratio']:.3f} "
                "(target >= 0.95)"
            )

            print(f"2. re-run over {KNOWN:,} puppets known to the store", flush=True)
            figures["known_rerun"] = k = await known_rerun(hs, registration, work)
            print(f"   {k['seconds']:.2f} s, {k['requests']} HTTP requests (target < 2 s, 0)")

            print(f"3. peak memory of register_many over {MILLION:,} localparts", flush=True)
            million_db = work / "million.db"
            await populate(million_db, "million", MILLION)
            figures["memory"] = []
            for mode, db in (("known", million_db), ("dry-run", work / "empty.db")):
                m = measure_memory(hs.url, registration_path, db, mode)
                figures["memory"].append(m)
                print(
                    f"   {mode:<8}: peak RSS {m['peak_mb']:.0f} MB (interpreter and imports "
                    f"{m['baseline_mb']:.0f} MB), {m['seconds']:.1f} s, "
                    f"{m['requests']} requests (target < 200 MB)"
                )
        return figures


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--memory-child":
        memory_child(*sys.argv[2:6])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--puppets", type=int, default=1500, help="per method and round")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    figures = asyncio.run(bench(args))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()

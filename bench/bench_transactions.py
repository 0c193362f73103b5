"""Events/s through ``PUT /_matrix/app/v1/transactions``: bridge_kit vs a bare aiohttp handler.

Each run starts a fresh server in its own process (so the load generator and
the server do not share one event loop) and pushes transactions of 100 events
from several concurrent senders over loopback for a fixed time:

- ``bridge``: bridge_kit's app as a bridge serves it: token check, JSON decoding,
  validation of every event, the events and the dedup record committed to the
  SQLite inbox in one commit before the 200, metrics (the accepted-event count
  is checked against what was sent); handlers run later, outside this path;
- ``bare-durable``: the fair limit for a durable inbox: an aiohttp handler that
  decodes the JSON and commits each event's JSON to SQLite (WAL, synchronous
  NORMAL, as the store) in one transaction before it answers ``{}``;
- ``bare``: an aiohttp handler that reads the body and answers ``{}`` (the
  baseline of the target: reading the body is the least any handler must do);
- ``bare-json``: the same, but it also decodes the JSON body, for context: it
  shows how much of the gap is JSON decoding alone.

The kinds alternate for a few rounds, so drift in machine load hits each alike,
and the medians are compared. Each server also reports the CPU time it used, so
the output gives server CPU per transaction, which other load on the machine
disturbs much less than throughput. The load average is printed with each round.

    .venv/bin/python bench/bench_transactions.py [--rounds 5] [--senders 4] [--seconds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

HS_TOKEN = "bench-hs-token"
EVENTS_PER_TRANSACTION = 100
ROOT = str(Path(__file__).resolve().parent.parent)
KINDS = ("bridge", "bare-durable", "bare", "bare-json")
STATS_PATH = "/_bench/stats"
BASELINES = {
    "bridge": "bridge_kit: auth, JSON, validated events, SQLite inbox + dedup in one commit",
    "bare-durable": "bare aiohttp: json.loads, every event committed to SQLite, answer {}",
    "bare": "bare aiohttp: read the body, answer {}",
    "bare-json": "bare aiohttp: read the body, json.loads it, answer {}",
}


# -- server side (runs in the subprocess) -------------------------------------------


def stats_route(events: Callable[[], int]) -> Any:
    async def stats(_: web.Request) -> web.Response:
        cpu = os.times()
        return web.json_response({"cpu": cpu.user + cpu.system, "events": events()})

    return stats


async def serve_bare(port: int, *, decode: bool) -> None:
    async def transaction(request: web.Request) -> web.Response:
        body = await request.read()
        if decode:
            json.loads(body)
        return web.json_response({})

    app = web.Application(client_max_size=10 * 1024 * 1024)
    app.router.add_put("/_matrix/app/v1/transactions/{txnId}", transaction)
    app.router.add_get(STATS_PATH, stats_route(lambda: -1))
    await run_forever(app, port)


async def serve_bare_durable(port: int, db: Path) -> None:
    connection = sqlite3.connect(db, isolation_level=None)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=NORMAL")
    connection.execute("CREATE TABLE inbox (id INTEGER PRIMARY KEY, event_json TEXT NOT NULL)")

    async def transaction(request: web.Request) -> web.Response:
        body = json.loads(await request.read())
        rows = [(json.dumps(event),) for event in body["events"]]
        connection.execute("BEGIN IMMEDIATE")
        connection.executemany("INSERT INTO inbox (event_json) VALUES (?)", rows)
        connection.execute("COMMIT")
        return web.json_response({})

    app = web.Application(client_max_size=10 * 1024 * 1024)
    app.router.add_put("/_matrix/app/v1/transactions/{txnId}", transaction)
    app.router.add_get(STATS_PATH, stats_route(lambda: -1))
    await run_forever(app, port)


async def serve_bridge(port: int, db: Path) -> None:
    from bridge_kit.metrics import Metrics
    from bridge_kit.server import create_app
    from bridge_kit.store import open_store

    metrics = Metrics()

    def accepted() -> int:
        return int(metrics.registry.get_sample_value("bridge_kit_events_total") or 0)

    async with open_store(f"sqlite:///{db}") as store:
        app = create_app(hs_token=HS_TOKEN, store=store, metrics=metrics)
        app.router.add_get(STATS_PATH, stats_route(accepted))
        await run_forever(app, port)


async def run_forever(app: web.Application, port: int) -> None:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


# -- load generator -------------------------------------------------------------------


def transaction_body() -> bytes:
    events = [
        {
            "type": "m.room.message",
            "event_id": f"$bench_event_{n}",
            "room_id": "!bench:example.org",
            "sender": "@alice:example.org",
            "origin_server_ts": 1_700_000_000_000 + n,
            "content": {"msgtype": "m.text", "body": f"benchmark message number {n}"},
            "unsigned": {"age": 12},
        }
        for n in range(EVENTS_PER_TRANSACTION)
    ]
    return json.dumps({"events": events, "ephemeral": []}).encode()


class Sender:
    """Pushes transactions with fresh txnIds until a deadline; counts what was acknowledged."""

    def __init__(self, port: int, body: bytes) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.body = body
        self.next_id = 0
        self.acknowledged = 0

    async def push(self, session: aiohttp.ClientSession, senders: int, seconds: float) -> float:
        """Push for ``seconds`` from ``senders`` senders; return acknowledged events/s."""
        headers = {"Authorization": f"Bearer {HS_TOKEN}", "Content-Type": "application/json"}
        acknowledged_before = self.acknowledged
        started = time.perf_counter()
        deadline = started + seconds

        async def sender() -> None:
            while time.perf_counter() < deadline:
                txn_id, self.next_id = self.next_id, self.next_id + 1
                url = f"{self.base}/_matrix/app/v1/transactions/{txn_id}"
                async with session.put(url, data=self.body, headers=headers) as response:
                    if response.status != 200:
                        raise RuntimeError(
                            f"txn {txn_id}: {response.status} {await response.text()}"
                        )
                    await response.read()
                self.acknowledged += 1

        await asyncio.gather(*(sender() for _ in range(senders)))
        elapsed = time.perf_counter() - started
        return (self.acknowledged - acknowledged_before) * EVENTS_PER_TRANSACTION / elapsed

    async def stats(self, session: aiohttp.ClientSession) -> dict[str, Any]:
        async with session.get(f"{self.base}{STATS_PATH}") as response:
            stats: dict[str, Any] = await response.json()
            return stats


async def wait_ready(session: aiohttp.ClientSession, port: int) -> None:
    async with asyncio.timeout(30):
        while True:
            try:
                async with session.get(f"http://127.0.0.1:{port}{STATS_PATH}") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.05)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def one_run(
    kind: str, args: argparse.Namespace, body: bytes, workdir: Path
) -> tuple[float, float]:
    """One server process, warmed up, then measured: (events/s, server CPU ms per transaction)."""
    port = free_port()
    db = workdir / f"bench-{kind}-{time.monotonic_ns()}.db"
    command = [sys.executable, __file__, "--serve", kind, "--port", str(port), "--db", str(db)]
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    server = await asyncio.create_subprocess_exec(*command, env=env)
    connector = aiohttp.TCPConnector(limit=args.senders)
    try:
        async with aiohttp.ClientSession(connector=connector) as session:
            await wait_ready(session, port)
            sender = Sender(port, body)
            # Warm-up: imports, caches, SQLite pages and the first dedup prune are done.
            await sender.push(session, args.senders, 0.5)
            before = await sender.stats(session)
            acknowledged_before = sender.acknowledged
            rate = await sender.push(session, args.senders, args.seconds)
            after = await sender.stats(session)
            measured = sender.acknowledged - acknowledged_before
            if kind == "bridge" and after["events"] != sender.acknowledged * EVENTS_PER_TRANSACTION:
                raise RuntimeError(
                    f"the handler got {after['events']} events, "
                    f"{sender.acknowledged * EVENTS_PER_TRANSACTION} were acknowledged"
                )
            cpu_ms = (after["cpu"] - before["cpu"]) * 1000 / measured
            return rate, cpu_ms
    finally:
        server.terminate()
        await server.wait()


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"load {one:.2f}/{five:.2f} on {os.cpu_count()} CPUs"


async def main(args: argparse.Namespace) -> None:
    body = transaction_body()
    rates: dict[str, list[float]] = {kind: [] for kind in KINDS}
    cpu: dict[str, list[float]] = {kind: [] for kind in KINDS}
    print(
        f"{args.rounds} rounds x {args.seconds:g} s per kind, {EVENTS_PER_TRANSACTION} events "
        f"({len(body)} bytes) per transaction, {args.senders} concurrent senders, loopback; "
        f"{load()} at start"
    )
    for kind in KINDS:
        print(f"  {kind:>9} = {BASELINES[kind]}")
    with tempfile.TemporaryDirectory(prefix="bk-bench-") as tmp:
        for round_number in range(args.rounds):
            order = KINDS if round_number % 2 == 0 else KINDS[::-1]
            for kind in order:
                rate, cpu_ms = await one_run(kind, args, body, Path(tmp))
                rates[kind].append(rate)
                cpu[kind].append(cpu_ms)
                print(
                    f"  round {round_number + 1} {kind:>9}: {rate:>10,.0f} events/s, "
                    f"server CPU {cpu_ms:.3f} ms/transaction ({load()})"
                )
    rate_of = {kind: statistics.median(rates[kind]) for kind in KINDS}
    cpu_of = {kind: statistics.median(cpu[kind]) for kind in KINDS}
    print(f"medians ({load()} at end):")
    for kind in KINDS:
        print(
            f"  {kind:>9}: {rate_of[kind]:>10,.0f} events/s, "
            f"server CPU {cpu_of[kind]:.3f} ms/transaction"
        )
    durable = rate_of["bridge"] / rate_of["bare-durable"]
    print(f"ratio bridge_kit / bare with the same durability: {durable:.2f}")
    print(f"ratio bridge_kit / bare: {rate_of['bridge'] / rate_of['bare']:.2f}")
    print(
        f"ratio bridge_kit / bare + JSON decoding: {rate_of['bridge'] / rate_of['bare-json']:.2f}"
    )
    print(
        f"server CPU per transaction, bare / bridge_kit: {cpu_of['bare'] / cpu_of['bridge']:.2f}"
        f" (bare + JSON decoding / bridge_kit: {cpu_of['bare-json'] / cpu_of['bridge']:.2f})"
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--senders", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=3.0, help="measured time per run")
    parser.add_argument("--serve", choices=KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--db", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args()


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.serve in ("bare", "bare-json"):
        asyncio.run(serve_bare(arguments.port, decode=arguments.serve == "bare-json"))
    elif arguments.serve == "bare-durable":
        asyncio.run(serve_bare_durable(arguments.port, arguments.db))
    elif arguments.serve == "bridge":
        asyncio.run(serve_bridge(arguments.port, arguments.db))
    else:
        asyncio.run(main(arguments))

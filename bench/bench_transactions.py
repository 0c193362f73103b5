"""Events/s through ``PUT /_matrix/app/v1/transactions``: bridge_kit vs bare aiohttp handlers.

Each run starts a fresh server in its own process (so the load generator and
the server do not share one event loop) and pushes transactions of 100 events
over loopback for a fixed time, by default from one sender that waits for each
answer before it sends the next transaction, as Synapse sends to an appservice:

- ``bridge``: bridge_kit's app as a bridge serves it: token check, JSON decoding,
  validation of every event, the events and the dedup record committed to the
  SQLite inbox in one commit before the 200, metrics (the accepted-event count
  is checked against what was sent); handlers on: the inbox runs a handler for
  every accepted event meanwhile, on the same event loop;
- ``bridge-no-handlers`` (only with ``--kinds``): the same without the inbox
  running, for the cost of the acknowledgement alone;
- ``bare-durable``: the fair limit for a durable inbox: an aiohttp handler that
  decodes the JSON and, in one SQLite transaction with the store's durability
  (WAL, synchronous=NORMAL), records the txnId (a repeated one stores nothing)
  and commits each event's JSON, before it answers ``{}``;
- ``bare``: an aiohttp handler that reads the body and answers ``{}`` (reading
  the body is the least any handler must do);
- ``bare-json``: the same, but it also decodes the JSON body with :mod:`json`.

The kinds alternate for a few rounds, so drift in machine load hits each alike,
and the medians are compared. Each server also reports the CPU time it used, so
the output gives server CPU per transaction, which other load on the machine
disturbs much less than throughput. The load average is printed with each round.
``--profile DIR`` writes each server's cProfile statistics.

    .venv/bin/python bench/bench_transactions.py [--rounds 5] [--senders 1] [--seconds 3]
        [--kinds bridge,bridge-no-handlers,bare-durable,bare,bare-json]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import signal
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
KINDS = ("bridge", "bridge-no-handlers", "bare-durable", "bare", "bare-json")
DEFAULT_KINDS = ("bridge", "bare-durable", "bare", "bare-json")
STATS_PATH = "/_bench/stats"
BASELINES = {
    "bridge": "bridge_kit: auth, JSON, validated events, SQLite inbox + dedup in one commit;"
    " the inbox runs a handler for every event meanwhile, in the same process",
    "bridge-no-handlers": "the same with no inbox running: the acknowledgement alone",
    "bare-durable": "bare aiohttp: json.loads, every event committed to SQLite, answer {}",
    "bare": "bare aiohttp: read the body, answer {}",
    "bare-json": "bare aiohttp: read the body, json.loads it, answer {}",
}


# -- server side (runs in the subprocess) -------------------------------------------


def stats_route(events: Callable[[], int], handled: Callable[[], int] = lambda: -1) -> Any:
    async def stats(_: web.Request) -> web.Response:
        cpu = os.times()
        return web.json_response(
            {"cpu": cpu.user + cpu.system, "events": events(), "handled": handled()}
        )

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
    # The store's durability: WAL journal, synchronous=NORMAL (a commit survives the
    # process crashing, with no fsync per commit), SQLite's default autocheckpoint.
    connection = sqlite3.connect(db, isolation_level=None)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=NORMAL")
    connection.execute("CREATE TABLE inbox (id INTEGER PRIMARY KEY, event_json TEXT NOT NULL)")
    connection.execute("CREATE TABLE txns (txn_id TEXT PRIMARY KEY) WITHOUT ROWID")

    async def transaction(request: web.Request) -> web.Response:
        body = json.loads(await request.read())
        rows = [(json.dumps(event),) for event in body["events"]]
        connection.execute("BEGIN IMMEDIATE")
        # The txnId and the events in one commit: a repeated txnId stores nothing.
        if connection.execute(
            "INSERT OR IGNORE INTO txns (txn_id) VALUES (?)", (request.match_info["txnId"],)
        ).rowcount:
            connection.executemany("INSERT INTO inbox (event_json) VALUES (?)", rows)
            connection.execute("COMMIT")
        else:
            connection.execute("ROLLBACK")
        return web.json_response({})

    app = web.Application(client_max_size=10 * 1024 * 1024)
    app.router.add_put("/_matrix/app/v1/transactions/{txnId}", transaction)
    app.router.add_get(STATS_PATH, stats_route(lambda: -1))
    await run_forever(app, port)


async def serve_bridge(port: int, db: Path, *, handlers: bool) -> None:
    from bridge_kit.inbox import Inbox
    from bridge_kit.metrics import Metrics
    from bridge_kit.server import create_app
    from bridge_kit.store import open_store
    from bridge_kit.types import Event

    metrics = Metrics()
    handled = 0

    async def on_message(event: Event) -> None:
        nonlocal handled
        handled += 1

    def accepted() -> int:
        return int(metrics.registry.get_sample_value("bridge_kit_events_total") or 0)

    async with open_store(f"sqlite:///{db}") as store:
        # Handlers on, as in a running bridge: the inbox works through what was
        # accepted on the same event loop, and competes with the acknowledgements.
        inbox = Inbox(store, lambda kind, type_: [on_message], appservice_id="bench")
        if handlers:
            await inbox.start()
        app = create_app(hs_token=HS_TOKEN, store=store, metrics=metrics, on_accepted=inbox.wake)
        app.router.add_get(STATS_PATH, stats_route(accepted, lambda: handled))
        try:
            await run_forever(app, port)
        finally:
            if handlers:
                await inbox.stop()


async def run_forever(app: web.Application, port: int) -> None:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    stop = asyncio.Event()
    # SIGTERM ends the server cleanly, so a --profile run writes its profile.
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    try:
        await stop.wait()
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
) -> tuple[float, float, float]:
    """One server process, warmed up, then measured: (events/s, server CPU ms per
    transaction, events/s through the handlers meanwhile or -1 without them)."""
    port = free_port()
    db = workdir / f"bench-{kind}-{time.monotonic_ns()}.db"
    command = [sys.executable, __file__, "--serve", kind, "--port", str(port), "--db", str(db)]
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
        command += ["--profile", str(args.profile / f"{kind}-{time.monotonic_ns()}.prof")]
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
            started = time.perf_counter()
            rate = await sender.push(session, args.senders, args.seconds)
            after = await sender.stats(session)
            elapsed = time.perf_counter() - started
            measured = sender.acknowledged - acknowledged_before
            if (
                kind.startswith("bridge")
                and after["events"] != sender.acknowledged * EVENTS_PER_TRANSACTION
            ):
                raise RuntimeError(
                    f"the handler got {after['events']} events, "
                    f"{sender.acknowledged * EVENTS_PER_TRANSACTION} were acknowledged"
                )
            cpu_ms = (after["cpu"] - before["cpu"]) * 1000 / measured
            handled = (after["handled"] - before["handled"]) / elapsed if kind == "bridge" else -1
            return rate, cpu_ms, handled
    finally:
        server.terminate()
        await server.wait()


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"load {one:.2f}/{five:.2f} on {os.cpu_count()} CPUs"


async def main(args: argparse.Namespace) -> None:
    body = transaction_body()
    kinds = tuple(kind for kind in KINDS if kind in args.kinds.split(","))
    rates: dict[str, list[float]] = {kind: [] for kind in kinds}
    cpu: dict[str, list[float]] = {kind: [] for kind in kinds}
    handled_rates: list[float] = []  # events/s through the handlers, during the bridge runs
    print(
        f"{args.rounds} rounds x {args.seconds:g} s per kind, {EVENTS_PER_TRANSACTION} events "
        f"({len(body)} bytes) per transaction, {args.senders} concurrent senders, loopback; "
        f"{load()} at start"
    )
    for kind in kinds:
        print(f"  {kind:>12} = {BASELINES[kind]}")
    with tempfile.TemporaryDirectory(prefix="bk-bench-") as tmp:
        for round_number in range(args.rounds):
            order = kinds if round_number % 2 == 0 else kinds[::-1]
            for kind in order:
                rate, cpu_ms, handled = await one_run(kind, args, body, Path(tmp))
                rates[kind].append(rate)
                cpu[kind].append(cpu_ms)
                if handled >= 0:
                    handled_rates.append(handled)
                meanwhile = f", {handled:,.0f} handled/s" if handled >= 0 else ""
                print(
                    f"  round {round_number + 1} {kind:>12}: {rate:>8,.0f} events/s{meanwhile}, "
                    f"server CPU {cpu_ms:.3f} ms/transaction ({load()})"
                )
    rate_of = {kind: statistics.median(rates[kind]) for kind in kinds}
    cpu_of = {kind: statistics.median(cpu[kind]) for kind in kinds}
    print(f"medians ({load()} at end):")
    for kind in kinds:
        print(
            f"  {kind:>12}: {rate_of[kind]:>10,.0f} events/s, "
            f"server CPU {cpu_of[kind]:.3f} ms/transaction"
        )
    if handled_rates:
        # The inbox shares the event loop with the acknowledgements: what it handles
        # meanwhile is the other half of the picture (a starved inbox acks faster).
        print(f"  the inbox meanwhile: {statistics.median(handled_rates):>10,.0f} events/s handled")
    for ours in ("bridge", "bridge-no-handlers"):
        for baseline in (kind for kind in kinds if ours in kinds and not kind.startswith("bridge")):
            print(
                f"ratio {ours} / {baseline}: events/s {rate_of[ours] / rate_of[baseline]:.2f}, "
                f"server CPU per transaction {cpu_of[baseline] / cpu_of[ours]:.2f}"
            )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--senders", type=int, default=1, help="1: as Synapse sends")
    parser.add_argument("--seconds", type=float, default=3.0, help="measured time per run")
    parser.add_argument(
        "--kinds", default=",".join(DEFAULT_KINDS), help="which servers to run (comma-separated)"
    )
    parser.add_argument("--serve", choices=KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--db", type=Path, help=argparse.SUPPRESS)
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="write each server's cProfile statistics to DIR/<kind>-<n>.prof",
    )
    return parser.parse_args()


def serve(args: argparse.Namespace) -> None:
    """The server side of one run (in its own process)."""
    if args.serve in ("bare", "bare-json"):
        server = serve_bare(args.port, decode=args.serve == "bare-json")
    elif args.serve == "bare-durable":
        server = serve_bare_durable(args.port, args.db)
    else:
        server = serve_bridge(args.port, args.db, handlers=args.serve == "bridge")
    if args.profile is None:
        asyncio.run(server)
        return
    profile = cProfile.Profile()
    profile.enable()
    try:
        asyncio.run(server)
    finally:
        profile.disable()
        profile.dump_stats(args.profile)


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.serve is not None:
        serve(arguments)
    else:
        asyncio.run(main(arguments))

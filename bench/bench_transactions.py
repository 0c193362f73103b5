"""Events/s through ``PUT /_matrix/app/v1/transactions``, acknowledged and handled:
bridge_kit vs a bare durable aiohttp handler and mautrix-python.

Each run starts a fresh server in its own process (so the load generator and
the server do not share one event loop) and pushes transactions of 100 events
over 7 rooms on loopback for a fixed time, by default from one sender that
waits for each answer before it sends the next transaction, as Synapse sends to
an appservice. Then it waits until the handler saw every acknowledged event.
Two rates come out of each run: *acknowledged* (events/s answered 200 while
pushing) and *handled end to end* (events from the first send until the handler
saw the last one), and the server's CPU time per transaction (accept and handle
together, from the first send until the last event was handled):

- ``bridge``: bridge_kit's app as a bridge serves it: token check, JSON decoding,
  validation of every event, the events and the dedup record committed to the
  SQLite inbox in one commit before the 200, metrics (the accepted-event count
  is checked against what was sent); the inbox runs a handler for every event
  on the same event loop, one event at a time per room, each handled event's
  removal committed before its room's next event starts;
- ``bridge-no-handlers`` (only with ``--kinds``): the same without the inbox
  running, for the cost of the acknowledgement alone;
- ``bare-durable``: the fair limit for a durable inbox with bridge_kit's crash
  promise: an aiohttp handler that decodes the JSON and, in one SQLite transaction
  with the store's durability (WAL, synchronous=NORMAL), records the txnId (a
  repeated one stores nothing) and commits each event's JSON before it answers
  ``{}``; a worker on the same loop reads the stored events, runs the handler on
  the next event of each room, and deletes those in one commit before any room's
  next event (so a crash re-runs at most one event per room, as in bridge_kit);
- ``mautrix`` (with ``--mautrix-python PATH``, an interpreter that has the PyPI
  package ``mautrix``): mautrix-python's ``AppService`` with one event handler,
  which it runs as a task per event (no store: nothing durable);
- ``bare``: an aiohttp handler that reads the body and answers ``{}``;
- ``bare-json``: the same, but it also decodes the JSON body with :mod:`json`.

The kinds alternate for a few rounds, so drift in machine load hits each alike,
and the medians are compared. The load average is printed with each round.
``--profile DIR`` writes each server's cProfile statistics.

    .venv/bin/python bench/bench_transactions.py [--rounds 5] [--senders 1] [--seconds 3]
        [--kinds bridge,bridge-no-handlers,bare-durable,mautrix,bare,bare-json]
        [--mautrix-python /path/to/venv/bin/python]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import dataclasses
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
ROOMS = 7
ROOT = str(Path(__file__).resolve().parent.parent)
KINDS = ("bridge", "bridge-no-handlers", "bare-durable", "mautrix", "bare", "bare-json")
DEFAULT_KINDS = ("bridge", "bare-durable", "mautrix")
#: The kinds that run a handler for every event.
HANDLING = ("bridge", "bare-durable", "mautrix")
#: Seconds a server may take to handle what it acknowledged.
HANDLED_TIMEOUT = 300
STATS_PATH = "/_bench/stats"
BASELINES = {
    "bridge": "bridge_kit: auth, JSON, validated events, SQLite inbox + dedup in one commit;"
    " the inbox runs a handler for every event meanwhile, in the same process",
    "bridge-no-handlers": "the same with no inbox running: the acknowledgement alone",
    "bare-durable": "bare aiohttp: json.loads, every event committed to SQLite, answer {};"
    " a worker handles the next event of each room and deletes them in one commit",
    "mautrix": "mautrix-python's AppService, one event handler (a task per event, nothing stored)",
    "bare": "bare aiohttp: read the body, answer {}",
    "bare-json": "bare aiohttp: read the body, json.loads it, answer {}",
}


# -- server side (runs in the subprocess) -------------------------------------------


class Handled:
    """What the server's handler saw: how many events, and when the last one
    (CLOCK_MONOTONIC, which every process on the machine shares)."""

    def __init__(self) -> None:
        self.count = 0
        self.last_at = 0.0

    def saw(self) -> None:
        self.count += 1
        self.last_at = time.monotonic()


def stats_route(events: Callable[[], int], handled: Handled | None = None) -> Any:
    async def stats(_: web.Request) -> web.Response:
        cpu = os.times()
        return web.json_response(
            {
                "cpu": cpu.user + cpu.system,
                "events": events(),
                "handled": handled.count if handled is not None else -1,
                "handled_at": handled.last_at if handled is not None else 0.0,
            }
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
    connection.execute(
        "CREATE TABLE inbox (id INTEGER PRIMARY KEY, room TEXT NOT NULL, event_json TEXT NOT NULL)"
    )
    connection.execute("CREATE TABLE txns (txn_id TEXT PRIMARY KEY) WITHOUT ROWID")
    handled = Handled()
    arrived = asyncio.Event()

    async def handler(event: dict[str, Any]) -> None:
        handled.saw()

    async def transaction(request: web.Request) -> web.Response:
        body = json.loads(await request.read())
        rows = [(event["room_id"], json.dumps(event)) for event in body["events"]]
        connection.execute("BEGIN IMMEDIATE")
        # The txnId and the events in one commit: a repeated txnId stores nothing.
        if connection.execute(
            "INSERT OR IGNORE INTO txns (txn_id) VALUES (?)", (request.match_info["txnId"],)
        ).rowcount:
            connection.executemany("INSERT INTO inbox (room, event_json) VALUES (?, ?)", rows)
            connection.execute("COMMIT")
            arrived.set()
        else:
            connection.execute("ROLLBACK")
        return web.json_response({})

    async def work() -> None:
        """The next event of each room, handled, then all of them deleted in one commit:
        at most one event per room is handled and not yet deleted."""
        while True:
            await arrived.wait()
            arrived.clear()
            while rows := connection.execute(
                "SELECT id, room, event_json FROM inbox ORDER BY id LIMIT 500"
            ).fetchall():
                rooms: dict[str, list[tuple[int, str]]] = {}
                for item_id, room, event_json in rows:
                    rooms.setdefault(room, []).append((item_id, event_json))
                while rooms:
                    heads = [queue.pop(0) for queue in rooms.values()]
                    rooms = {room: queue for room, queue in rooms.items() if queue}
                    for _, event_json in heads:
                        await handler(json.loads(event_json))
                    connection.executemany(
                        "DELETE FROM inbox WHERE id = ?", [(item_id,) for item_id, _ in heads]
                    )
                    await asyncio.sleep(0)  # let the acknowledgements in, as bridge_kit does

    app = web.Application(client_max_size=10 * 1024 * 1024)
    app.router.add_put("/_matrix/app/v1/transactions/{txnId}", transaction)
    app.router.add_get(STATS_PATH, stats_route(lambda: -1, handled))
    worker = asyncio.create_task(work())
    try:
        await run_forever(app, port)
    finally:
        worker.cancel()


async def serve_mautrix(port: int, workdir: Path) -> None:
    """mautrix-python's AppService as a bridge built on it serves transactions."""
    from mautrix.appservice import AppService  # type: ignore[import-not-found]

    os.chdir(workdir)  # its default state store names a file in the working directory
    handled = Handled()
    appservice = AppService(
        server="http://127.0.0.1:9",  # never contacted: start() is not called
        domain="example.org",
        as_token="bench-as-token",
        hs_token=HS_TOKEN,
        bot_localpart="bench",
        id="bench",
        aiohttp_params={"client_max_size": 10 * 1024 * 1024},
    )

    @appservice.matrix_event_handler
    async def on_event(event: Any) -> None:
        handled.saw()

    appservice.app.router.add_get(STATS_PATH, stats_route(lambda: -1, handled))
    await run_forever(appservice.app, port)


async def serve_bridge(port: int, db: Path, *, handlers: bool) -> None:
    from bridge_kit.inbox.lanes import Inbox
    from bridge_kit.metrics import Metrics
    from bridge_kit.server.appservice_api import create_app
    from bridge_kit.store import open_store
    from bridge_kit.types import Event

    metrics = Metrics()
    handled = Handled()

    async def on_message(event: Event) -> None:
        handled.saw()

    def accepted() -> int:
        return int(metrics.registry.get_sample_value("bridge_kit_events_total") or 0)

    async with open_store(f"sqlite:///{db}") as store:
        # Handlers on, as in a running bridge: the inbox works through what was
        # accepted on the same event loop, and competes with the acknowledgements.
        inbox = Inbox(store, lambda kind, type_: [on_message], appservice_id="bench")
        if handlers:
            await inbox.start()
        app = create_app(hs_token=HS_TOKEN, store=store, metrics=metrics, on_accepted=inbox.wake)
        app.router.add_get(STATS_PATH, stats_route(accepted, handled if handlers else None))
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
            "room_id": f"!bench{n % ROOMS}:example.org",
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


@dataclasses.dataclass(frozen=True)
class Run:
    """One run's figures."""

    acknowledged: float  # events/s answered while pushing
    handled: float  # events/s from the first send until the last was handled; -1: no handler
    cpu_ms: float  # server CPU per transaction, accept and handle (or only accept)


async def one_run(kind: str, args: argparse.Namespace, body: bytes, workdir: Path) -> Run:
    """One server process, warmed up, then measured."""
    port = free_port()
    db = workdir / f"bench-{kind}-{time.monotonic_ns()}.db"
    python = args.mautrix_python if kind == "mautrix" else sys.executable
    command = [str(python), __file__, "--serve", kind, "--port", str(port), "--db", str(db)]
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
            before = await all_handled(session, sender, kind)
            acknowledged_before = sender.acknowledged
            started = time.monotonic()
            rate = await sender.push(session, args.senders, args.seconds)
            after = await all_handled(session, sender, kind)
            measured = sender.acknowledged - acknowledged_before
            if kind.startswith("bridge") and after["events"] != sender.acknowledged * (
                EVENTS_PER_TRANSACTION
            ):
                raise RuntimeError(
                    f"the server accepted {after['events']} events, "
                    f"{sender.acknowledged * EVENTS_PER_TRANSACTION} were acknowledged"
                )
            cpu_ms = (after["cpu"] - before["cpu"]) * 1000 / measured
            handled = -1.0
            if kind in HANDLING:
                took = after["handled_at"] - started
                handled = measured * EVENTS_PER_TRANSACTION / took
            return Run(rate, handled, cpu_ms)
    finally:
        server.terminate()
        await server.wait()


async def all_handled(session: aiohttp.ClientSession, sender: Sender, kind: str) -> dict[str, Any]:
    """The server's stats once its handler saw every acknowledged event."""
    wanted = sender.acknowledged * EVENTS_PER_TRANSACTION
    async with asyncio.timeout(HANDLED_TIMEOUT):
        while True:
            stats = await sender.stats(session)
            if kind not in HANDLING or stats["handled"] >= wanted:
                return stats
            await asyncio.sleep(0.005)


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"load {one:.2f}/{five:.2f} on {os.cpu_count()} CPUs"


async def main(args: argparse.Namespace) -> None:
    body = transaction_body()
    kinds = tuple(kind for kind in KINDS if kind in args.kinds.split(","))
    if "mautrix" in kinds and args.mautrix_python is None:
        print("mautrix skipped: give --mautrix-python PATH (an interpreter with mautrix)")
        kinds = tuple(kind for kind in kinds if kind != "mautrix")
    runs: dict[str, list[Run]] = {kind: [] for kind in kinds}
    print(
        f"{args.rounds} rounds x {args.seconds:g} s per kind, {EVENTS_PER_TRANSACTION} events "
        f"over {ROOMS} rooms ({len(body)} bytes) per transaction, {args.senders} concurrent "
        f"senders, loopback; {load()} at start"
    )
    for kind in kinds:
        print(f"  {kind:>12} = {BASELINES[kind]}")
    with tempfile.TemporaryDirectory(prefix="bk-bench-") as tmp:
        for round_number in range(args.rounds):
            order = kinds if round_number % 2 == 0 else kinds[::-1]
            for kind in order:
                run = await one_run(kind, args, body, Path(tmp))
                runs[kind].append(run)
                print(f"  round {round_number + 1} {kind:>12}: {describe(run)} ({load()})")
    median = {
        kind: Run(
            statistics.median(run.acknowledged for run in runs[kind]),
            statistics.median(run.handled for run in runs[kind]),
            statistics.median(run.cpu_ms for run in runs[kind]),
        )
        for kind in kinds
    }
    print(f"medians ({load()} at end):")
    for kind in kinds:
        print(f"  {kind:>12}: {describe(median[kind])}")
    for ours in ("bridge", "bridge-no-handlers"):
        for baseline in (kind for kind in kinds if ours in kinds and not kind.startswith("bridge")):
            print(f"ratio {ours} / {baseline}: {ratios(median[ours], median[baseline])}")


def describe(run: Run) -> str:
    handled = f", handled end to end {run.handled:>8,.0f} events/s" if run.handled >= 0 else ""
    return (
        f"acknowledged {run.acknowledged:>8,.0f} events/s{handled}, "
        f"server CPU {run.cpu_ms:.3f} ms/transaction"
    )


def ratios(ours: Run, baseline: Run) -> str:
    parts = [f"acknowledged {ours.acknowledged / baseline.acknowledged:.2f}"]
    if ours.handled >= 0 and baseline.handled >= 0:
        parts.append(f"handled end to end {ours.handled / baseline.handled:.2f}")
    parts.append(
        f"server CPU per transaction {baseline.cpu_ms / ours.cpu_ms:.2f} (higher: ours less)"
    )
    return ", ".join(parts)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--senders", type=int, default=1, help="1: as Synapse sends")
    parser.add_argument("--seconds", type=float, default=3.0, help="measured time per run")
    parser.add_argument(
        "--kinds", default=",".join(DEFAULT_KINDS), help="which servers to run (comma-separated)"
    )
    parser.add_argument(
        "--mautrix-python",
        type=Path,
        metavar="PATH",
        help="a Python interpreter with the PyPI package mautrix installed (a separate venv)",
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
    elif args.serve == "mautrix":
        server = serve_mautrix(args.port, args.db.parent)
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

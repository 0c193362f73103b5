"""Ack latency and events/s with a slow handler: the durable inbox vs acking after handlers.

Every handler sleeps ``--handler-seconds`` (1 s) per event, as a bridge waiting
on a slow remote network would. Transactions of ``--events`` events spread
over ``--rooms`` rooms are sent one at a time, as Synapse sends them, to three
servers in turn, each on its own SQLite file:

- ``inbox``: bridge_kit's app: every event and the txnId committed to the inbox
  in one commit, then 200; the inbox's workers run the handlers afterwards,
  one room at a time each, up to ``handler_concurrency`` rooms at once;
- ``ack-after-handlers``: what bridge_kit did before the inbox (and what the
  other frameworks do at best): the transaction is answered only after the
  handler ran for each of its events, in order;
- ``bare-durable``: the fair limit for the acknowledgement: an aiohttp handler
  that decodes the JSON and commits every event to SQLite in one transaction
  (the same durability as the inbox), then answers.

It prints the acknowledgement latency (median and worst), and how many events
per second were handled end to end, for each; and the ratios.

    .venv/bin/python bench/bench_inbox.py [--transactions 20] [--events 10] [--rooms 40]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bridge_kit.inbox.lanes import Inbox, InboxSettings  # noqa: E402
from bridge_kit.server.appservice_api import create_app, serve_app  # noqa: E402
from bridge_kit.store import open_store  # noqa: E402
from bridge_kit.types import Event  # noqa: E402

HS_TOKEN = "bench-hs-token"
PATH = "/_matrix/app/v1/transactions"
_PATIENT = aiohttp.ClientTimeout(total=600)


def transactions(count: int, events: int, rooms: int) -> list[dict[str, Any]]:
    bodies = []
    for t in range(count):
        batch = []
        for e in range(events):
            n = t * events + e
            batch.append({
                "type": "m.room.message", "room_id": f"!room{n % rooms}:bench.local",
                "event_id": f"$bench{n}", "sender": "@alice:bench.local",
                "origin_server_ts": 1_700_000_000_000 + n,
                "content": {"msgtype": "m.text", "body": f"message {n}"},
            })  # fmt: skip
        bodies.append({"events": batch})
    return bodies


async def push(port: int, bodies: list[dict[str, Any]]) -> list[float]:
    """Send the transactions one at a time; the acknowledgement latency of each."""
    headers = {"Authorization": f"Bearer {HS_TOKEN}"}
    latencies = []
    async with aiohttp.ClientSession() as http:
        for number, body in enumerate(bodies):
            started = time.perf_counter()
            url = f"http://127.0.0.1:{port}{PATH}/{number}"
            async with http.put(url, json=body, headers=headers, timeout=_PATIENT) as reply:
                if reply.status != 200:
                    raise RuntimeError(f"transaction {number}: HTTP {reply.status}")
                await reply.read()
            latencies.append(time.perf_counter() - started)
    return latencies


Run = Callable[[int, list[dict[str, Any]], Path], Awaitable[tuple[list[float], float]]]


async def run_inbox(
    port: int, bodies: list[dict[str, Any]], workdir: Path, handler_seconds: float
) -> tuple[list[float], float]:
    handled = 0
    total = sum(len(body["events"]) for body in bodies)
    all_handled = asyncio.Event()

    async def slow(event: Event) -> None:
        nonlocal handled
        await asyncio.sleep(handler_seconds)
        handled += 1
        if handled == total:
            all_handled.set()

    async with open_store(f"sqlite:///{workdir / 'inbox.db'}") as store:
        settings = InboxSettings(concurrency=32, poll=0.5)
        inbox = Inbox(store, lambda kind, type_: [slow], appservice_id="bench", settings=settings)
        await inbox.start()
        app = create_app(hs_token=HS_TOKEN, store=store, on_accepted=inbox.wake)
        async with served(app, port):
            started = time.perf_counter()
            latencies = await push(port, bodies)
            await all_handled.wait()
            elapsed = time.perf_counter() - started
        await inbox.stop()
    return latencies, total / elapsed


async def run_ack_after_handlers(
    port: int, bodies: list[dict[str, Any]], workdir: Path, handler_seconds: float
) -> tuple[list[float], float]:
    connection = durable_table(workdir / "after.db")

    async def transaction(request: web.Request) -> web.Response:
        body = json.loads(await request.read())
        for _event in body["events"]:
            await asyncio.sleep(handler_seconds)  # the handler, in order, before the answer
        connection.execute("INSERT INTO done (txn_id) VALUES (?)", (request.match_info["txn"],))
        return web.json_response({})

    app = web.Application()
    app.router.add_put(PATH + "/{txn}", transaction)
    async with served(app, port):
        started = time.perf_counter()
        latencies = await push(port, bodies)
        elapsed = time.perf_counter() - started
    total = sum(len(body["events"]) for body in bodies)
    return latencies, total / elapsed


async def run_bare_durable(
    port: int, bodies: list[dict[str, Any]], workdir: Path, handler_seconds: float
) -> tuple[list[float], float]:
    connection = durable_table(workdir / "bare.db")

    async def transaction(request: web.Request) -> web.Response:
        body = json.loads(await request.read())
        rows = [(json.dumps(event),) for event in body["events"]]
        connection.execute("BEGIN IMMEDIATE")
        connection.executemany("INSERT INTO inbox (event_json) VALUES (?)", rows)
        connection.execute("INSERT INTO done (txn_id) VALUES (?)", (request.match_info["txn"],))
        connection.execute("COMMIT")
        return web.json_response({})

    app = web.Application()
    app.router.add_put(PATH + "/{txn}", transaction)
    async with served(app, port):
        latencies = await push(port, bodies)
    return latencies, float("nan")  # it runs no handler


def durable_table(path: Path) -> sqlite3.Connection:
    connection = sqlite3.connect(path, isolation_level=None)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=NORMAL")
    connection.execute("CREATE TABLE inbox (id INTEGER PRIMARY KEY, event_json TEXT)")
    connection.execute("CREATE TABLE done (txn_id TEXT PRIMARY KEY)")
    return connection


@asynccontextmanager
async def served(app: web.Application, port: int) -> AsyncIterator[None]:
    runner = await serve_app(app, "127.0.0.1", port, shutdown_timeout=1.0)
    try:
        yield
    finally:
        await runner.cleanup()


def describe(name: str, latencies: list[float], rate: float) -> str:
    median = statistics.median(latencies) * 1000
    worst = max(latencies) * 1000
    handled = "no handler" if rate != rate else f"{rate:8.1f} events/s handled"
    return f"  {name:>19}: ack median {median:9.2f} ms, worst {worst:9.2f} ms, {handled}"


async def main(args: argparse.Namespace) -> None:
    from bridge_kit.testing.synapse import free_port

    bodies = transactions(args.transactions, args.events, args.rooms)
    # Acking after handlers takes handler_seconds per event; two transactions show it.
    slow_bodies = bodies[:2]
    print(
        f"{args.transactions} transactions of {args.events} events over {args.rooms} rooms, "
        f"handler sleeps {args.handler_seconds:g} s per event "
        f"(ack-after-handlers: the first {len(slow_bodies)} transactions only)"
    )
    with tempfile.TemporaryDirectory(prefix="bench-inbox-") as tmp:
        workdir = Path(tmp)
        results = {
            "bare-durable": await run_bare_durable(free_port(), bodies, workdir, 0),
            "inbox": await run_inbox(free_port(), bodies, workdir, args.handler_seconds),
            "ack-after-handlers": await run_ack_after_handlers(
                free_port(), slow_bodies, workdir, args.handler_seconds
            ),
        }
    for name, (latencies, rate) in results.items():
        print(describe(name, latencies, rate))
    inbox_ack = statistics.median(results["inbox"][0])
    bare_ack = statistics.median(results["bare-durable"][0])
    after_ack = statistics.median(results["ack-after-handlers"][0])
    print(f"ack latency, inbox / bare with the same durability: {inbox_ack / bare_ack:.2f}")
    print(f"ack latency, ack-after-handlers / inbox: {after_ack / inbox_ack:,.0f}x")
    speedup = results["inbox"][1] / results["ack-after-handlers"][1]
    print(f"events handled per second, inbox / ack-after-handlers: {speedup:.1f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transactions", type=int, default=20)
    parser.add_argument("--events", type=int, default=10)
    parser.add_argument("--rooms", type=int, default=40)
    parser.add_argument("--handler-seconds", type=float, default=1.0)
    asyncio.run(main(parser.parse_args()))

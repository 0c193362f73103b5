"""Events/s through ``PUT /_matrix/app/v1/transactions``: bridge_kit vs a bare aiohttp handler.

Each run starts a fresh server in a subprocess (so the load generator and the
server do not share one event loop) and pushes transactions of 100 events from
several concurrent senders over loopback:

- ``bridge``: bridge_kit's app (auth, JSON parsing into attrs models, SQLite
  dedup lookup and durable dedup record, metrics) with a handler that does nothing;
- ``bare``: an aiohttp handler that reads the body and answers ``{}`` (the target's baseline);
- ``bare-json``: the same, but it also decodes the JSON body, the least any appservice must do
  (shown for context: it separates bridge_kit's own cost from JSON decoding).

The two alternate for a few rounds; the medians are compared.

    .venv/bin/python bench/bench_transactions.py [--rounds 5] [--senders 4] [--transactions 400]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from aiohttp import web

HS_TOKEN = "bench-hs-token"
EVENTS_PER_TRANSACTION = 100
ROOT = str(Path(__file__).resolve().parent.parent)
KINDS = ("bridge", "bare", "bare-json")


# -- server side (runs in the subprocess) -------------------------------------------


async def serve_bare(port: int, *, decode: bool) -> None:
    async def transaction(request: web.Request) -> web.Response:
        body = await request.read()
        if decode:
            json.loads(body)
        return web.json_response({})

    app = web.Application(client_max_size=10 * 1024 * 1024)
    app.router.add_put("/_matrix/app/v1/transactions/{txnId}", transaction)
    app.router.add_get("/_bridge_kit/health", lambda _: web.json_response({}))
    await run_forever(app, port)


async def serve_bridge(port: int, db: Path) -> None:
    from bridge_kit.metrics import Metrics
    from bridge_kit.server import create_app
    from bridge_kit.store import open_store
    from bridge_kit.types import Transaction

    async def handler(transaction: Transaction) -> None:
        pass

    async with open_store(f"sqlite:///{db}") as store:
        app = create_app(hs_token=HS_TOKEN, store=store, on_transaction=handler, metrics=Metrics())
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


async def push(port: int, senders: int, transactions: int, body: bytes) -> float:
    """Send ``transactions`` transactions from ``senders`` senders; return events/s."""
    base = f"http://127.0.0.1:{port}/_matrix/app/v1/transactions"
    headers = {"Authorization": f"Bearer {HS_TOKEN}", "Content-Type": "application/json"}
    next_id = iter(range(transactions))
    connector = aiohttp.TCPConnector(limit=senders)

    async def sender(session: aiohttp.ClientSession) -> None:
        for txn_id in next_id:
            async with session.put(f"{base}/{txn_id}", data=body, headers=headers) as response:
                if response.status != 200:
                    raise RuntimeError(f"txn {txn_id}: {response.status} {await response.text()}")
                await response.read()

    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.perf_counter()
        await asyncio.gather(*(sender(session) for _ in range(senders)))
        elapsed = time.perf_counter() - started
    return transactions * EVENTS_PER_TRANSACTION / elapsed


async def wait_ready(port: int) -> None:
    async with asyncio.timeout(30), aiohttp.ClientSession() as session:
        while True:
            try:
                async with session.get(f"http://127.0.0.1:{port}/_bridge_kit/health") as response:
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


async def one_run(kind: str, args: argparse.Namespace, body: bytes, workdir: Path) -> float:
    port = free_port()
    db = workdir / f"bench-{kind}-{time.monotonic_ns()}.db"
    command = [sys.executable, __file__, "--serve", kind, "--port", str(port), "--db", str(db)]
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    server = await asyncio.create_subprocess_exec(*command, env=env)
    try:
        await wait_ready(port)
        # A short warm-up so every server has its imports and caches hot.
        await push(port, args.senders, args.senders * 4, body)
        return await push(port, args.senders, args.transactions, body)
    finally:
        server.terminate()
        await server.wait()


async def main(args: argparse.Namespace) -> None:
    body = transaction_body()
    rates: dict[str, list[float]] = {kind: [] for kind in KINDS}
    print(
        f"{args.rounds} rounds x {args.transactions} transactions x {EVENTS_PER_TRANSACTION} "
        f"events ({len(body)} bytes each), {args.senders} concurrent senders, loopback"
    )
    with tempfile.TemporaryDirectory(prefix="bk-bench-") as tmp:
        for round_number in range(args.rounds):
            # Alternate the order so drift in machine load hits every kind alike.
            order = KINDS if round_number % 2 == 0 else KINDS[::-1]
            for kind in order:
                rate = await one_run(kind, args, body, Path(tmp))
                rates[kind].append(rate)
                print(f"  round {round_number + 1} {kind:>9}: {rate:>10,.0f} events/s")
    bridge, bare, bare_json = (statistics.median(rates[kind]) for kind in KINDS)
    print(f"median bridge_kit (SQLite dedup):     {bridge:>10,.0f} events/s")
    print(f"median bare aiohttp handler:          {bare:>10,.0f} events/s")
    print(f"median bare handler + JSON decoding:  {bare_json:>10,.0f} events/s")
    print(f"ratio bridge_kit / bare: {bridge / bare:.2f} (target >= 0.70)")
    print(f"ratio bridge_kit / bare + JSON decoding: {bridge / bare_json:.2f}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--senders", type=int, default=4)
    parser.add_argument("--transactions", type=int, default=400, help="per run")
    parser.add_argument("--serve", choices=KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--db", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args()


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.serve in ("bare", "bare-json"):
        asyncio.run(serve_bare(arguments.port, decode=arguments.serve == "bare-json"))
    elif arguments.serve == "bridge":
        asyncio.run(serve_bridge(arguments.port, arguments.db))
    else:
        asyncio.run(main(arguments))

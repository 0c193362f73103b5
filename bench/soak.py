"""Soak: many events through a real daemon; do its memory and its store stay flat?

A bridge_kit daemon (an ``AppService`` serving the appservice API over HTTP, on a
SQLite store, with one event handler) runs in its own process. This process plays
Synapse: it answers the daemon's start-up ``whoami`` and pushes transactions of
``--per-txn`` room events spread over ``--rooms`` rooms, one at a time, each sent
once its answer came (as Synapse sends), each also carrying one device's
one-time-key count (superseded by the next while it waits). As the daemon
acknowledges far faster than it handles, sending pauses while more than
``--max-backlog`` events wait (a homeserver's rooms produce events at their own
pace; an unbounded backlog would measure the backlog, not the retention). The handler fails one
event in ``--fail-every``; with ``handler_attempts: 1`` each becomes a dead letter,
which retention (``dead_letters_keep``, every ``retention_interval`` seconds) keeps
bounded.

At the start (after the first ``--warmup`` events), the middle and the end (every
event sent, the inbox drained and a retention round run), it prints the daemon's
RSS and the store's size (database + WAL), with the inbox depth and dead letters.
Flat means: the end is within noise of the middle.

    .venv/bin/python bench/soak.py [--events 1000000] [--rooms 10000] [--per-txn 100]

A reduced run: ``--events 100000``. The full run's time is about ten times that one's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web

HS_TOKEN = "soak-hs-token"
AS_TOKEN = "soak-as-token"
SERVER_NAME = "soak.example"
BOT = "soakbot"
ROOT = str(Path(__file__).resolve().parent.parent)


# -- the daemon (runs in the subprocess) ----------------------------------------------------


def serve(config_path: str, fail_every: int) -> None:
    """Run the daemon with one handler until SIGTERM (``run_app`` handles signals)."""
    from bridge_kit.app.runner import run_app
    from bridge_kit.app.service import AppService
    from bridge_kit.config import Config
    from bridge_kit.logs import configure_logging
    from bridge_kit.types import Event

    config = Config.load(config_path)
    # Each dead letter is logged at ERROR; the soak makes them on purpose.
    configure_logging("CRITICAL", "text")
    app = AppService(config, ping=False)

    @app.on_event("m.room.message")
    async def on_message(event: Event) -> None:
        if fail_every and event.content.get("n", 1) % fail_every == 0:
            raise RuntimeError("the remote network refused this one")

    sys.exit(run_app(app))


# -- the homeserver's side (this process) ---------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def fake_homeserver(port: int) -> web.AppRunner:
    """Answers ``whoami`` for the appservice, which is all its start asks."""

    async def whoami(_: web.Request) -> web.Response:
        return web.json_response({"user_id": f"@{BOT}:{SERVER_NAME}"})

    app = web.Application()
    app.router.add_get("/_matrix/client/v3/account/whoami", whoami)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


def write_files(workdir: Path, hs_port: int, as_port: int, args: argparse.Namespace) -> Path:
    registration = {
        "id": "soak",
        "url": f"http://127.0.0.1:{as_port}",
        "as_token": AS_TOKEN,
        "hs_token": HS_TOKEN,
        "sender_localpart": BOT,
        "namespaces": {"users": [{"exclusive": True, "regex": f"@soak_.*:{SERVER_NAME}"}]},
    }
    (workdir / "registration.yaml").write_text(yaml.safe_dump(registration))
    config = {
        "homeserver": {"url": f"http://127.0.0.1:{hs_port}", "domain": SERVER_NAME},
        "appservice": {
            "registration": "registration.yaml",
            "port": as_port,
            "store": "sqlite:///soak.db",
            "handler_attempts": 1,
            "retention_interval": args.retention_interval,
            "dead_letters_keep": args.dead_letters_keep,
        },
    }
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def transaction(first: int, per_txn: int, rooms: int) -> bytes:
    events = [
        {
            "type": "m.room.message",
            "event_id": f"$soak_{n}",
            "room_id": f"!room{n % rooms}:{SERVER_NAME}",
            "sender": f"@alice:{SERVER_NAME}",
            "origin_server_ts": 1_700_000_000_000 + n,
            "content": {"msgtype": "m.text", "body": f"soak message {n}", "n": n},
        }
        for n in range(first, first + per_txn)
    ]
    counts = {f"@{BOT}:{SERVER_NAME}": {"SOAKDEV": {"signed_curve25519": first % 50}}}
    body = {"events": events, "org.matrix.msc3202.device_one_time_keys_count": counts}
    return json.dumps(body).encode()


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def file_mib(path: Path) -> float:
    return path.stat().st_size / 2**20 if path.exists() else 0.0


def inbox_counts(db: Path) -> tuple[int, int]:
    """Inbox depth and dead letters, read beside the daemon (WAL lets readers in)."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as conn:
        depth = conn.execute("SELECT COUNT(*) FROM bridge_kit_inbox").fetchone()[0]
        letters = conn.execute("SELECT COUNT(*) FROM bridge_kit_dead_letters").fetchone()[0]
    return int(depth), int(letters)


class Soak:
    def __init__(self, args: argparse.Namespace, as_port: int, db: Path, pid: int) -> None:
        self.args = args
        self.base = f"http://127.0.0.1:{as_port}/_matrix/app/v1/transactions"
        self.db = db
        self.wal = db.with_name(db.name + "-wal")
        self.pid = pid
        self.sent = 0
        self.started = time.perf_counter()

    def sample(self, label: str) -> dict[str, Any]:
        depth, letters = inbox_counts(self.db)
        row = {
            "at": label,
            "events_sent": self.sent,
            "seconds": round(time.perf_counter() - self.started, 1),
            "rss_mib": round(rss_mib(self.pid), 1),
            "store_mib": round(file_mib(self.db) + file_mib(self.wal), 1),
            "db_mib": round(file_mib(self.db), 1),
            "wal_mib": round(file_mib(self.wal), 1),
            "inbox_depth": depth,
            "dead_letters": letters,
        }
        print(json.dumps(row), flush=True)
        return row

    async def push_until(self, session: aiohttp.ClientSession, events: int) -> None:
        headers = {"Authorization": f"Bearer {HS_TOKEN}", "Content-Type": "application/json"}
        per_txn, rooms = self.args.per_txn, self.args.rooms
        while self.sent < events:
            body = transaction(self.sent, per_txn, rooms)
            async with session.put(f"{self.base}/{self.sent}", data=body, headers=headers) as r:
                if r.status != 200:
                    raise RuntimeError(f"txn {self.sent}: {r.status} {await r.text()}")
                await r.read()
            self.sent += per_txn
            if self.sent % (per_txn * 20) == 0:
                await self.within_backlog()

    async def within_backlog(self) -> None:
        """A homeserver sends no faster than its rooms produce events: past
        ``--max-backlog`` waiting events, pause until the daemon worked half off."""
        if inbox_counts(self.db)[0] <= self.args.max_backlog:
            return
        while inbox_counts(self.db)[0] > self.args.max_backlog // 2:  # noqa: ASYNC110
            await asyncio.sleep(0.2)

    async def drained(self) -> None:
        """Wait until the daemon handled (or buried) everything sent; polled, as the
        daemon is another process."""
        async with asyncio.timeout(self.args.drain_timeout):
            while inbox_counts(self.db)[0] > 0:  # noqa: ASYNC110
                await asyncio.sleep(0.5)


async def wait_ready(session: aiohttp.ClientSession, as_port: int, daemon: Any) -> None:
    async with asyncio.timeout(60):
        while True:
            if daemon.returncode is not None:
                raise RuntimeError(f"the daemon exited with {daemon.returncode}")
            try:
                url = f"http://127.0.0.1:{as_port}/_bridge_kit/health"
                async with session.get(url) as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.1)


async def main(args: argparse.Namespace) -> None:
    hs_port, as_port = free_port(), free_port()
    with tempfile.TemporaryDirectory(prefix="bk-soak-") as tmp:
        workdir = Path(tmp)
        config = write_files(workdir, hs_port, as_port, args)
        homeserver = await fake_homeserver(hs_port)
        env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
        command = [sys.executable, __file__, "--serve", str(config), "--fail-every"]
        daemon = await asyncio.create_subprocess_exec(
            *command, str(args.fail_every), env=env, cwd=workdir
        )
        try:
            async with aiohttp.ClientSession() as session:
                await wait_ready(session, as_port, daemon)
                soak = Soak(args, as_port, workdir / "soak.db", daemon.pid)
                await soak.push_until(session, args.warmup)
                start = soak.sample("start")
                await soak.push_until(session, args.events // 2)
                middle = soak.sample("middle")
                await soak.push_until(session, args.events)
                soak.sample("sent")
                await soak.drained()
                await asyncio.sleep(args.retention_interval * 1.5)  # one retention round
                end = soak.sample("end")
                summarise(args, start, middle, end)
        finally:
            daemon.terminate()
            await daemon.wait()
            await homeserver.cleanup()


def summarise(
    args: argparse.Namespace, start: dict[str, Any], middle: dict[str, Any], end: dict[str, Any]
) -> None:
    rate = end["events_sent"] / end["seconds"]
    print(
        f"{end['events_sent']} events over {args.rooms} rooms in {end['seconds']} s"
        f" ({rate:.0f} events/s acknowledged and handled)"
    )
    for key in ("rss_mib", "store_mib"):
        print(
            f"{key}: start {start[key]}, middle {middle[key]}, end {end[key]}"
            f" (end/middle {end[key] / middle[key]:.2f})"
        )
    print(
        f"dead letters kept: {end['dead_letters']} (cap {args.dead_letters_keep};"
        f" made: {args.events // args.fail_every if args.fail_every else 0})"
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--rooms", type=int, default=10_000)
    parser.add_argument("--per-txn", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=20_000, help="events before 'start'")
    parser.add_argument(
        "--max-backlog", type=int, default=20_000, help="events waiting before sending pauses"
    )
    parser.add_argument("--fail-every", type=int, default=1000, help="0: no handler fails")
    parser.add_argument("--dead-letters-keep", type=int, default=100)
    parser.add_argument("--retention-interval", type=float, default=5.0)
    parser.add_argument("--drain-timeout", type=float, default=3600.0)
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    return parser.parse_args()


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.serve:
        serve(arguments.serve, arguments.fail_every)
    else:
        asyncio.run(main(arguments))

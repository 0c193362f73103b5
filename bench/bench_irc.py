"""heisenbridge 1.15.4 and bridge_kit's IRC bridge side by side, on one Synapse and one miniircd.

One run starts a throw-away Synapse (SQLite, ``bench.local``, both bridges' registrations
loaded from the start, so both see the same homeserver configuration) and miniircd on a
free port, then runs each bridge in turn as a subprocess and measures, with IRC users on
raw asyncio sockets and a Matrix user on matrix-nio (``/sync``):

1. mirror: a channel already holds ``--members`` IRC users; the time from the bridge's
   own JOIN on IRC until the Matrix user sees all of them joined as puppets. Baselines,
   measured right before each bridge's mirror, as many fresh puppets into a public room:
   a bare ``PuppetRegistrar.join_many`` (ratio = baseline / bridge, target >= 0.85),
   ``sync_profiles`` (register, set the display name) then ``join_many``, and a bare
   ``join_many`` into a room the Matrix user is in, of an appservice the homeserver
   pushes the joins to (the bench answers it), timed until the Matrix user sees them:
   the homeserver's own work for a watched mirror. Also counted: how many puppets joined
   with their nick as display name;
2. IRC -> Matrix latency: one IRC user sends ``--messages`` lines, one at a time; each is
   timed until the Matrix user's /sync returns it (p50, p95);
3. Matrix -> IRC latency: the Matrix user sends as many messages, one at a time; each is
   timed until an IRC user in the channel reads it;
4. flood: ``--flood-users`` IRC users send ``--flood-lines`` lines in all, as fast as
   the socket takes them; lost, duplicated and out-of-order lines per sender are counted
   from what the Matrix user receives (heisenbridge merges a sender's consecutive lines
   into one event: bodies are split on newlines). Its fair baseline, while the IRC users
   are still there: the same lines as the same puppets into the same room, one event per
   line in the flood's order, one request at a time from a bare aiohttp loop, timed the
   same way (ratio = baseline / bridge);
5. peak RSS (``VmHWM``) of the bridge process at the end of its run.

How the two differ (what the table cannot say): heisenbridge is a bouncer, driven by its
owner's commands in a DM with its bot (ADDNETWORK, ADDSERVER, OPEN, NICK, CONNECT, JOIN);
its owner's Matrix messages leave from the owner's own IRC connection, and it mirrors a
channel's members only with ``SYNC --full`` (its default, ``half``, adds IRC users when
they join or talk). It paces its IRC output (a line costs 1.5 s once more than 5 lines
left within a second each), so Matrix -> IRC is measured with ``--gap`` between messages.
bridge_kit's IRC bridge bridges the channels in its config for everyone: a Matrix user
joins ``#irc_<channel>:<domain>`` and, without a login, her messages reach IRC through
the relay nick as ``<displayname> text``.

heisenbridge pins its own mautrix-python, so it runs from a separate virtualenv:

    python3.11 -m venv /tmp/heisen-venv && /tmp/heisen-venv/bin/pip install heisenbridge==1.15.4
    .venv/bin/python bench/bench_irc.py --heisenbridge /tmp/heisen-venv/bin/python \\
        [--messages 200] [--flood-users 20] [--flood-lines 1000] [--members 300]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import nio
import yaml
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bridge_kit.client.homeserver import HomeserverClient  # noqa: E402
from bridge_kit.puppets import PuppetRegistrar  # noqa: E402
from bridge_kit.registration import Registration, generate_registration  # noqa: E402
from bridge_kit.store import SQLiteStore  # noqa: E402
from bridge_kit.testing.synapse import SynapseServer, free_port  # noqa: E402

SERVER = "bench.local"
BASE_PREFIX = "_base_"
WATCH_PREFIX = "_watch_"  # the watched baseline's puppets, of an appservice the bench serves
HB_PREFIX = "hb_"  # heisenbridge's puppets: @hb_<network>_<nick>
HB_NETWORK = "bench"
BK_PREFIX = "irc_"  # bridge_kit's: @irc_<nick>
LINE_SIZE = 80  # every bench line is padded to this many characters
USER = "bench_user"
DISPLAYNAME = "Alice"
WAIT = 60.0  # default limit for a single step
T = TypeVar("T")


class BenchError(Exception):
    """A step did not happen in time or a process died: one line for the report."""


def padded(text: str) -> str:
    return (text + " " + "x" * LINE_SIZE)[:LINE_SIZE]


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


async def within(seconds: float, what: str, awaitable: Any) -> Any:
    try:
        return await asyncio.wait_for(awaitable, seconds)
    except TimeoutError:
        raise BenchError(f"{what}: nothing within {seconds:.0f} s") from None


# -- IRC users on raw sockets ------------------------------------------------------------


@dataclass
class IrcLine:
    prefix_nick: str
    command: str
    params: list[str]
    at: float


def parse_irc(raw: str, at: float) -> IrcLine:
    nick = ""
    if raw.startswith(":"):
        prefix, _, raw = raw[1:].partition(" ")
        nick = prefix.split("!", 1)[0]
    trailing = None
    if " :" in raw:
        raw, trailing = raw.split(" :", 1)
    words = raw.split()
    params = words[1:] + ([trailing] if trailing is not None else [])
    return IrcLine(nick, words[0].upper() if words else "", params, at)


class IrcUser:
    """One IRC client: registers, joins, answers PING, keeps what it reads."""

    def __init__(self, nick: str) -> None:
        self.nick = nick
        self.lines: list[IrcLine] = []
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None
        self._tick = asyncio.Event()

    async def connect(self, port: int) -> None:
        self._reader, self._writer = await asyncio.open_connection("127.0.0.1", port)
        self._task = asyncio.create_task(self._read())
        self.send(f"NICK {self.nick}", f"USER {self.nick} 0 * :{self.nick}")
        await self.until(lambda: self._seen("001"), f"IRC {self.nick}: welcome (001)")

    def send(self, *lines: str) -> None:
        assert self._writer is not None
        self._writer.write("".join(f"{line}\r\n" for line in lines).encode())

    async def drain(self) -> None:
        assert self._writer is not None
        await self._writer.drain()

    async def join(self, channel: str) -> None:
        self.send(f"JOIN {channel}")
        await self.until(lambda: self._seen("366", channel), f"IRC {self.nick}: join {channel}")

    def privmsg(self, channel: str, text: str) -> None:
        self.send(f"PRIVMSG {channel} :{text}")

    def messages(self, channel: str) -> list[IrcLine]:
        return [ln for ln in self.lines if ln.command == "PRIVMSG" and ln.params[0] == channel]

    def sees_in(self, nick: str, channel: str) -> bool:
        """Whether ``nick`` joined ``channel`` or was in its member list (NAMES)."""
        for line in self.lines:
            if line.command == "JOIN" and line.prefix_nick == nick and channel in line.params:
                return True
            names = line.params[-1].split() if line.command == "353" else []
            if channel in line.params and nick in (word.lstrip("~&@%+") for word in names):
                return True
        return False

    def _seen(self, command: str, param: str | None = None) -> bool:
        return any(
            ln.command == command and (param is None or param in ln.params) for ln in self.lines
        )

    async def until(self, check: Callable[[], T | None], what: str, seconds: float = WAIT) -> T:
        deadline = time.monotonic() + seconds
        while True:
            tick = self._tick
            if result := check():
                return result
            if self._task is not None and self._task.done():
                raise BenchError(f"{what}: the IRC connection closed")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BenchError(f"{what}: nothing within {seconds:.0f} s")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(tick.wait(), remaining)

    async def _read(self) -> None:
        assert self._reader is not None
        while raw := await self._reader.readline():
            line = parse_irc(raw.decode(errors="replace").rstrip("\r\n"), time.perf_counter())
            if line.command == "PING":
                self.send(f"PONG :{line.params[-1] if line.params else ''}")
                continue
            self.lines.append(line)
            self._tick.set()
            self._tick = asyncio.Event()

    async def close(self) -> None:
        if self._writer is not None:
            with contextlib.suppress(OSError):
                self.send("QUIT :bench done")
                self._writer.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task


async def irc_crowd(port: int, nicks: list[str], channel: str) -> list[IrcUser]:
    """Connect and join many IRC users, 20 at a time."""
    users = [IrcUser(nick) for nick in nicks]
    gate = asyncio.Semaphore(20)

    async def one(user: IrcUser) -> None:
        async with gate:
            await user.connect(port)
            await user.join(channel)

    await asyncio.gather(*(one(user) for user in users))
    return users


# -- the Matrix user (matrix-nio) --------------------------------------------------------


@dataclass
class Seen:
    room_id: str
    sender: str
    body: str
    msgtype: str
    at: float


@dataclass
class MatrixUser:
    """A real user syncing in the background; accepts every invite it gets."""

    client: nio.AsyncClient
    messages: list[Seen] = field(default_factory=list)
    members: dict[str, dict[str, str]] = field(default_factory=dict)  # room -> user -> membership
    names: dict[str, dict[str, str]] = field(default_factory=dict)  # room -> user -> displayname
    invites: list[str] = field(default_factory=list)  # in the order they came
    joined: set[str] = field(default_factory=set)
    _tick: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Task[None] | None = None
    _joining: set[asyncio.Task[str]] = field(default_factory=set)

    @classmethod
    async def start(cls, hs: SynapseServer) -> MatrixUser:
        token = await hs.create_user(USER)
        client = nio.AsyncClient(hs.url, f"@{USER}:{SERVER}")
        client.restore_login(f"@{USER}:{SERVER}", "BENCH", token)
        await client.set_displayname(DISPLAYNAME)
        user = cls(client)
        await user._sync_once(wait_ms=0)
        user._task = asyncio.create_task(user._sync_forever())
        return user

    @property
    def user_id(self) -> str:
        return str(self.client.user_id)

    async def _sync_forever(self) -> None:
        while True:
            await self._sync_once(wait_ms=10_000)

    async def _sync_once(self, wait_ms: int) -> None:
        reply = await self.client.sync(timeout=wait_ms)
        now = time.perf_counter()
        if not isinstance(reply, nio.SyncResponse):
            await asyncio.sleep(0.5)
            return
        for room_id in reply.rooms.invite:
            if room_id not in self.invites:
                self.invites.append(room_id)
                task = asyncio.create_task(self.join(room_id))
                self._joining.add(task)
                task.add_done_callback(self._joining.discard)
        for room_id, room in reply.rooms.join.items():
            self.joined.add(room_id)
            for event in [*room.state, *room.timeline.events]:
                self._take(room_id, event.source, now)
        self._tick.set()
        self._tick = asyncio.Event()

    def _take(self, room_id: str, source: dict[str, Any], now: float) -> None:
        content = source.get("content") or {}
        if source.get("type") == "m.room.member":
            self.members.setdefault(room_id, {})[source["state_key"]] = str(
                content.get("membership")
            )
            self.names.setdefault(room_id, {})[source["state_key"]] = str(
                content.get("displayname") or ""
            )
        elif source.get("type") == "m.room.message" and isinstance(content.get("body"), str):
            self.messages.append(
                Seen(room_id, source["sender"], content["body"], content.get("msgtype", ""), now)
            )

    async def join(self, room: str, retry_for: float = 0.0) -> str:
        deadline = time.monotonic() + retry_for
        while True:
            reply = await self.client.join(room)
            if isinstance(reply, nio.JoinResponse):
                return str(reply.room_id)
            if time.monotonic() > deadline:
                raise BenchError(f"Matrix user could not join {room}: {reply}")
            await asyncio.sleep(0.2)

    async def send(self, room_id: str, body: str) -> None:
        content = {"msgtype": "m.text", "body": body}
        reply = await self.client.room_send(room_id, "m.room.message", content)
        if not isinstance(reply, nio.RoomSendResponse):
            raise BenchError(f"Matrix user could not send to {room_id}: {reply}")

    async def until(self, check: Callable[[], T | None], what: str, seconds: float = WAIT) -> T:
        deadline = time.monotonic() + seconds
        while True:
            tick = self._tick
            if result := check():
                return result
            if self._task is not None and self._task.done():
                raise BenchError(f"{what}: the Matrix user's sync loop stopped")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BenchError(f"{what}: nothing within {seconds:.0f} s")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(tick.wait(), remaining)

    def joined_with(self, room_id: str, users: list[str]) -> int:
        members = self.members.get(room_id, {})
        return sum(1 for user in users if members.get(user) == "join")

    def notices_after(self, room_id: str, start: int) -> list[str]:
        return [m.body for m in self.messages[start:] if m.room_id == room_id]

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        await self.client.close()


# -- processes ----------------------------------------------------------------------------


class Process:
    """A subprocess in its own session, its output in a log file; stopped for sure."""

    def __init__(
        self, name: str, command: list[str], log: Path, cwd: Path, env: dict[str, str] | None = None
    ) -> None:
        self.name, self.command, self.log, self.cwd = name, command, log, cwd
        self.env = env
        self._process: asyncio.subprocess.Process | None = None
        self._log_file: Any = None

    async def start(self) -> None:
        self._log_file = self.log.open("wb")
        self._process = await asyncio.create_subprocess_exec(
            *self.command,
            cwd=self.cwd,
            env=self.env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def started(self) -> bool:
        return self._process is not None

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    def check_alive(self) -> None:
        if self._process is not None and self._process.returncode is not None:
            raise BenchError(f"{self.name} exited with {self._process.returncode}: {self.tail()}")

    def tail(self, lines: int = 5) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return " | ".join(text.strip().splitlines()[-lines:]) + f" (log: {self.log})"

    def peak_rss_mb(self) -> float:
        """The process's high-water resident set (VmHWM), in MB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        raise BenchError(f"{self.name}: no VmHWM in /proc/{self.pid}/status")

    async def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), 10)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                await process.wait()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None


@contextlib.asynccontextmanager
async def running(process: Process) -> AsyncIterator[Process]:
    try:
        await process.start()
        yield process
    finally:
        await process.stop()


async def wait_for_port(port: int, what: str, process: Process, seconds: float = WAIT) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        process.check_alive()
        with contextlib.suppress(OSError):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        await asyncio.sleep(0.1)
    raise BenchError(f"{what} did not listen on port {port} within {seconds:.0f} s")


# -- the baseline: a bare join_many --------------------------------------------------------


async def watched_baseline(
    hs: SynapseServer, registration: Registration, matrix: MatrixUser, count: int, tag: str,
    work: Path,
) -> float:  # fmt: skip
    """Seconds until the Matrix user sees ``count`` fresh puppets joined to a room she is
    in, by a bare ``join_many`` of an appservice that the homeserver pushes their joins
    to (the bench answers it): the homeserver's work for a mirror, without a bridge."""
    token = await hs.create_user(f"watch_owner_{tag}")
    async with HomeserverClient(hs.url, token) as owner:
        body = {"preset": "public_chat"}
        room = (await owner.request("POST", "/_matrix/client/v3/createRoom", body=body))["room_id"]
    await matrix.join(room)
    await matrix.until(lambda: room in matrix.joined, "the Matrix user in the watched room")
    puppets = [f"{WATCH_PREFIX}{tag}_{i:04d}" for i in range(count)]
    users = [f"@{lp}:{SERVER}" for lp in puppets]
    async with (
        HomeserverClient(hs.url, registration.as_token) as client,
        SQLiteStore(work / f"watched-{tag}.db") as store,
    ):
        registrar = PuppetRegistrar(client, store, registration, SERVER)
        started = time.perf_counter()
        joined = await registrar.join_many([(lp, room) for lp in puppets])
        await matrix.until(
            lambda: matrix.joined_with(room, users) >= count, "the watched baseline's joins"
        )
        seconds = time.perf_counter() - started
    if joined.joined != count:
        raise BenchError(f"watched baseline join_many: {joined.summary()}")
    return seconds


@contextlib.asynccontextmanager
async def answering_appservice(port: int) -> AsyncIterator[None]:
    """An appservice that takes every transaction (the watched baseline's)."""

    async def accept(request: web.Request) -> web.Response:
        return web.json_response({})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", accept)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield
    finally:
        await runner.cleanup()


async def baselines(
    hs: SynapseServer, registration: Registration, count: int, tag: str, work: Path
) -> tuple[float, float]:
    """Seconds for ``count`` fresh puppets to join a fresh public room: with a bare
    ``join_many`` (it registers them first), and with ``sync_profiles`` (register and
    set the display name) before it, which is what a mirror must send at least."""
    token = await hs.create_user(f"base_owner_{tag}")
    async with HomeserverClient(hs.url, token) as owner:
        body = {"preset": "public_chat"}
        room = (await owner.request("POST", "/_matrix/client/v3/createRoom", body=body))["room_id"]
    async with (
        HomeserverClient(hs.url, registration.as_token) as client,
        SQLiteStore(work / f"baseline-{tag}.db") as store,
    ):
        registrar = PuppetRegistrar(client, store, registration, SERVER)
        bare = [f"{BASE_PREFIX}{tag}_{i:04d}" for i in range(count)]
        started = time.perf_counter()
        joined = await registrar.join_many([(lp, room) for lp in bare])
        bare_seconds = time.perf_counter() - started
        named = [f"{BASE_PREFIX}{tag}p_{i:04d}" for i in range(count)]
        started = time.perf_counter()
        profiles = await registrar.sync_profiles([(lp, f"nick{i}", None) for i, lp in
                                                  enumerate(named)])  # fmt: skip
        joined_named = await registrar.join_many([(lp, room) for lp in named])
        named_seconds = time.perf_counter() - started
    for what, result in (("join_many", joined), ("after sync_profiles", joined_named)):
        if result.joined != count:
            raise BenchError(f"baseline {what}: {result.summary()}")
    if profiles.failed:
        raise BenchError(f"baseline sync_profiles: {profiles.summary()}")
    return bare_seconds, named_seconds


# -- the measurements, common to both bridges ----------------------------------------------


@dataclass
class Side:
    """What a measurement needs to know about one bridge's set-up."""

    name: str
    tag: str  # nick and channel prefix on IRC, distinct per bridge
    puppet_prefix: str  # @... of this bridge's puppets of IRC users
    lobby: str  # IRC channel for latency and flood
    lobby_room: str  # its Matrix room
    process: Process
    irc_nick: str  # the bridge's own IRC connection (heisenbridge: the owner's)
    # how a Matrix line looks on IRC, so it can be found by its text
    irc_text: Callable[[str], str]
    homeserver: str = ""  # for the flood's bare baseline: as the bridge's puppets
    as_token: str = ""

    def puppet(self, nick: str) -> str:
        return f"{self.puppet_prefix}{nick.lower()}:{SERVER}"


async def latency_irc_to_matrix(
    side: Side, matrix: MatrixUser, talker: IrcUser, count: int, gap: float
) -> list[float]:
    latencies = []
    for i in range(count):
        text = padded(f"i2m {side.tag} {i:04d}")
        start = len(matrix.messages)
        sent = time.perf_counter()
        talker.privmsg(side.lobby, text)
        await talker.drain()

        def arrived(start: int = start, text: str = text) -> Seen | None:
            return next(
                (m for m in matrix.messages[start:] if m.room_id == side.lobby_room
                 and text in m.body.split("\n")),
                None,
            )  # fmt: skip

        seen = await matrix.until(arrived, f"{side.name}: IRC line {i} on Matrix")
        latencies.append(seen.at - sent)
        side.process.check_alive()
        await asyncio.sleep(gap)
    return latencies


async def latency_matrix_to_irc(
    side: Side, matrix: MatrixUser, listener: IrcUser, count: int, gap: float
) -> list[float]:
    latencies = []
    for i in range(count):
        text = padded(f"m2i {side.tag} {i:04d}")
        start = len(listener.lines)
        sent = time.perf_counter()
        await matrix.send(side.lobby_room, text)
        expected = side.irc_text(text)

        def arrived(start: int = start, expected: str = expected) -> IrcLine | None:
            return next(
                (ln for ln in listener.lines[start:] if ln.command == "PRIVMSG"
                 and ln.params[-1] == expected),
                None,
            )  # fmt: skip

        line = await listener.until(arrived, f"{side.name}: Matrix message {i} on IRC")
        latencies.append(line.at - sent)
        side.process.check_alive()
        await asyncio.sleep(gap)
    return latencies


def latency_figures(latencies: list[float]) -> dict[str, Any]:
    return {
        "count": len(latencies),
        "p50_ms": percentile(latencies, 0.5) * 1000,
        "p95_ms": percentile(latencies, 0.95) * 1000,
        "max_ms": max(latencies) * 1000,
    }


async def flood(
    side: Side, matrix: MatrixUser, port: int, users: int, lines: int, settle: float
) -> dict[str, Any]:
    nicks = [f"{side.tag}fl{i:02d}" for i in range(users)]
    crowd = await irc_crowd(port, nicks, side.lobby)
    try:
        # Their puppets join first, so that the flood measures messages only.
        await matrix.until(
            lambda: all(
                matrix.members.get(side.lobby_room, {}).get(side.puppet(n)) == "join" for n in nicks
            ),
            f"{side.name}: the flood users' puppets in the room",
        )
        per_user = lines // users
        start = len(matrix.messages)
        sent = time.perf_counter()
        for seq in range(per_user):  # interleaved, as a busy channel is
            for user in crowd:
                user.privmsg(side.lobby, padded(f"flood {user.nick} {seq:04d}"))
        await asyncio.gather(*(user.drain() for user in crowd))
        figures = await lines_on_matrix(side, matrix, "flood", nicks, per_user, start, sent, settle)
        # While the IRC users are there: their quits would take the puppets out of the room.
        bare = await bare_flood(side, matrix, nicks, per_user, settle)
    finally:
        await asyncio.gather(*(user.close() for user in crowd))
    figures["bare_seconds"] = bare["seconds"]
    figures["bare_events"] = bare["matrix_events"]
    figures["ratio_to_bare"] = bare["seconds"] / figures["seconds"] if figures["seconds"] else 0.0
    return figures


async def bare_flood(
    side: Side, matrix: MatrixUser, nicks: list[str], per_user: int, settle: float
) -> dict[str, Any]:
    """The flood's fair baseline: the same lines as the same puppets into the same room,
    one event per line in the flood's order, one request at a time from a bare aiohttp
    loop (no store, no inbox); timed, as the flood, until the Matrix user has them all."""
    room = urllib.parse.quote(side.lobby_room, safe="")
    url = f"{side.homeserver}/_matrix/client/v3/rooms/{room}/send/m.room.message"
    headers = {"Authorization": f"Bearer {side.as_token}"}
    start = len(matrix.messages)
    sent = time.perf_counter()
    async with aiohttp.ClientSession(headers=headers) as session:
        for seq in range(per_user):
            for nick in nicks:
                content = {"msgtype": "m.text", "body": padded(f"bare {nick} {seq:04d}")}
                query = {"user_id": side.puppet(nick)}
                txn = f"bare-{nick}-{seq}-{secrets.token_hex(4)}"
                async with session.put(f"{url}/{txn}", params=query, json=content) as reply:
                    if reply.status != 200:
                        raise BenchError(f"bare flood: {reply.status} {await reply.text()}")
    return await lines_on_matrix(side, matrix, "bare", nicks, per_user, start, sent, settle)


async def lines_on_matrix(
    side: Side, matrix: MatrixUser, word: str, nicks: list[str], per_user: int, start: int,
    sent: float, settle: float,
) -> dict[str, Any]:  # fmt: skip
    """Wait until the Matrix user has ``word <nick> <seq>`` for every nick and seq (or
    nothing new came for ``settle`` seconds), and count what came."""
    expected = {(n, s) for n in nicks for s in range(per_user)}

    def received() -> list[tuple[str, int, float]]:
        found = []
        for m in matrix.messages[start:]:
            if m.room_id != side.lobby_room:
                continue
            for part in m.body.split("\n"):
                words = part.split()
                if len(words) >= 3 and words[0] == word and words[1] in nicks:
                    found.append((words[1], int(words[2]), m.at))
        return found

    last_count, last_change = -1, time.monotonic()
    while True:
        got = received()
        if {(n, s) for n, s, _ in got} >= expected:
            break
        if len(got) != last_count:
            last_count, last_change = len(got), time.monotonic()
        elif time.monotonic() - last_change > settle:
            break  # nothing new for a while: what is missing is lost
        side.process.check_alive()
        await asyncio.sleep(0.2)
    got = received()
    counts = Counter((n, s) for n, s, _ in got)
    out_of_order, highest = 0, dict.fromkeys(nicks, -1)
    for nick, seq, _ in got:
        if seq < highest[nick]:
            out_of_order += 1
        highest[nick] = max(highest[nick], seq)
    seconds = max((at for _, _, at in got), default=sent) - sent
    return {
        "lines": len(expected),
        "users": len(nicks),
        "lost": len(expected - set(counts)),
        "duplicated": sum(c - 1 for c in counts.values()),
        "out_of_order": out_of_order,
        "seconds": seconds,
        "lines_per_s": len(counts) / seconds if seconds > 0 else 0.0,
        "matrix_events": sum(1 for m in matrix.messages[start:]
                             if m.room_id == side.lobby_room and m.body.startswith(word)),
    }  # fmt: skip


# -- heisenbridge --------------------------------------------------------------------------


def heisenbridge_registration(path: Path, port: int) -> None:
    """The registration ``heisenbridge --generate`` writes, with its own prefix and port."""
    registration = {
        "id": "heisenbridge",
        "url": f"http://127.0.0.1:{port}",
        "as_token": secrets.token_hex(32),
        "hs_token": secrets.token_hex(32),
        "rate_limited": False,
        "sender_localpart": "heisenbridge",
        "namespaces": {
            "users": [{"regex": f"@{HB_PREFIX}.*", "exclusive": True}],
            "aliases": [],
            "rooms": [],
        },
    }
    path.write_text(yaml.safe_dump(registration))


class Heisenbridge:
    """Drives heisenbridge the way its owner does: commands in rooms with its bot."""

    def __init__(self, matrix: MatrixUser, process: Process) -> None:
        self.matrix = matrix
        self.process = process
        self.network_room = ""

    async def command(self, room_id: str, text: str, reply: str) -> None:
        start = len(self.matrix.messages)
        await self.matrix.send(room_id, text)
        await self.matrix.until(
            lambda: any(reply in body for body in self.matrix.notices_after(room_id, start)),
            f"heisenbridge: '{reply}' after {text}",
        )

    async def new_room(self, action: Any, what: str) -> str:
        """The room heisenbridge invites the owner to after ``action``, joined."""
        known = len(self.matrix.invites)
        await action
        room_id = await self.matrix.until(
            lambda: self.matrix.invites[known] if len(self.matrix.invites) > known else None,
            f"heisenbridge: invite to {what}",
        )
        await self.matrix.until(
            lambda: room_id in self.matrix.joined, f"heisenbridge: joining {what}"
        )
        return room_id

    async def set_up(self, irc_port: int, nick: str) -> None:
        control = await self.new_room(asyncio.sleep(0), "its control room")
        await self.command(control, f"ADDNETWORK {HB_NETWORK}", "Network added")
        await self.command(control, f"ADDSERVER {HB_NETWORK} 127.0.0.1 {irc_port}", "Server added")
        await self.command(control, "SYNC --full", "Member sync is set to full")
        self.network_room = await self.new_room(
            self.matrix.send(control, f"OPEN {HB_NETWORK}"), "the network room"
        )
        await self.command(self.network_room, f"NICK {nick}", "Nickname set")
        await self.command(self.network_room, "CONNECT", "Connecting to")
        await self.matrix.until(
            lambda: any(
                "001" in body or "Welcome" in body or "MOTD" in body
                for body in self.matrix.notices_after(self.network_room, 0)
            ),
            "heisenbridge: connected to IRC",
        )

    async def join_channel(self, channel: str) -> str:
        return await self.new_room(
            self.matrix.send(self.network_room, f"JOIN {channel}"), f"the room of {channel}"
        )


async def run_heisenbridge(
    args: argparse.Namespace, hs: SynapseServer, matrix: MatrixUser, irc_port: int,
    base: Registration, work: Path, hb_port: int, hb_registration: Path, figures: dict[str, Any],
    watch: Registration,
) -> None:  # fmt: skip
    command = [
        str(args.heisenbridge), "-m", "heisenbridge", "-c", str(hb_registration),
        "-o", matrix.user_id, "-l", "127.0.0.1", "-p", str(hb_port), hs.url,
    ]  # fmt: skip
    process = Process("heisenbridge", command, work / "heisenbridge.log", work)
    side = Side(
        "heisenbridge", "hb", f"@{HB_PREFIX}{HB_NETWORK}_", "#hblobby", "", process,
        irc_nick="hbowner", irc_text=lambda text: text, homeserver=hs.url,
        as_token=Registration.load(hb_registration).as_token,
    )  # fmt: skip
    async with running(process):
        await wait_for_port(hb_port, "heisenbridge", process)
        bridge = Heisenbridge(matrix, process)
        await bridge.set_up(irc_port, side.irc_nick)

        async def open_channel(channel: str, watcher: IrcUser) -> str:
            return await bridge.join_channel(channel)

        await measure(args, hs, matrix, irc_port, base, work, figures, side, open_channel, watch)


# -- bridge_kit's IRC bridge ------------------------------------------------------------------


def bridge_kit_config(hs: SynapseServer, irc_port: int, port: int, registration: Path,
                      work: Path, channels: list[str], log_level: str) -> Path:  # fmt: skip
    """The daemon's config plus ``irc``, as examples/irc_bridge/config.yaml.example has it."""
    config = {
        "homeserver": {"url": hs.url, "domain": SERVER},
        "appservice": {
            "registration": str(registration),
            "host": "127.0.0.1",
            "port": port,
            "store": f"sqlite:///{work / 'irc_bridge.db'}",
        },
        "logging": {"level": log_level},
        "bridge": {"permissions": {"*": "relay", SERVER: "user"}},
        "irc": {"server": f"127.0.0.1:{irc_port}", "nick": "bkrelay", "channels": channels},
    }
    path = work / "irc_bridge.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


async def run_bridge_kit(
    args: argparse.Namespace, hs: SynapseServer, matrix: MatrixUser, irc_port: int,
    base: Registration, work: Path, bk_port: int, bk_registration: Path, figures: dict[str, Any],
    watch: Registration,
) -> None:  # fmt: skip
    command = [sys.executable, str(ROOT / "examples" / "irc_bridge"), "-c", "irc_bridge.yaml"]
    # this checkout's bridge_kit, not whichever one the virtualenv has installed
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = Process("bridge_kit irc_bridge", command, work / "irc_bridge.log", work, env)
    side = Side(
        "bridge_kit", "bk", f"@{BK_PREFIX}", "#bklobby", "", process,
        irc_nick="bkrelay", irc_text=lambda text: f"<{DISPLAYNAME}> {text}", homeserver=hs.url,
        as_token=Registration.load(bk_registration).as_token,
    )  # fmt: skip
    # It bridges the channels of its config, from its start: both are there.
    bridge_kit_config(hs, irc_port, bk_port, bk_registration, work, ["#bkbig", side.lobby],
                      args.log_level)  # fmt: skip

    async def open_channel(channel: str, watcher: IrcUser) -> str:
        """Start the bridge (once); join the channel's alias once the relay is in it."""
        if not process.started:
            await process.start()
            await wait_for_port(bk_port, "bridge_kit's IRC bridge", process)
        await watcher.until(
            lambda: watcher.sees_in(side.irc_nick, channel), f"bridge_kit: its relay in {channel}"
        )
        # The relay's NAMES makes the portal; an alias query first would make it empty.
        await asyncio.sleep(1.0)
        alias = f"#{BK_PREFIX}{channel.lstrip('#')}:{SERVER}"
        # A join while the bridge is still making the room is refused: try again.
        return await matrix.join(alias, retry_for=args.mirror_timeout)

    try:
        await measure(args, hs, matrix, irc_port, base, work, figures, side, open_channel, watch)
    finally:
        await process.stop()


# -- one bridge, all figures ---------------------------------------------------------------------


async def measure(
    args: argparse.Namespace, hs: SynapseServer, matrix: MatrixUser, irc_port: int,
    base: Registration, work: Path, figures: dict[str, Any], side: Side,
    open_channel: Callable[[str, IrcUser], Awaitable[str]], watch: Registration,
) -> None:  # fmt: skip
    """All figures of one bridge; ``open_channel`` has it bridge a channel (starting the
    bridge first, if that is how it learns its channels) and returns the room."""
    name, process = side.name, side.process
    print(f"== {name}", flush=True)

    # 1. mirror a channel that already holds --members IRC users
    big = f"#{side.tag}big"
    print(f"   {args.members} IRC users join {big}; the bare join_many ...", flush=True)
    crowd = await irc_crowd(irc_port, [f"{side.tag}m{i:03d}" for i in range(args.members)], big)
    try:
        baseline, with_profiles = await baselines(hs, base, args.members, side.tag, work)
        watched = await watched_baseline(hs, watch, matrix, args.members, side.tag, work)
        print(f"   {name} bridges {big} ...", flush=True)
        asked = time.perf_counter()
        room = await within(
            args.mirror_timeout, f"{name}: opening {big}", open_channel(big, crowd[0])
        )
        # The crowd's puppets, by name: the bridge's bot may share their prefix.
        puppets = [side.puppet(user.nick) for user in crowd]
        await matrix.until(
            lambda: matrix.joined_with(room, puppets) >= args.members,
            f"{name}: {args.members} puppets in the room of {big}",
            seconds=args.mirror_timeout,
        )
        done = time.perf_counter()
        # Before the crowd quits (their leaves carry no name).
        names = matrix.names.get(room, {})
        named = sum(1 for user in crowd if names.get(side.puppet(user.nick)) == user.nick)
        bridge_joined = next(
            (ln.at for ln in crowd[0].lines
             if ln.command == "JOIN" and ln.prefix_nick == side.irc_nick),
            asked,
        )  # fmt: skip
    finally:
        await asyncio.gather(*(user.close() for user in crowd))
    mirror = done - bridge_joined
    figures["mirror"] = {
        "members": args.members,
        "seconds": mirror,
        "seconds_from_request": done - asked,
        "baseline_join_many_seconds": baseline,
        "ratio": baseline / mirror,
        "baseline_profiles_then_join_seconds": with_profiles,
        "ratio_to_profiles_then_join": with_profiles / mirror,
        "joined_with_their_nick": named,
        "baseline_watched_seconds": watched,
        "ratio_to_watched": watched / mirror,
    }
    print(
        f"   mirror: {mirror:.2f} s from the bridge's JOIN on IRC ({done - asked:.2f} s from "
        f"asking); bare join_many {baseline:.2f} s, ratio {baseline / mirror:.2f} "
        f"(target >= 0.85); sync_profiles + join_many {with_profiles:.2f} s, ratio "
        f"{with_profiles / mirror:.2f}; join_many into a watched room {watched:.2f} s, ratio "
        f"{watched / mirror:.2f}; {named} of {args.members} joined with their nick as name",
        flush=True,
    )

    # 2.-4. the lobby: a talker and a listener on IRC, the Matrix user in the room
    talker, listener = IrcUser(f"{side.tag}talker"), IrcUser(f"{side.tag}listen")
    try:
        for user in (talker, listener):
            await user.connect(irc_port)
            await user.join(side.lobby)
        side.lobby_room = await within(WAIT, f"{name}: opening {side.lobby}",
                                       open_channel(side.lobby, listener))  # fmt: skip
        await matrix.until(
            lambda: matrix.members.get(side.lobby_room, {}).get(
                side.puppet(talker.nick)) == "join",
            f"{name}: the talker's puppet in the room of {side.lobby}",
        )  # fmt: skip
        warm = min(10, args.messages)
        print(f"   warm-up: {warm} messages each way ...", flush=True)
        await latency_irc_to_matrix(side, matrix, talker, warm, args.gap)
        await latency_matrix_to_irc(side, matrix, listener, warm, args.gap)
        print(f"   IRC -> Matrix, {args.messages} messages ...", flush=True)
        i2m = await latency_irc_to_matrix(side, matrix, talker, args.messages, args.gap)
        figures["irc_to_matrix"] = latency_figures(i2m)
        print(f"   Matrix -> IRC, {args.messages} messages ...", flush=True)
        m2i = await latency_matrix_to_irc(side, matrix, listener, args.messages, args.gap)
        figures["matrix_to_irc"] = latency_figures(m2i)
        print(f"   flood: {args.flood_lines} lines from {args.flood_users} IRC users ...",
              flush=True)  # fmt: skip
        figures["flood"] = await flood(
            side, matrix, irc_port, args.flood_users, args.flood_lines, args.settle
        )
        fl = figures["flood"]
        print(
            f"   flood: {fl['seconds']:.1f} s ({fl['matrix_events']} events; lost / dup / out of "
            f"order {fl['lost']} / {fl['duplicated']} / {fl['out_of_order']}); the bare loop "
            f"{fl['bare_seconds']:.1f} s ({fl['bare_events']} events), ratio "
            f"{fl['ratio_to_bare']:.2f}",
            flush=True,
        )
    finally:
        await talker.close()
        await listener.close()
    process.check_alive()
    figures["peak_rss_mb"] = process.peak_rss_mb()


# -- driver ---------------------------------------------------------------------------------------


def table(results: dict[str, Any]) -> str:
    rows: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
        ("IRC -> Matrix p50 / p95 (ms)", lambda f: "{:.0f} / {:.0f}".format(
            f["irc_to_matrix"]["p50_ms"], f["irc_to_matrix"]["p95_ms"])),
        ("Matrix -> IRC p50 / p95 (ms)", lambda f: "{:.0f} / {:.0f}".format(
            f["matrix_to_irc"]["p50_ms"], f["matrix_to_irc"]["p95_ms"])),
        ("flood lost / dup / out of order", lambda f: "{} / {} / {}".format(
            f["flood"]["lost"], f["flood"]["duplicated"], f["flood"]["out_of_order"])),
        ("flood: all lines on Matrix (s)", lambda f: "{:.1f}".format(f["flood"]["seconds"])),
        ("bare loop, same events in order (s)", lambda f: "{:.1f}".format(
            f["flood"]["bare_seconds"])),
        ("flood speed vs the bare loop", lambda f: "{:.2f}x".format(
            f["flood"]["ratio_to_bare"])),
        ("mirror of a channel (s)", lambda f: "{:.2f}".format(f["mirror"]["seconds"])),
        ("bare join_many, same count (s)", lambda f: "{:.2f}".format(
            f["mirror"]["baseline_join_many_seconds"])),
        ("mirror speed vs join_many", lambda f: "{:.2f}x".format(f["mirror"]["ratio"])),
        ("sync_profiles + join_many (s)", lambda f: "{:.2f}".format(
            f["mirror"]["baseline_profiles_then_join_seconds"])),
        ("mirror speed vs those two", lambda f: "{:.2f}x".format(
            f["mirror"]["ratio_to_profiles_then_join"])),
        ("join_many, watched room (s)", lambda f: "{:.2f}".format(
            f["mirror"]["baseline_watched_seconds"])),
        ("mirror speed vs that", lambda f: "{:.2f}x".format(f["mirror"]["ratio_to_watched"])),
        ("mirror: puppets named as their nick", lambda f: "{}".format(
            f["mirror"]["joined_with_their_nick"])),
        ("peak RSS of the bridge (MB)", lambda f: "{:.0f}".format(f["peak_rss_mb"])),
    ]  # fmt: skip
    names = [n for n in ("heisenbridge", "bridge_kit") if n in results]
    width = max(len(label) for label, _ in rows)
    lines = [f"| {'':<{width}} | " + " | ".join(f"{n:>14}" for n in names) + " |"]
    lines.append(f"|{'-' * (width + 2)}|" + "|".join("-" * 16 for _ in names) + "|")
    for label, cell in rows:
        cells = []
        for name in names:
            figures = results[name]
            try:
                cells.append(f"{cell(figures):>14}")
            except (KeyError, TypeError):
                cells.append(f"{'error' if 'error' in figures else 'n/a':>14}")
        lines.append(f"| {label:<{width}} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def versions(args: argparse.Namespace) -> dict[str, str]:
    """What was measured: the commit of this checkout, Synapse's and heisenbridge's versions."""
    found = {"synapse": importlib.metadata.version("matrix-synapse")}
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        found["bridge_kit_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
            timeout=10, check=True,
        ).stdout.strip()  # fmt: skip
    if "heisenbridge" in args.bridges:
        found["heisenbridge"] = subprocess.run(
            [str(args.heisenbridge), "-m", "heisenbridge", "--version"],
            capture_output=True, text=True, timeout=60, check=True,
        ).stdout.strip()  # fmt: skip
    return found


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-irc-") as tmp:
        work = Path(tmp)
        hb_port, bk_port = free_port(), free_port()
        hb_registration = work / "heisenbridge-registration.yaml"
        heisenbridge_registration(hb_registration, hb_port)
        bk = generate_registration(
            "irc_bridge", f"http://127.0.0.1:{bk_port}", SERVER, BK_PREFIX, BK_PREFIX
        )
        bk_registration = work / "irc-registration.yaml"
        bk.write(bk_registration)
        base = generate_registration("bench_base", None, SERVER, BASE_PREFIX)
        base_registration = work / "base-registration.yaml"
        base.write(base_registration)
        watch_port = free_port()
        watch = generate_registration(
            "bench_watch", f"http://127.0.0.1:{watch_port}", SERVER, WATCH_PREFIX
        )
        watch_registration = work / "watch-registration.yaml"
        watch.write(watch_registration)
        irc_port = free_port()
        ircd = Process(
            "miniircd",
            [
                sys.executable,
                "-m",
                "miniircd",
                "--listen",
                "127.0.0.1",
                "--ports",
                str(irc_port),
                # miniircd refuses root unless told so (containers, CI)
                *(["--setuid", "root"] if os.getuid() == 0 else []),
            ],
            work / "miniircd.log",
            work,
        )
        print(f"starting Synapse and miniircd in {work} ...", flush=True)
        results: dict[str, Any] = {
            "messages": args.messages,
            "gap_s": args.gap,
            "line_size": LINE_SIZE,
            "versions": versions(args),
            "load_average_at_start": os.getloadavg(),
        }
        async with (
            SynapseServer(
                work / "synapse",
                registrations=[
                    hb_registration,
                    bk_registration,
                    base_registration,
                    watch_registration,
                ],
                server_name=SERVER,
            ) as hs,
            running(ircd),
            answering_appservice(watch_port),
        ):
            await wait_for_port(irc_port, "miniircd", ircd)
            matrix = await MatrixUser.start(hs)
            try:
                for name in args.bridges:
                    figures: dict[str, Any] = {}
                    results[name] = figures
                    try:
                        if name == "heisenbridge":
                            await run_heisenbridge(
                                args, hs, matrix, irc_port, base, work, hb_port, hb_registration,
                                figures, watch,
                            )  # fmt: skip
                        else:
                            await run_bridge_kit(
                                args, hs, matrix, irc_port, base, work, bk_port, bk_registration,
                                figures, watch,
                            )  # fmt: skip
                    except BenchError as error:
                        print(f"   error: {error}", flush=True)
                        figures["error"] = str(error)
            finally:
                await matrix.close()
            results["load_average_at_end"] = os.getloadavg()
            if args.keep_logs:
                shutil.copytree(work, args.keep_logs, dirs_exist_ok=True,
                                ignore=shutil.ignore_patterns("*.db*", "media_store"))  # fmt: skip
        return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=200, help="per direction and bridge")
    parser.add_argument("--flood-users", type=int, default=20)
    parser.add_argument("--flood-lines", type=int, default=1000, help="in all")
    parser.add_argument(
        "--members", type=int, default=300, help="IRC users in the mirrored channel"
    )
    parser.add_argument(
        "--gap", type=float, default=1.0,
        help="seconds between latency messages (heisenbridge paces faster IRC output)",
    )  # fmt: skip
    parser.add_argument(
        "--settle", type=float, default=30.0,
        help="a flood is over when nothing new arrived for this long",
    )  # fmt: skip
    parser.add_argument("--mirror-timeout", type=float, default=600.0)
    parser.add_argument(
        "--heisenbridge", type=Path,
        default=Path(os.environ.get("HEISENBRIDGE_PYTHON", "heisenbridge-venv/bin/python")),
        help="the python of a virtualenv with heisenbridge 1.15.4 (or $HEISENBRIDGE_PYTHON)",
    )  # fmt: skip
    parser.add_argument(
        "--bridges", default="heisenbridge,bridge_kit",
        type=lambda text: [name.strip() for name in text.split(",") if name.strip()],
        help="which to run, in this order (heisenbridge, bridge_kit)",
    )  # fmt: skip
    parser.add_argument(
        "--json", type=Path, default=ROOT / "bench" / "results" / "bench_irc.json",
        help="also write the figures to this file",
    )  # fmt: skip
    parser.add_argument("--keep-logs", type=Path, help="copy the bridges' logs here")
    parser.add_argument("--log-level", default="WARNING", help="bridge_kit's bridge's logging")
    args = parser.parse_args()
    unknown = set(args.bridges) - {"heisenbridge", "bridge_kit"}
    if unknown:
        parser.error(f"unknown bridge(s): {', '.join(sorted(unknown))}")
    if "heisenbridge" in args.bridges and not args.heisenbridge.exists():
        parser.error(
            f"no heisenbridge python at {args.heisenbridge}: install heisenbridge==1.15.4 "
            "in a virtualenv and pass its python with --heisenbridge"
        )
    try:
        results = asyncio.run(bench(args))
    except BenchError as error:
        sys.exit(f"error: {error}")
    print()
    print(table(results))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nfigures written to {args.json}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()

"""One IRC connection: registration, keep-alive, channel members, paced sending,
and reconnecting with backoff. What happens on IRC comes out as :data:`IrcEvent`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable

import attrs

from .protocol import LINE_LIMIT, PREFIX_ROOM, STATUS_PREFIXES, Line, ctcp_action, split_text

__all__ = [
    "Connected",
    "Disconnected",
    "IrcConnection",
    "IrcEvent",
    "Joined",
    "Left",
    "Names",
    "Renamed",
    "Said",
    "Topic",
]

log = logging.getLogger("irc_bridge.client")

#: Seconds without a line from the server before we PING it, and before we give up.
IDLE_PING, IDLE_DEAD = 90.0, 180.0
#: Reconnect backoff: first wait, longest wait (seconds).
BACKOFF_FIRST, BACKOFF_MAX = 1.0, 60.0


@attrs.frozen
class Said:
    """A PRIVMSG or NOTICE; ``target`` is a channel or our own nick (a private message)."""

    target: str
    nick: str
    text: str
    action: bool = False
    notice: bool = False


@attrs.frozen
class Joined:
    channel: str
    nick: str


@attrs.frozen
class Left:
    """A part, quit or kick (``kind``) of ``nick`` from ``channel``; ``by``: the kicker."""

    channel: str
    nick: str
    kind: str
    reason: str = ""
    by: str = ""


@attrs.frozen
class Renamed:
    old: str
    new: str
    channels: tuple[str, ...]


@attrs.frozen
class Names:
    """The complete member list of a channel (after we joined it, or asked)."""

    channel: str
    nicks: frozenset[str]


@attrs.frozen
class Topic:
    """A channel's topic: on joining (``nick`` empty) or changed by ``nick``."""

    channel: str
    topic: str
    nick: str = ""


@attrs.frozen
class Connected:
    nick: str


@attrs.frozen
class Disconnected:
    reason: str


IrcEvent = Said | Joined | Left | Renamed | Names | Topic | Connected | Disconnected
Handler = Callable[["IrcConnection", IrcEvent], Awaitable[None]]


def _another_nick(taken: str) -> str:
    """A nick to try when ``taken`` is: with ``_`` while short, else with random digits
    (servers limit nick length, often to 9 or 16)."""
    if len(taken) < 9:
        return taken + "_"
    return taken[:5] + str(random.randint(1000, 9999))


def fold(name: str) -> str:
    """IRC's case-insensitive form of a nick or channel (RFC 1459 casemapping)."""
    return name.lower().translate(_RFC1459)


_RFC1459 = str.maketrans("[]\\~", "{}|^")


class Pacer:
    """Flood control: ``burst`` lines at once, then one every ``interval`` seconds."""

    def __init__(self, burst: int, interval: float) -> None:
        self.burst, self.interval = burst, interval
        self._tokens = float(burst)
        self._last = time.monotonic()

    async def wait(self) -> None:
        while True:
            now = time.monotonic()
            if self.interval > 0:
                self._tokens = min(self.burst, self._tokens + (now - self._last) / self.interval)
            else:
                self._tokens = self.burst
            self._last = now
            if self._tokens >= 1:
                self._tokens -= 1
                return
            await asyncio.sleep((1 - self._tokens) * self.interval)


@attrs.define
class IrcConnection:
    """A client connection that keeps itself connected until :meth:`close`.

    ``channels`` are (re)joined after each registration; ``handler`` gets every
    event, in the order the server sent them.
    """

    host: str
    port: int
    nick: str
    handler: Handler
    channels: set[str] = attrs.field(factory=set)
    username: str = "bridge"
    realname: str = "bridge_kit IRC bridge"
    password: str | None = None
    pacer: Pacer = attrs.field(factory=lambda: Pacer(10, 0.5))
    #: The nick asked for; ``nick`` is the one the server gave (after collisions).
    wanted: str = attrs.field(init=False)
    #: Channel (folded) → its members' nicks, as the server told us.
    members: dict[str, set[str]] = attrs.field(init=False, factory=dict)
    connected: asyncio.Event = attrs.field(init=False, factory=asyncio.Event)
    _writer: asyncio.StreamWriter | None = attrs.field(init=False, default=None)
    _names: dict[str, set[str]] = attrs.field(init=False, factory=dict)
    _send_lock: asyncio.Lock = attrs.field(init=False, factory=asyncio.Lock)
    closing: bool = attrs.field(init=False, default=False)
    _prefix_len: int = attrs.field(init=False, default=PREFIX_ROOM)

    def __attrs_post_init__(self) -> None:
        self.wanted = self.nick

    # -- running -------------------------------------------------------------

    async def run(self) -> None:
        """Connect, and connect again with backoff after each loss, until closed."""
        delay = BACKOFF_FIRST
        while not self.closing:
            reason = "closed"
            try:
                reason = await self._session()
                delay = BACKOFF_FIRST  # it was up: the next loss starts the backoff afresh
            except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
                reason = str(exc) or type(exc).__name__
            self._lost()
            await self.handler(self, Disconnected(reason))
            if self.closing:
                return
            wait = delay * random.uniform(0.8, 1.2)
            log.warning("IRC %s lost (%s); reconnecting in %.1f s", self.wanted, reason, wait)
            await asyncio.sleep(wait)
            delay = min(delay * 2, BACKOFF_MAX)

    async def close(self, message: str = "bye") -> None:
        self.closing = True
        if self._writer is not None:
            with contextlib.suppress(OSError, ConnectionError):
                await self._write(Line("QUIT", (message,)))
                self._writer.close()

    async def _session(self) -> str:
        reader, self._writer = await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port), 30
        )
        if self.password:
            await self._write(Line("PASS", (self.password,)))
        await self._write(Line("NICK", (self.wanted,)))
        await self._write(Line("USER", (self.username, "0", "*", self.realname)))
        pinged = False
        while not self.closing:
            try:
                raw = await asyncio.wait_for(reader.readuntil(b"\n"), IDLE_PING)
            except TimeoutError:
                if pinged:
                    return "ping timeout"
                pinged = True
                await self._write(Line("PING", ("keepalive",)))
                continue
            except asyncio.LimitOverrunError:
                await reader.read(65536)  # an over-long line: dropped
                continue
            if not raw:
                return "connection closed"
            pinged = False
            await self._dispatch(Line.parse(raw))
        return "closed"

    def _lost(self) -> None:
        self.connected.clear()
        self.members.clear()
        self._names.clear()
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    # -- sending -------------------------------------------------------------

    async def send(self, command: str, *params: str) -> None:
        """Send one line, paced; raises ConnectionError when not connected."""
        await self.pacer.wait()
        await self._write(Line(command, params))

    async def _write(self, line: Line) -> None:
        if self._writer is None:
            raise ConnectionError("not connected to IRC")
        async with self._send_lock:
            self._writer.write(line.encode()[: LINE_LIMIT - 2].rstrip(b"\r\n") + b"\r\n")
            await self._writer.drain()

    async def say(
        self, target: str, text: str, *, action: bool = False, notice: bool = False
    ) -> int:
        """Send ``text`` to ``target``, split to fit IRC lines; the number of lines sent."""
        command = "NOTICE" if notice else "PRIVMSG"
        overhead = len(f"{command} {target} :".encode()) + 2 + self._prefix_len
        if action:
            overhead += len("\x01ACTION \x01")
        pieces = split_text(text, LINE_LIMIT - overhead)
        for piece in pieces:
            await self.send(command, target, f"\x01ACTION {piece}\x01" if action else piece)
        return len(pieces)

    async def join(self, channel: str) -> None:
        self.channels.add(channel)
        if self.connected.is_set():
            await self.send("JOIN", channel)

    async def part(self, channel: str, reason: str = "") -> None:
        self.channels.discard(channel)
        if self.connected.is_set():
            await self.send("PART", channel, *([reason] if reason else []))

    # -- receiving -----------------------------------------------------------

    async def _dispatch(self, line: Line) -> None:
        handle = getattr(self, f"_on_{line.command.lower()}", None)
        if handle is not None:
            await handle(line)

    async def _emit(self, event: IrcEvent) -> None:
        await self.handler(self, event)

    async def _on_ping(self, line: Line) -> None:
        await self._write(Line("PONG", line.params[-1:]))

    async def _on_001(self, line: Line) -> None:
        self.nick = line.params[0]
        self.connected.set()
        await self._emit(Connected(self.nick))
        for channel in sorted(self.channels):
            await self.send("JOIN", channel)

    async def _on_433(self, line: Line) -> None:
        """Nick in use: while registering, try another (``nick_``, then random digits)."""
        if not self.connected.is_set():
            taken = line.params[1] if len(line.params) > 1 else self.nick
            self.nick = _another_nick(taken)
            await self._write(Line("NICK", (self.nick,)))

    async def _on_432(self, line: Line) -> None:
        await self._on_433(line)  # erroneous nick: same fallback, and the log says why
        log.warning("IRC refused the nick: %s", " ".join(line.params[1:]))

    async def _on_353(self, line: Line) -> None:
        channel, names = fold(line.params[-2]), line.params[-1].split()
        self._names.setdefault(channel, set()).update(n.lstrip(STATUS_PREFIXES) for n in names)

    async def _on_366(self, line: Line) -> None:
        channel = line.params[1]
        nicks = self._names.pop(fold(channel), set())
        self.members[fold(channel)] = nicks
        await self._emit(Names(channel, frozenset(nicks)))

    async def _on_332(self, line: Line) -> None:
        await self._emit(Topic(line.params[1], line.params[-1]))

    async def _on_topic(self, line: Line) -> None:
        await self._emit(Topic(line.params[0], line.params[-1], line.nick))

    async def _on_join(self, line: Line) -> None:
        channel = line.params[0]
        if fold(line.nick) == fold(self.nick):
            self._prefix_len = len(line.prefix.encode()) + 2  # ":" and " "
            self.members[fold(channel)] = set()
        else:
            self.members.setdefault(fold(channel), set()).add(line.nick)
        await self._emit(Joined(channel, line.nick))

    async def _on_part(self, line: Line) -> None:
        channel = line.params[0]
        reason = line.params[1] if len(line.params) > 1 else ""
        await self._gone(Left(channel, line.nick, "part", reason))

    async def _on_kick(self, line: Line) -> None:
        channel, nick = line.params[0], line.params[1]
        reason = line.params[2] if len(line.params) > 2 else ""
        await self._gone(Left(channel, nick, "kick", reason, by=line.nick))

    async def _on_quit(self, line: Line) -> None:
        reason = line.params[0] if line.params else ""
        for channel in self.channels_of(line.nick):
            await self._gone(Left(channel, line.nick, "quit", reason))

    async def _gone(self, event: Left) -> None:
        members = self.members.get(fold(event.channel), set())
        members.difference_update({n for n in members if fold(n) == fold(event.nick)})
        if fold(event.nick) == fold(self.nick):
            self.members.pop(fold(event.channel), None)
            if event.kind == "kick" and event.channel in self.channels:
                await self.send("JOIN", event.channel)  # a bridged channel is not given up
        await self._emit(event)

    async def _on_nick(self, line: Line) -> None:
        old, new = line.nick, line.params[0]
        channels = self.channels_of(old)
        for channel in channels:
            members = self.members[fold(channel)]
            members.discard(old)
            members.add(new)
        if fold(old) == fold(self.nick):
            self.nick = new
        await self._emit(Renamed(old, new, tuple(channels)))

    async def _on_privmsg(self, line: Line, *, notice: bool = False) -> None:
        if len(line.params) < 2:
            return
        target, text = line.params[0], line.params[1]
        action = ctcp_action(text)
        if action is None and text.startswith("\x01"):
            return  # another CTCP (VERSION, PING...): not a message
        await self._emit(
            Said(target, line.nick, text if action is None else action, action is not None, notice)
        )

    async def _on_notice(self, line: Line) -> None:
        if "!" in line.prefix:  # a user's notice; the server's own are not chat
            await self._on_privmsg(line, notice=True)

    def channels_of(self, nick: str) -> list[str]:
        """The channels (as we joined them) where ``nick`` is a member."""
        folded = fold(nick)
        return [
            channel
            for channel in sorted(self.channels)
            if any(fold(n) == folded for n in self.members.get(fold(channel), ()))
        ]

"""The IRC bridge's connection and line handling, against a real miniircd."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator

import pytest
from irc_bridge.client import (
    Connected,
    IrcConnection,
    IrcEvent,
    Joined,
    Left,
    Names,
    Pacer,
    Renamed,
    Said,
)
from irc_bridge.protocol import LINE_LIMIT, Line, split_text

from tests.helpers.ircd import IrcUser, Miniircd

TIMEOUT = 30.0


class Recorder:
    """The events a connection hands out, awaitable."""

    def __init__(self) -> None:
        self.events: list[IrcEvent] = []
        self._new = asyncio.Condition()

    async def __call__(self, connection: IrcConnection, event: IrcEvent) -> None:
        async with self._new:
            self.events.append(event)
            self._new.notify_all()

    async def wait_for(self, event: IrcEvent) -> None:
        try:
            async with asyncio.timeout(TIMEOUT), self._new:
                await self._new.wait_for(lambda: event in self.events)
        except TimeoutError:
            raise AssertionError(f"never saw {event}; saw {self.events}") from None


@contextlib.asynccontextmanager
async def connection(
    port: int, nick: str, *channels: str, **options: object
) -> AsyncIterator[tuple[IrcConnection, Recorder]]:
    recorder = Recorder()
    conn = IrcConnection("127.0.0.1", port, nick, recorder, channels=set(channels), **options)  # type: ignore[arg-type]
    task = asyncio.create_task(conn.run())
    try:
        async with asyncio.timeout(TIMEOUT):
            await conn.connected.wait()
        yield conn, recorder
    finally:
        await conn.close()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.fixture
async def users() -> AsyncIterator[list[IrcUser]]:
    made: list[IrcUser] = []
    yield made
    for user in made:
        await user.close()


async def test_the_events_of_a_channel_come_out_in_order(
    ircd: Miniircd, unique: str, users: list[IrcUser]
) -> None:
    channel = f"#ev{unique}"
    ann = await IrcUser(f"ann{unique}").connect(ircd.port)
    users.append(ann)
    await ann.join(channel)
    async with connection(ircd.port, f"br{unique}", channel) as (conn, seen):
        await seen.wait_for(Names(channel, frozenset({f"ann{unique}", f"br{unique}"})))
        bob = await IrcUser(f"bob{unique}").connect(ircd.port)
        users.append(bob)
        await bob.join(channel)
        await bob.say(channel, "hello \x02there\x02")
        await bob.say(channel, "\x01ACTION waves\x01")
        await bob.send(f"NOTICE {channel} :a notice")
        await bob.send(f"NICK bobby{unique}")
        await bob.quit("gone now")
        await seen.wait_for(Left(channel, f"bobby{unique}", "quit", "gone now"))
        await ann.send(f"PART {channel} :off")
        await seen.wait_for(Left(channel, f"ann{unique}", "part", "off"))
        assert conn.members[channel.lower()] == {f"br{unique}"}
    events = [e for e in seen.events if not isinstance(e, Connected)]
    assert events[events.index(Joined(channel, f"bob{unique}")) :] == [
        Joined(channel, f"bob{unique}"),
        Said(channel, f"bob{unique}", "hello \x02there\x02"),
        Said(channel, f"bob{unique}", "waves", action=True),
        Said(channel, f"bob{unique}", "a notice", notice=True),
        Renamed(f"bob{unique}", f"bobby{unique}", (channel,)),
        Left(channel, f"bobby{unique}", "quit", "gone now"),
        Left(channel, f"ann{unique}", "part", "off"),
    ]


async def test_a_taken_nick_gets_an_underscore_or_digits(
    ircd: Miniircd, unique: str, users: list[IrcUser]
) -> None:
    short, long = f"t{unique[:4]}", f"taken{unique}"
    for nick in (short, long):
        users.append(await IrcUser(nick).connect(ircd.port))
    async with connection(ircd.port, short) as (conn, seen):
        assert conn.nick == f"{short}_"
        assert Connected(f"{short}_") in seen.events
    async with connection(ircd.port, long) as (conn, seen):
        # Servers limit a nick's length: a long one is cut and given digits instead.
        assert re.fullmatch(f"{long[:5]}[0-9]{{4}}", conn.nick), conn.nick


async def test_a_long_message_is_split_into_lines_irc_accepts(
    ircd: Miniircd, unique: str, users: list[IrcUser]
) -> None:
    channel = f"#long{unique}"
    reader = await IrcUser(f"rd{unique}").connect(ircd.port)
    users.append(reader)
    await reader.join(channel)
    text = " ".join(["wörd€😀"] * 150) + " " + "x" * 700  # ~2,800 bytes, multi-byte, one long word
    async with connection(ircd.port, f"lw{unique}", channel) as (conn, seen):
        await seen.wait_for(Names(channel, frozenset({f"rd{unique}", f"lw{unique}"})))
        sent = await conn.say(channel, text)
        await reader.wait_for(
            lambda n, c, p: (
                c == "PRIVMSG" and len([x for x in reader.lines if "PRIVMSG" in x]) == sent
            ),
            "every piece",
        )
    lines = [line for line in reader.lines if " PRIVMSG " in line]
    assert sent == len(lines) >= 6
    assert all(len(line.encode()) + 2 <= LINE_LIMIT for line in lines)
    received = [Line.parse(line.encode()).params[1] for line in lines]
    assert "".join(received).replace(" ", "") == text.replace(" ", "")


def test_split_text_keeps_characters_whole_and_prefers_spaces() -> None:
    assert split_text("ab cd ef", 5) == ["ab cd", "ef"]
    assert split_text("ab cd ef", 4) == ["ab", "cd", "ef"]
    assert split_text("ééé", 3) == ["é", "é", "é"]  # 2 bytes each: never half a character
    assert split_text("one\n\ntwo", 100) == ["one", "two"]
    assert split_text("x" * 10, 4) == ["xxxx", "xxxx", "xx"]


def test_lines_parse_and_encode() -> None:
    line = Line.parse(b"@time=x :nick!u@h PRIVMSG #c :hi there :)\r\n")
    assert (line.nick, line.command, line.params) == ("nick", "PRIVMSG", ("#c", "hi there :)"))
    assert Line.parse(b"PING :srv").params == ("srv",)
    assert Line.parse(b":srv 001 me :Welcome").params == ("me", "Welcome")
    assert Line.parse("caf\xe9".encode("latin-1") + b" x").command == "CAFÉ"
    assert Line("PRIVMSG", ("#c", "a\r\nb")).encode() == b"PRIVMSG #c :a b\r\n"
    assert Line("JOIN", ("#c",)).encode() == b"JOIN #c\r\n"


async def test_sending_is_paced_after_the_burst() -> None:
    pacer = Pacer(burst=2, interval=0.1)
    loop = asyncio.get_running_loop()
    began = loop.time()
    for _ in range(5):
        await pacer.wait()
    assert loop.time() - began >= 0.25  # 3 lines after the burst, 0.1 s apart


async def test_it_reconnects_and_rejoins_after_the_server_went_away(
    ircd: Miniircd, unique: str, users: list[IrcUser]
) -> None:
    channel = f"#back{unique}"
    async with connection(ircd.port, f"rc{unique}", channel) as (conn, seen):
        await seen.wait_for(Names(channel, frozenset({f"rc{unique}"})))
        await ircd.stop()
        await ircd.start()  # the same port
        seen.events.clear()
        await seen.wait_for(Names(channel, frozenset({f"rc{unique}"})))
        assert conn.connected.is_set()


async def test_a_kick_is_reported_with_the_kicker_and_a_kicked_bridge_rejoins() -> None:
    """miniircd has no KICK: a scripted server sends them."""
    joins: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()  # NICK
        await reader.readline()  # USER
        for line in (
            ":srv 001 kb :welcome", ":kb!u@h JOIN #k", ":srv 353 kb = #k :@op kb pat",
            ":srv 366 kb #k :end", ":op!u@h KICK #k pat :behave", ":op!u@h KICK #k kb :you too",
        ):  # fmt: skip
            writer.write(line.encode() + b"\r\n")
        await writer.drain()
        while line := await reader.readline():
            if line.startswith(b"JOIN"):
                joins.append(line.strip())

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server, connection(port, "kb", "#k") as (conn, seen):
        await seen.wait_for(Left("#k", "pat", "kick", "behave", by="op"))
        await seen.wait_for(Left("#k", "kb", "kick", "you too", by="op"))
        async with asyncio.timeout(TIMEOUT):
            while len(joins) < 2:  # the JOIN after the welcome, and the one after the kick
                await asyncio.sleep(0.01)
    assert joins == [b"JOIN #k", b"JOIN #k"]
    assert "#k" not in conn.members  # until the server says it is back in

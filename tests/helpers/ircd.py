"""A real IRC server (miniircd) for the tests, and IRC users driven over raw sockets."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from bridge_kit.testing.synapse import free_port

TIMEOUT = 30.0


def miniircd_path() -> str | None:
    """The miniircd script next to this Python, or on PATH."""
    beside = Path(sys.executable).parent / "miniircd"
    return str(beside) if beside.exists() else shutil.which("miniircd")


class Miniircd:
    """miniircd on 127.0.0.1 on a free port, until :meth:`stop`."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.process: asyncio.subprocess.Process | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        script = miniircd_path()
        assert script is not None, "miniircd is not installed"
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = open(self.workdir / "miniircd.log", "ab")  # noqa: SIM115 - the child holds it
        with log:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable, script, "--listen", "127.0.0.1", "--ports", str(self.port),
                "--verbose", *_as_root(), cwd=self.workdir, stdin=asyncio.subprocess.DEVNULL,
                stdout=log, stderr=log,
            )  # fmt: skip
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.close()
                return
            if self.process.returncode is not None:
                log_text = (self.workdir / "miniircd.log").read_text(errors="replace")
                raise AssertionError(f"miniircd exited at start:\n{log_text}")
            await asyncio.sleep(0.05)
        raise AssertionError("miniircd never listened")

    async def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.returncode is None:
            process.terminate()
            await process.wait()


def _as_root() -> list[str]:
    """miniircd refuses to run as root unless told to (containers run tests as root)."""
    return ["--setuid", "root"] if os.geteuid() == 0 else []


@contextlib.asynccontextmanager
async def running_miniircd(workdir: Path) -> AsyncIterator[Miniircd]:
    server = Miniircd(workdir)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def split_line(raw: str) -> tuple[str, str, list[str]]:
    """(sender nick, command, params) of a received line; deliberately independent of
    the bridge's own parser, which the tests check against this."""
    prefix = ""
    if raw.startswith(":"):
        prefix, _, raw = raw[1:].partition(" ")
    head, colon, trailing = raw.partition(" :")
    words = head.split()
    return prefix.split("!")[0], words[0].upper(), words[1:] + ([trailing] if colon else [])


class IrcUser:
    """A person on IRC: a raw socket, every line received kept in ``lines``."""

    def __init__(self, nick: str) -> None:
        self.nick = nick
        self.lines: list[str] = []
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None
        self._new = asyncio.Condition()

    async def connect(self, port: int) -> IrcUser:
        self._reader, self._writer = await asyncio.open_connection("127.0.0.1", port)
        self._task = asyncio.create_task(self._read())
        await self.send(f"NICK {self.nick}")
        await self.send(f"USER {self.nick} 0 * :{self.nick} the tester")
        await self.wait_for(lambda nick, command, params: command == "001", "welcome")
        return self

    async def _read(self) -> None:
        assert self._reader is not None
        while raw := await self._reader.readline():
            line = raw.decode(errors="replace").rstrip("\r\n")
            if line.startswith("PING"):
                await self.send("PONG" + line[4:])
            async with self._new:
                self.lines.append(line)
                self._new.notify_all()

    async def send(self, line: str) -> None:
        assert self._writer is not None
        self._writer.write(line.encode() + b"\r\n")
        await self._writer.drain()

    async def wait_for(
        self, match: Callable[[str, str, list[str]], bool], what: str, *, start: int = 0
    ) -> tuple[str, str, list[str]]:
        """The first line (from index ``start``) that ``match`` accepts, waiting for it."""

        def found() -> tuple[str, str, list[str]] | None:
            for line in self.lines[start:]:
                parts = split_line(line)
                if match(*parts):
                    return parts
            return None

        async with asyncio.timeout(TIMEOUT):
            async with self._new:
                await self._new.wait_for(lambda: found() is not None)
        result = found()
        assert result is not None, what
        return result

    async def join(self, channel: str) -> list[str]:
        """Join ``channel``; the nicks in it (the NAMES reply)."""
        start = len(self.lines)
        await self.send(f"JOIN {channel}")
        await self.wait_for(lambda n, c, p: c == "366", f"names of {channel}", start=start)
        names: list[str] = []
        for line in self.lines[start:]:
            _, command, params = split_line(line)
            if command == "353":
                names += [n.lstrip("@+") for n in params[-1].split()]
        return names

    async def say(self, target: str, text: str) -> None:
        await self.send(f"PRIVMSG {target} :{text}")

    async def said(self, nick: str, target: str, text: str, *, start: int = 0) -> None:
        """Wait until ``nick`` said ``text`` to ``target``."""
        await self.wait_for(
            lambda n, c, p: n == nick and c == "PRIVMSG" and p == [target, text],
            f"{nick}: {text!r}", start=start,
        )  # fmt: skip

    async def quit(self, reason: str = "bye") -> None:
        with contextlib.suppress(OSError):
            await self.send(f"QUIT :{reason}")
        await self.close()

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await self._task


def count_lines(user: IrcUser, command: str) -> int:
    return sum(1 for line in user.lines if split_line(line)[1] == command)

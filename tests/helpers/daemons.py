"""Helpers for tests that run a bridge as a process against the test Synapse: its
config, its start (until it says it is ready) and stop, real users and their rooms."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from bridge_kit import HomeserverClient, Intent, RegisterRequest, UserInUse
from bridge_kit.client.homeserver import quote_segment
from tests.conftest import SERVER_NAME, TestHomeserver

TIMEOUT = 60.0
ROOT = Path(__file__).resolve().parents[2]
READY = "is ready as"


def write_config(hs: TestHomeserver, directory: Path, **appservice: Any) -> Path:
    """A daemon config for ``hs``'s registration, JSON logs, a relative SQLite store."""
    config = {
        "homeserver": {"url": hs.url},
        "appservice": {
            "registration": str(hs.registration_path),
            "port": hs.appservice_port,
            "store": "sqlite:///bridge_kit.db",
            **appservice,
        },
        "logging": {"level": "INFO", "format": "json"},
    }
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


class Daemon:
    """A bridge process (``bridge-kit run`` or a bridge script), its log in a file.

    The environment gets ``PYTHONPATH`` set to this checkout, so the process
    runs the code under test whatever is installed.
    """

    def __init__(
        self, args: Sequence[str], cwd: Path, *, name: str = "bridge", health: str | None = None
    ) -> None:
        self.args = list(args)
        self.cwd = cwd
        self.name = name
        #: Ready when this health URL answers 200 (for a bridge that logs nothing),
        #: else when the log says so.
        self.health = health
        self.process: asyncio.subprocess.Process | None = None
        self.starts = 0
        self.log_path = cwd / f"{name}.log"
        #: Where the current run's lines begin in the log file.
        self.offset = 0

    async def start(self) -> float:
        """Start it and wait until it logs that it is ready; return the seconds that took.

        Raises AssertionError with the log if it exits first.
        """
        self.starts += 1
        began = time.monotonic()
        self.offset = offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child holds it
        with log:
            self.process = await asyncio.create_subprocess_exec(
                *self.args, cwd=self.cwd, env=child_env(),
                stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log,
            )  # fmt: skip
        await self._wait_ready(offset)
        return time.monotonic() - began

    async def _wait_ready(self, offset: int) -> None:
        assert self.process is not None
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            if await self._ready(offset):
                return
            if self.process.returncode is not None:
                raise AssertionError(
                    f"{self.name} exited with {self.process.returncode} at start "
                    f"#{self.starts}:\n{self.log_since(offset)}"
                )
            await asyncio.sleep(0.05)
        raise AssertionError(f"{self.name} never became ready:\n{self.log_since(offset)}")

    async def _ready(self, offset: int) -> bool:
        if self.health is None:
            return READY in self.log_since(offset)
        with contextlib.suppress(aiohttp.ClientError):
            async with aiohttp.ClientSession() as http, http.get(self.health) as response:
                return response.status == 200  # 503 until the app is running
        return False

    def log_since(self, offset: int = 0) -> str:
        with open(self.log_path, "rb") as file:
            file.seek(offset)
            return file.read().decode(errors="replace")

    def messages(self, *, this_run: bool = False) -> list[str]:
        """The ``message`` of every JSON log line so far (or of the current run's)."""
        found = []
        for line in self.log_since(self.offset if this_run else 0).splitlines():
            with contextlib.suppress(ValueError):
                found.append(json.loads(line)["message"])
        return found

    async def stop(self) -> int:
        """SIGTERM; return the exit status."""
        process, self.process = self.process, None
        assert process is not None
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(process.wait(), TIMEOUT)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise

    async def __aenter__(self) -> Daemon:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.process is not None:
            await self.stop()


def child_env() -> dict[str, str]:
    return os.environ | {"PYTHONPATH": str(ROOT)}


async def real_user(hs: TestHomeserver, name: str) -> tuple[HomeserverClient, Intent]:
    token = await hs.create_user(name)
    client = HomeserverClient(hs.url, token)
    return client, Intent(client, f"@{name}:{SERVER_NAME}", None)


async def join_puppet(hs: TestHomeserver, room_id: str, localpart: str, inviter: Intent) -> str:
    """Register ``localpart`` and have it join ``room_id``, as the appservice."""
    async with HomeserverClient(hs.url, hs.as_token) as appservice:
        with contextlib.suppress(UserInUse):
            await appservice.register(RegisterRequest.for_puppet(localpart))
        user_id = f"@{localpart}:{SERVER_NAME}"
        await inviter.invite(room_id, user_id)
        await Intent(appservice, user_id).join_room(room_id)
        return user_id


async def room_events(client: HomeserverClient, room_id: str, limit: int = 200) -> list[Any]:
    """The room's latest events, oldest first."""
    reply = await client.request(
        "GET",
        f"/_matrix/client/v3/rooms/{quote_segment(room_id)}/messages",
        query={"dir": "b", "limit": str(limit)},
    )
    return list(reversed(reply["chunk"]))


async def wait_for_event(
    client: HomeserverClient, room_id: str, what: str, **fields: Any
) -> dict[str, Any]:
    """The first event of ``room_id`` whose content has ``fields`` (``type``/``sender``/
    ``state_key`` are matched on the event), polling until it shows up."""
    top = {key: fields.pop(key) for key in ("type", "sender", "state_key") if key in fields}
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        for event in await room_events(client, room_id):
            content = event.get("content", {})
            if all(event.get(k) == v for k, v in top.items()) and all(
                content.get(k) == v for k, v in fields.items()
            ):
                return dict(event)
        await asyncio.sleep(0.1)
    raise AssertionError(f"{what} never showed up in {room_id}")

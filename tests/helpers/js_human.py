"""The human of the client-trust tests: matrix-js-sdk 43 with its Rust crypto (what
Element Web runs), in a node process (``tests/js/human.mjs``) driven line by line.

The SDK is installed with ``npm ci`` from ``tests/js/package-lock.json`` into a cache
folder named by the lock file's digest, once per machine (``BK_JS_CACHE`` moves it).
Without node and npm the tests skip (fail under CI=true).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import itertools
import json
import os
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from tests.conftest import missing_service

SOURCE = Path(__file__).resolve().parent.parent / "js"
TIMEOUT = 60.0
#: What the SDK names an event's shield: colour NONE, GREY or RED, and the reason.
Shield = dict[str, str | None]


def installed_sdk() -> Path:
    """The folder holding ``human.mjs`` beside its ``node_modules``."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        missing_service("node and npm are needed for the matrix-js-sdk tests")
    lock = (SOURCE / "package-lock.json").read_bytes()
    digest = hashlib.sha256(lock + (SOURCE / "package.json").read_bytes()).hexdigest()[:16]
    root = Path(os.environ.get("BK_JS_CACHE", Path.home() / ".cache" / "bridge_kit"))
    target = root / f"js-human-{digest}"
    target.mkdir(parents=True, exist_ok=True)
    with (target / ".lock").open("w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)  # xdist workers install once, one at a time
        if not (target / "node_modules" / "matrix-js-sdk" / "package.json").exists():
            for name in ("package.json", "package-lock.json"):
                shutil.copy(SOURCE / name, target / name)
            done = subprocess.run(
                ["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"],
                cwd=target,
                capture_output=True,
                text=True,
                timeout=600,
                check=False,
            )
            if done.returncode != 0:
                missing_service(f"npm ci of matrix-js-sdk failed: {done.stderr.strip()[-500:]}")
        # The script is copied when it changed (it resolves the SDK from its own
        # folder), and atomically: another worker's node may be reading it right now,
        # and a copy in place would show it a truncated file.
        script = (SOURCE / "human.mjs").read_bytes()
        if not (target / "human.mjs").exists() or (target / "human.mjs").read_bytes() != script:
            (target / "human.mjs.new").write_bytes(script)
            os.replace(target / "human.mjs.new", target / "human.mjs")
    return target


class JsHuman:
    """One js-sdk device of a real user, syncing, answering commands."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.user_id = ""
        self.device_id = ""
        self._ids = itertools.count()
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.process.stdout is not None
        async for line in self.process.stdout:
            try:
                answer = json.loads(line)
            except ValueError:
                continue
            future = self._waiting.pop(answer.get("id"), None)
            if future is None or future.done():
                continue
            if answer.get("ok"):
                future.set_result(answer.get("result"))
            else:
                future.set_exception(AssertionError(f"js-sdk: {answer.get('error')}"))
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(AssertionError("the js-sdk process ended"))

    async def call(self, cmd: str, timeout: float = TIMEOUT, **args: Any) -> Any:
        assert self.process.stdin is not None
        request_id = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = future
        line = json.dumps({"id": request_id, "cmd": cmd, "args": args}) + "\n"
        self.process.stdin.write(line.encode())
        await self.process.stdin.drain()
        return await asyncio.wait_for(future, timeout)

    async def login(self, base_url: str, localpart: str, *, strict: bool) -> None:
        reply = await self.call(
            "login", base_url=base_url, user=localpart, password="pw", strict=strict
        )
        self.user_id, self.device_id = reply["user_id"], reply["device_id"]

    async def create_room(self, invite: list[str]) -> str:
        return str((await self.call("create_room", invite=invite))["room_id"])

    async def until_joined(self, room_id: str, users: set[str]) -> None:
        deadline = time.monotonic() + TIMEOUT
        while True:
            joined = set((await self.call("joined", room_id=room_id))["users"])
            if users <= joined:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"{users - joined} never joined {room_id}")
            await asyncio.sleep(0.2)

    async def send(self, room_id: str, body: str) -> str:
        return str((await self.call("send", room_id=room_id, body=body))["event_id"])

    async def events(self, room_id: str) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = (await self.call("events", room_id=room_id))["events"]
        return found

    async def until_message(self, room_id: str, body: str, timeout: float = TIMEOUT) -> Any:
        """The event with ``body`` once decrypted and its shield known; on timeout,
        an AssertionError naming what the SDK made of the room's encrypted events."""
        deadline = time.monotonic() + timeout
        while True:
            events = await self.events(room_id)
            for event in events:
                if event["body"] == body and event["shield"] is not None:
                    return event
            if time.monotonic() > deadline:
                failed = [e for e in events if e["encrypted"]]
                raise AssertionError(f"{body!r} never decrypted; encrypted events: {failed}")
            await asyncio.sleep(0.2)

    async def until_failed(
        self, room_id: str, count: int, timeout: float = TIMEOUT
    ) -> dict[str, str]:
        """The decryption failure reason (the SDK's ``DecryptionFailureCode``) of the
        room's events by sender, once there are ``count`` failed events."""
        deadline = time.monotonic() + timeout
        while True:
            events = await self.events(room_id)
            failed = [e for e in events if e["decryption_failure"]]
            if len(failed) >= count:
                return {e["sender"]: e["decryption_failure"] for e in failed}
            if time.monotonic() > deadline:
                raise AssertionError(f"{count} failures expected; events: {events}")
            await asyncio.sleep(0.2)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.call("stop", timeout=5)
        with contextlib.suppress(ProcessLookupError):
            self.process.terminate()
        await self.process.wait()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


@contextlib.asynccontextmanager
async def js_human(
    base_url: str, localpart: str, *, strict: bool = False
) -> AsyncIterator[JsHuman]:
    """A logged-in js-sdk human (the user must exist with password ``pw``)."""
    folder = await asyncio.to_thread(installed_sdk)
    process = await asyncio.create_subprocess_exec(
        "node",
        str(folder / "human.mjs"),
        cwd=folder,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        limit=16 * 1024 * 1024,
    )
    human = JsHuman(process)
    try:
        await human.login(base_url, localpart, strict=strict)
        yield human
    finally:
        await human.close()

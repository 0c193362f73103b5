"""Stopping promptly: a homeserver that never answers, retries that would wait for
minutes, a stop step that hangs (issue 10, defect 8)."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import attrs
import pytest
from aiohttp import web

from bridge_kit import AppService
from bridge_kit.client.homeserver import HomeserverClient, RetryPolicy
from bridge_kit.config import AppServiceConfig, Config, HomeserverConfig
from bridge_kit.errors import ClientClosed, LimitExceeded, MatrixRequestError
from bridge_kit.registration import generate_registration
from bridge_kit.store import MemoryStore
from bridge_kit.testing.synapse import free_port
from tests.helpers.fault_homeserver import FaultHomeserver

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "shutdown-as-token"


class SilentServer:
    """Accepts TCP connections and never answers: the worst homeserver to stop against."""

    def __init__(self) -> None:
        self.connections = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> SilentServer:
        self._server = await asyncio.start_server(self._hold, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        await self._server.wait_closed()

    async def _hold(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)


class Refusing:
    """Answers every request with ``status`` (429 asks for a minute's wait)."""

    def __init__(self, status: int) -> None:
        self.status = status
        self.requests = 0
        self.url = ""

    async def _answer(self, request: web.Request) -> web.Response:
        self.requests += 1
        body = {"errcode": "M_LIMIT_EXCEEDED", "retry_after_ms": 60_000}
        if self.status != 429:
            body = {"errcode": "M_UNKNOWN"}
        return web.json_response(body, status=self.status)

    @classmethod
    async def serving(cls, status: int) -> AsyncIterator[Refusing]:
        refusing = cls(status)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", refusing._answer)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        refusing.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        try:
            yield refusing
        finally:
            await runner.cleanup()


@attrs.frozen
class SlowBackoff(RetryPolicy):
    """Every backoff lasts a minute, with no jitter to make it short by chance."""

    def backoff(self, failures: int, rng: random.Random) -> float:
        return 60.0


@pytest.fixture(params=[429, 503])
async def refusing(request: pytest.FixtureRequest) -> AsyncIterator[Refusing]:
    async for server in Refusing.serving(request.param):
        yield server


async def until(condition: object, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():  # type: ignore[operator]
            await asyncio.sleep(0.01)


# -- the client stops waiting to retry ---------------------------------------------------


async def test_closing_the_client_ends_a_retry_wait_at_once(refusing: Refusing) -> None:
    client = HomeserverClient(refusing.url, TOKEN, retry=SlowBackoff())
    request = asyncio.ensure_future(client.whoami())
    await until(lambda: refusing.requests == 1)
    await asyncio.sleep(0.1)  # now in the minute-long wait
    started = time.monotonic()
    await client.close()
    with pytest.raises(ClientClosed, match="waited to retry"):
        await asyncio.wait_for(request, 5)
    assert time.monotonic() - started < 2
    assert refusing.requests == 1


async def test_aborted_retries_raise_the_last_error_at_once(refusing: Refusing) -> None:
    async with HomeserverClient(refusing.url, TOKEN, retry=SlowBackoff()) as client:
        request = asyncio.ensure_future(client.whoami())
        await until(lambda: refusing.requests == 1)
        started = time.monotonic()
        client.abort_retries()
        expected = LimitExceeded if refusing.status == 429 else MatrixRequestError
        with pytest.raises(expected):
            await asyncio.wait_for(request, 5)
        assert time.monotonic() - started < 2
        # And a later request gets one attempt, no retry.
        with pytest.raises(expected):
            await asyncio.wait_for(client.whoami(), 5)
    assert refusing.requests == 2


# -- AppService.stop() has a deadline ---------------------------------------------------


async def test_stop_ends_within_its_deadline_even_when_a_step_hangs() -> None:
    registration = generate_registration(
        "shutdown", None, "test.local", "_bk_", sender_localpart="_bk_bot"
    )
    port = free_port()
    async with FaultHomeserver(as_token=registration.as_token) as homeserver:
        config = Config(
            homeserver=HomeserverConfig(url=homeserver.url, domain="test.local"),
            appservice=AppServiceConfig(registration="unused.yaml", port=port),
        )
        store = MemoryStore()
        app = AppService(config, registration=registration, store=store, ping=False)
        entered = asyncio.Event()

        @app.on_user_query
        async def hangs(user_id: str) -> bool:
            entered.set()
            await asyncio.sleep(3600)
            return True

        await app.start()
        async with aiohttp.ClientSession() as session:
            query = asyncio.ensure_future(
                session.get(
                    f"http://127.0.0.1:{port}/_matrix/app/v1/users/@_bk_x:test.local",
                    headers={"Authorization": f"Bearer {registration.hs_token}"},
                )
            )
            await asyncio.wait_for(entered.wait(), 10)
            started = time.monotonic()
            # The listener alone would wait SHUTDOWN_TIMEOUT (60 s) for the hook.
            await asyncio.wait_for(app.stop(deadline=1.0), 30)
            assert time.monotonic() - started < 5
            await asyncio.gather(query, return_exceptions=True)
    assert app.state.name == "STOPPED"
    with pytest.raises(Exception, match="not open"):
        await store.count_registered()


# -- the daemon, SIGTERMed while it starts ------------------------------------------------


async def test_sigterm_during_start_up_against_a_silent_homeserver(tmp_path: Path) -> None:
    registration = generate_registration("shutdown", None, "test.local", "_bk_")
    registration.write(tmp_path / "registration.yaml")
    async with SilentServer() as silent:
        (tmp_path / "config.yaml").write_text(
            f"homeserver: {{url: 'http://127.0.0.1:{silent.port}'}}\n"
            f"appservice: {{registration: registration.yaml, port: {free_port()}}}\n"
        )
        daemon = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "bridge_kit", "run", "-c", "config.yaml"),
            cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            # Start-up is now waiting for whoami, which will never come (60 s x 8 tries).
            await until(lambda: silent.connections >= 1, timeout=30)
            started = time.monotonic()
            daemon.send_signal(signal.SIGTERM)
            _, err = await asyncio.wait_for(daemon.communicate(), 20)
        finally:
            if daemon.returncode is None:
                daemon.kill()
    assert time.monotonic() - started < 5
    assert daemon.returncode == 0, err.decode()
    assert b"Traceback" not in err

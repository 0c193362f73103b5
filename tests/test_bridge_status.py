"""Bridge state: posted to a status endpoint in bridgev2's shape, counted in metrics."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from bridge_kit import HomeserverClient, RetryPolicy
from bridge_kit.bridge.reachability import ReachabilityWatch
from bridge_kit.bridge.records import LoginState
from bridge_kit.bridge.status import BridgeState, StateEvent, StatusReporter, describe
from bridge_kit.metrics import Metrics
from bridge_kit.testing.synapse import free_port
from tests.conftest import TestHomeserver
from tests.test_appservice_e2e import make_app

TIMEOUT = 10.0


class Receiver:
    """A status endpoint: keeps what it is sent; answers ``failures`` 500s first."""

    def __init__(self) -> None:
        self.received: list[tuple[str, dict[str, Any]]] = []
        self.failures = 0
        self.arrived = asyncio.Condition()

    async def handle(self, request: web.Request) -> web.Response:
        if self.failures:
            self.failures -= 1
            return web.json_response({"error": "down"}, status=500)
        async with self.arrived:
            self.received.append((request.headers["Authorization"], await request.json()))
            self.arrived.notify_all()
        return web.json_response({})

    async def wait_for(self, count: int) -> list[dict[str, Any]]:
        async with self.arrived:
            await asyncio.wait_for(
                self.arrived.wait_for(lambda: len(self.received) >= count), TIMEOUT
            )
        return [body for _, body in self.received]


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[Receiver, str]]:
    receiver = Receiver()
    app = web.Application()
    app.router.add_post("/status", receiver.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield receiver, f"http://127.0.0.1:{port}/status"
    await runner.cleanup()


@pytest.fixture
async def reporter(receiver: tuple[Receiver, str]) -> AsyncIterator[StatusReporter]:
    status = StatusReporter(
        endpoint=receiver[1], token="as-token-123", metrics=Metrics(), backoff=(0.01, 0.05)
    )
    await status.start()
    # Starting posts the bridge's first state: seen here, so each test starts clean.
    (first,) = await receiver[0].wait_for(1)
    assert first["state_event"] == "STARTING"
    receiver[0].received.clear()
    yield status
    await status.close()


async def test_states_reach_the_endpoint_in_bridgev2s_shape(
    receiver: tuple[Receiver, str], reporter: StatusReporter
) -> None:
    endpoint, _ = receiver
    await reporter.set_bridge(StateEvent.RUNNING)
    await reporter.set_login("@ann:example.org", "acct-1", LoginState.CONNECTING, remote_name="ann")
    await reporter.set_login(
        "@ann:example.org",
        "acct-1",
        LoginState.BAD_CREDENTIALS,
        remote_name="ann",
        error="flownet-pw",
        message="the password changed",
    )
    bodies = await endpoint.wait_for(2)
    assert all(auth == "Bearer as-token-123" for auth, _ in endpoint.received)
    assert bodies[0]["state_event"] == "RUNNING"
    assert bodies[0]["source"] == "bridge" and bodies[0]["ttl"] == 21600
    # The CONNECTING state was still unsent when BAD_CREDENTIALS came: only the newest goes.
    last = (await endpoint.wait_for(2))[-1]
    assert {k: v for k, v in last.items() if k != "timestamp"} == {
        "state_event": "BAD_CREDENTIALS",
        "ttl": 3600,
        "source": "bridge",
        "error": "flownet-pw",
        "message": "the password changed",
        "user_id": "@ann:example.org",
        "remote_id": "acct-1",
        "remote_name": "ann",
    }
    assert isinstance(last["timestamp"], int)


async def test_the_same_news_is_not_posted_twice(
    receiver: tuple[Receiver, str], reporter: StatusReporter
) -> None:
    endpoint, _ = receiver
    for _ in range(3):
        await reporter.set_login("@b:example.org", "acct-2", LoginState.CONNECTED)
    await reporter.set_bridge(StateEvent.RUNNING)  # a marker after them
    bodies = await endpoint.wait_for(2)
    assert [b["state_event"] for b in bodies] == ["CONNECTED", "RUNNING"]


async def test_a_failing_endpoint_is_retried(
    receiver: tuple[Receiver, str], reporter: StatusReporter
) -> None:
    endpoint, _ = receiver
    endpoint.failures = 3
    await reporter.set_bridge(StateEvent.RUNNING)
    bodies = await endpoint.wait_for(1)
    assert bodies[0]["state_event"] == "RUNNING" and endpoint.failures == 0


async def test_unreachable_carries_the_legacy_key_too(
    receiver: tuple[Receiver, str], reporter: StatusReporter
) -> None:
    endpoint, _ = receiver
    await reporter.set_bridge(StateEvent.BRIDGE_UNREACHABLE)
    (body,) = await endpoint.wait_for(1)
    assert body["state_event"] == body["stateEvent"] == "BRIDGE_UNREACHABLE"


async def test_gauges_count_logins_per_state_and_show_the_bridges() -> None:
    metrics = Metrics()
    status = StatusReporter(metrics=metrics)  # no endpoint: nothing is posted
    sample = metrics.registry.get_sample_value
    assert sample("bridge_kit_bridge_state", {"state": "STARTING"}) == 1
    await status.set_bridge(StateEvent.RUNNING)
    await status.set_login("@a:x.org", "1", LoginState.CONNECTED)
    await status.set_login("@b:x.org", "2", LoginState.CONNECTED)
    await status.set_login("@c:x.org", "3", LoginState.TRANSIENT_DISCONNECT)
    assert sample("bridge_kit_bridge_state", {"state": "STARTING"}) == 0
    assert sample("bridge_kit_bridge_state", {"state": "RUNNING"}) == 1
    assert sample("bridge_kit_login_states", {"state": "CONNECTED"}) == 2
    assert sample("bridge_kit_login_states", {"state": "TRANSIENT_DISCONNECT"}) == 1
    await status.set_login("@b:x.org", "2", LoginState.LOGGED_OUT)
    assert sample("bridge_kit_login_states", {"state": "CONNECTED"}) == 1
    assert status.login("2") is None  # logged out: told, then forgotten


async def test_listeners_hear_each_new_login_state_once() -> None:
    status = StatusReporter()
    heard: list[BridgeState] = []

    async def listener(state: BridgeState) -> None:
        heard.append(state)

    async def broken(state: BridgeState) -> None:
        raise RuntimeError("the room is gone")

    status.listeners += [broken, listener]
    await status.set_bridge(StateEvent.RUNNING)
    await status.set_login("@a:x.org", "1", LoginState.CONNECTED, remote_name="ann")
    await status.set_login("@a:x.org", "1", LoginState.CONNECTED, remote_name="ann")
    await status.set_login("@a:x.org", "1", LoginState.TRANSIENT_DISCONNECT, message="timeout")
    assert [describe(s) for s in heard] == [
        "State of your login ann: CONNECTED",
        "State of your login 1: TRANSIENT_DISCONNECT: timeout",
    ]


async def test_a_login_state_is_not_the_bridges() -> None:
    status = StatusReporter()
    with pytest.raises(ValueError, match="login's state"):
        await status.set_bridge(StateEvent.CONNECTED)
    with pytest.raises(ValueError, match="not a login's state"):
        await status.set_login("@a:x.org", "1", StateEvent.RUNNING)


# -- BRIDGE_UNREACHABLE: the homeserver's ping, on a real Synapse --------------------------


async def test_a_failed_ping_makes_the_bridge_unreachable_until_one_succeeds(
    synapse: TestHomeserver,
    receiver: tuple[Receiver, str],
    reporter: StatusReporter,
    tmp_path: Path,
) -> None:
    endpoint, _ = receiver
    await reporter.set_bridge(StateEvent.RUNNING)
    once = RetryPolicy(max_attempts=1)
    async with HomeserverClient(synapse.url, synapse.as_token, retry=once) as client:
        watch = ReachabilityWatch(client, synapse.appservice_id, reporter, interval=0)

        await watch.check()  # nothing listens on the registration's URL

        unreachable = reporter.bridge
        assert unreachable.state_event is StateEvent.BRIDGE_UNREACHABLE
        assert unreachable.message.startswith("the homeserver cannot reach the bridge")
        assert "M_CONNECTION_FAILED" in unreachable.message
        await watch.check()  # the same news is not posted twice

        async with make_app(synapse, tmp_path / "bk.db"):
            await watch.check()

        assert reporter.bridge.state_event is StateEvent.RUNNING
    posted = await endpoint.wait_for(3)
    assert [body["state_event"] for body in posted] == [
        "RUNNING",
        "BRIDGE_UNREACHABLE",
        "RUNNING",
    ]
    assert posted[1]["stateEvent"] == "BRIDGE_UNREACHABLE"  # bridgev2's legacy key


async def test_a_bridge_that_cannot_reach_the_homeserver_is_unreachable(
    reporter: StatusReporter,
) -> None:
    await reporter.set_bridge(StateEvent.RUNNING)
    nowhere = f"http://127.0.0.1:{free_port()}"
    async with HomeserverClient(nowhere, "token", retry=RetryPolicy(max_attempts=1)) as client:
        await ReachabilityWatch(client, "bridge", reporter, interval=0).check()
    assert reporter.bridge.state_event is StateEvent.BRIDGE_UNREACHABLE
    assert reporter.bridge.message.startswith("the bridge cannot reach the homeserver")


async def test_a_starting_bridge_is_left_to_its_start(reporter: StatusReporter) -> None:
    nowhere = f"http://127.0.0.1:{free_port()}"
    async with HomeserverClient(nowhere, "token", retry=RetryPolicy(max_attempts=1)) as client:
        await ReachabilityWatch(client, "bridge", reporter, interval=0).check()
    assert reporter.bridge.state_event is StateEvent.STARTING


async def test_the_watch_pings_every_interval_until_closed(reporter: StatusReporter) -> None:
    await reporter.set_bridge(StateEvent.RUNNING)
    waits: list[float] = []
    second_wait = asyncio.Event()

    async def sleep(seconds: float) -> None:
        waits.append(seconds)
        if len(waits) > 1:
            second_wait.set()
            await asyncio.Event().wait()  # until closed

    nowhere = f"http://127.0.0.1:{free_port()}"
    async with HomeserverClient(nowhere, "token", retry=RetryPolicy(max_attempts=1)) as client:
        watch = ReachabilityWatch(client, "bridge", reporter, interval=7.5, sleep=sleep)
        watch.start()
        await asyncio.wait_for(second_wait.wait(), TIMEOUT)
        await watch.close()
    assert waits == [7.5, 7.5]
    assert reporter.bridge.state_event is StateEvent.BRIDGE_UNREACHABLE

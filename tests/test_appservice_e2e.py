"""End to end: a real Synapse pushes transactions to a running AppService."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bridge_kit import AppService, Event, HomeserverClient, Intent, Registration
from tests.conftest import TestHomeserver, _running_homeserver

TIMEOUT = 60.0


@pytest.fixture(scope="module")
async def homeserver(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[TestHomeserver]:
    # A private Synapse: transactions it queues for our URL while no test
    # listens would otherwise back off and slow the tests that do listen.
    async with _running_homeserver(tmp_path_factory.mktemp("e2e")) as hs:
        yield hs


def make_app(hs: TestHomeserver, db: Path) -> AppService:
    return AppService(
        Registration.load(hs.registration_path),
        homeserver_url=hs.url,
        store=f"sqlite:///{db}",
        port=hs.appservice_port,
    )


async def user(hs: TestHomeserver, name: str) -> tuple[HomeserverClient, Intent]:
    token = await hs.create_user(name)
    client = HomeserverClient(hs.url, token)
    return client, Intent(client, f"@{name}:test.local", None)


async def wait_for(condition: asyncio.Event) -> None:
    await asyncio.wait_for(condition.wait(), TIMEOUT)


async def test_event_is_delivered_exactly_once(
    homeserver: TestHomeserver, tmp_path: Path, unique: str
) -> None:
    app = make_app(homeserver, tmp_path / "bk.db")
    seen: Counter[str] = Counter()
    arrived = asyncio.Event()

    @app.on_event("m.room.message")
    async def on_message(event: Event) -> None:
        if event.content.get("body") == f"once {unique}":
            assert event.event_id is not None
            seen[event.event_id] += 1
            arrived.set()

    client, alice = await user(homeserver, f"once{unique}")
    async with app, client:
        room_id = await alice.create_room()
        await alice.invite(room_id, f"@_bk_listener{unique}:test.local")
        await app.intent(f"_bk_listener{unique}").join_room(room_id)
        event_id = await alice.send_text(room_id, f"once {unique}")
        await wait_for(arrived)
        await asyncio.sleep(1.0)  # a second delivery would have arrived by now
    assert seen == {event_id: 1}


async def test_failed_transaction_is_retried_and_processed_once(
    homeserver: TestHomeserver, tmp_path: Path, unique: str
) -> None:
    app = make_app(homeserver, tmp_path / "bk.db")
    attempts: Counter[str] = Counter()
    processed: Counter[str] = Counter()
    done = asyncio.Event()

    @app.on_event("m.room.message")
    async def flaky(event: Event) -> None:
        if event.content.get("body") != f"flaky {unique}":
            return
        assert event.event_id is not None
        attempts[event.event_id] += 1
        if attempts[event.event_id] == 1:
            raise RuntimeError("the remote network is down (on purpose)")
        processed[event.event_id] += 1
        done.set()

    client, alice = await user(homeserver, f"flaky{unique}")
    async with app, client:
        room_id = await alice.create_room()
        await alice.invite(room_id, f"@_bk_flaky{unique}:test.local")
        await app.intent(f"_bk_flaky{unique}").join_room(room_id)
        event_id = await alice.send_text(room_id, f"flaky {unique}")
        await wait_for(done)
        await asyncio.sleep(1.0)
        failures = app.metrics.registry.get_sample_value("bridge_kit_handler_failures_total")
    assert attempts[event_id] == 2, "Synapse must have retried the failed transaction"
    assert processed == {event_id: 1}
    assert failures is not None and failures >= 1


async def test_homeserver_ping_reaches_us(homeserver: TestHomeserver, tmp_path: Path) -> None:
    app = make_app(homeserver, tmp_path / "bk.db")
    async with app:
        duration_ms = await app.client.ping_appservice(app.registration.id, "ping-test")
    assert duration_ms >= 0


async def test_invite_provisions_an_unknown_puppet_through_user_query(
    homeserver: TestHomeserver, tmp_path: Path, unique: str
) -> None:
    app = make_app(homeserver, tmp_path / "bk.db")
    puppet = f"@_bk_invited{unique}:test.local"
    invited = asyncio.Event()

    @app.on_event("m.room.member")
    async def on_member(event: Event) -> None:
        if event.state_key == puppet and event.content.get("membership") == "invite":
            invited.set()

    client, alice = await user(homeserver, f"inviter{unique}")
    assert not await homeserver.user_exists(puppet)
    async with app, client:
        room_id = await alice.create_room()
        await alice.invite(room_id, puppet)
        await wait_for(invited)
        assert await app.store.is_registered(puppet)
        joined = await app.intent(f"_bk_invited{unique}").join_room(room_id)
    assert joined == room_id
    assert await homeserver.user_exists(puppet)


async def test_user_query_outside_namespace_is_refused(
    homeserver: TestHomeserver, tmp_path: Path, unique: str
) -> None:
    app = make_app(homeserver, tmp_path / "bk.db")
    async with app:
        assert not await app._answer_user_query(f"@someone{unique}:test.local")
        assert not await app._answer_user_query(f"@_bk_UPPER{unique}:test.local")
        assert not await app._answer_user_query(f"@_bk_x{unique}:elsewhere.org")
        assert await app._answer_user_query(f"@_bk_ok{unique}:test.local")
    assert await homeserver.user_exists(f"@_bk_ok{unique}:test.local")
    assert not await homeserver.user_exists(f"@someone{unique}:test.local")

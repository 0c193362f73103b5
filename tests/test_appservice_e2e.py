"""End to end: a real Synapse pushes transactions to a running AppService."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import socket
import sys
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import quote

import aiohttp
import pytest
import yaml
import yarl

from bridge_kit import (
    AppLifecycle,
    AppService,
    AppServiceConfig,
    ClientClosed,
    ClientLifecycle,
    Config,
    Event,
    HomeserverClient,
    HomeserverConfig,
    Intent,
    InvalidLocalpart,
    LifecycleError,
    ListenError,
    NotInNamespace,
    PuppetsConfig,
    StoreError,
    defaults,
)
from tests.conftest import TestHomeserver, _running_homeserver

TIMEOUT = 60.0


@pytest.fixture(scope="module")
async def homeserver(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[TestHomeserver]:
    # A private Synapse: transactions it queues for our URL while no test
    # listens would otherwise back off and slow the tests that do listen.
    async with _running_homeserver(tmp_path_factory.mktemp("e2e")) as hs:
        yield hs


def make_app(hs: TestHomeserver, db: Path, puppets: PuppetsConfig | None = None) -> AppService:
    return AppService(
        Config(
            homeserver=HomeserverConfig(url=hs.url),
            appservice=AppServiceConfig(
                registration=str(hs.registration_path),
                store=f"sqlite:///{db}",
                port=hs.appservice_port,
            ),
            puppets=puppets or PuppetsConfig(),
        )
    )


async def user_query(app: AppService, user_id: str) -> bool:
    """Ask the app's own ``GET /users/{userId}`` route, as the homeserver does."""
    port = app.config.appservice.port
    url = f"http://127.0.0.1:{port}/_matrix/app/v1/users/{quote(user_id, safe='')}"
    auth = {"Authorization": f"Bearer {app.registration.hs_token}"}
    async with (
        aiohttp.ClientSession() as session,
        session.get(yarl.URL(url, encoded=True), headers=auth) as response,
    ):
        return response.status == 200


async def user(hs: TestHomeserver, name: str) -> tuple[HomeserverClient, Intent]:
    token = await hs.create_user(name)
    client = HomeserverClient(hs.url, token)
    return client, Intent(client, f"@{name}:test.local", None)


async def room_with_puppet(app: AppService, creator: Intent, localpart: str) -> str:
    """A new room of ``creator``'s that the puppet joined, so its events reach the appservice."""
    room_id = await creator.create_room()
    await creator.invite(room_id, f"@{localpart}:test.local")
    await app.intent(localpart).join_room(room_id)
    return room_id


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
        room_id = await room_with_puppet(app, alice, f"_bk_listener{unique}")
        event_id = await alice.send_text(room_id, f"once {unique}")
        await wait_for(arrived)
        await asyncio.sleep(1.0)  # a second delivery would have arrived by now
    assert seen == {event_id: 1}


async def test_a_failed_handler_is_retried_by_the_inbox_and_completes_once(
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
        room_id = await room_with_puppet(app, alice, f"_bk_flaky{unique}")
        event_id = await alice.send_text(room_id, f"flaky {unique}")
        await wait_for(done)
        await asyncio.sleep(1.0)
        retries = app.metrics.registry.get_sample_value("bridge_kit_handler_retries_total")
    assert attempts[event_id] == 2, "the inbox must have retried the failed handler"
    assert processed == {event_id: 1}
    assert retries == 1


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
        assert not await user_query(app, f"@someone{unique}:test.local")
        assert not await user_query(app, f"@_bk_UPPER{unique}:test.local")
        assert not await user_query(app, f"@_bk_x{unique}:elsewhere.org")
        assert await user_query(app, f"@_bk_ok{unique}:test.local")
    assert await homeserver.user_exists(f"@_bk_ok{unique}:test.local")
    assert not await homeserver.user_exists(f"@someone{unique}:test.local")


def write_config(hs: TestHomeserver, tmp_path: Path, **puppets: object) -> Path:
    config = {
        "homeserver": {"url": hs.url},
        "appservice": {
            "registration": str(hs.registration_path),
            "port": hs.appservice_port,
            "store": "sqlite:///bridge_kit.db",
        },
        "puppets": puppets,
        "logging": {"level": "INFO", "format": "json"},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


async def get_json(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        return resp.status, await resp.text()


async def wait_until_healthy(url: str, daemon: asyncio.subprocess.Process) -> None:
    deadline = asyncio.get_running_loop().time() + TIMEOUT
    while asyncio.get_running_loop().time() < deadline:
        assert daemon.returncode is None, "the daemon exited early"
        with contextlib.suppress(aiohttp.ClientError):
            status, _ = await get_json(f"{url}/_bridge_kit/health")
            if status == 200:
                return
        await asyncio.sleep(0.2)
    raise AssertionError("the daemon never became healthy")


async def test_daemon_preregisters_serves_health_and_metrics_and_stops_on_sigterm(
    homeserver: TestHomeserver, tmp_path: Path, unique: str
) -> None:
    names = [f"_bk_pre{unique}_{i}" for i in range(25)]
    (tmp_path / "puppets.txt").write_text("# bridged users\n\n" + "\n".join(names) + "\n")
    config = write_config(homeserver, tmp_path, preregister="puppets.txt", concurrency=4)
    daemon = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge_kit", "run", "-c", str(config),
        cwd=tmp_path, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        await wait_until_healthy(homeserver.appservice_url, daemon)
        for _ in range(int(TIMEOUT * 5)):
            if await homeserver.count_users(f"_bk_pre{unique}_") == len(names):
                break
            await asyncio.sleep(0.2)
        status, metrics = await get_json(f"{homeserver.appservice_url}/metrics")
        assert status == 200
        assert "bridge_kit_puppets_registered_total 25.0" in metrics
    finally:
        if daemon.returncode is None:
            daemon.send_signal(signal.SIGTERM)
        _stdout, stderr = await asyncio.wait_for(daemon.communicate(), TIMEOUT)
    assert daemon.returncode == 0, stderr.decode()
    log_lines = [json.loads(line) for line in stderr.decode().splitlines()]
    messages = [line["message"] for line in log_lines]
    assert any("pre-registration finished: 25 registered" in m for m in messages), messages
    assert homeserver.as_token not in stderr.decode()
    assert homeserver.hs_token not in stderr.decode()


async def test_daemon_refuses_a_registration_the_homeserver_did_not_load(
    homeserver: TestHomeserver, tmp_path: Path
) -> None:
    data = homeserver.registration_data() | {"as_token": "x" * 64}
    (tmp_path / "registration.yaml").write_text(yaml.safe_dump(data))
    config = write_config(homeserver, tmp_path)
    config.write_text(
        config.read_text().replace(str(homeserver.registration_path), "registration.yaml")
    )
    daemon = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge_kit", "run", "-c", str(config),
        cwd=tmp_path, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, stderr = await asyncio.wait_for(daemon.communicate(), TIMEOUT)
    assert daemon.returncode == 2
    assert "app_service_config_files" in stderr.decode()
    assert "Traceback" not in stderr.decode()


async def test_intents_are_cached_within_a_bound_and_checked_at_once(
    homeserver: TestHomeserver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(defaults, "INTENT_CACHE_SIZE", 3)
    app = make_app(homeserver, tmp_path / "bk.db")
    async with app:
        first = app.intent("_bk_cache_a")
        assert app.intent("_bk_cache_a") is first
        for name in "bcd":
            app.intent(f"_bk_cache_{name}")
        assert app.intent("_bk_cache_a") is not first, "the oldest intent must have been dropped"
        assert app.bot.user_id == "@_bk_bot:test.local"
        with pytest.raises(InvalidLocalpart):
            app.intent("_bk_Upper")
        with pytest.raises(NotInNamespace):
            app.intent("outsider")


async def test_daemon_on_a_taken_port_says_so_without_a_traceback(
    homeserver: TestHomeserver, tmp_path: Path
) -> None:
    config = write_config(homeserver, tmp_path)
    with socket.socket() as squatter:
        # The previous test's listener may leave the port in TIME_WAIT.
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", homeserver.appservice_port))
        squatter.listen()
        daemon = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bridge_kit", "run", "-c", str(config),
            cwd=tmp_path, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, stderr = await asyncio.wait_for(daemon.communicate(), TIMEOUT)
    assert daemon.returncode == 2
    assert f"cannot listen on 127.0.0.1:{homeserver.appservice_port}" in stderr.decode()
    assert "Traceback" not in stderr.decode()


async def test_a_failing_preregistration_is_logged(
    homeserver: TestHomeserver, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    broken = tmp_path / "puppets.txt"
    broken.write_bytes(b"_bk_fine\n\xff\xfe not utf-8\n")
    app = make_app(homeserver, tmp_path / "bk.db", PuppetsConfig(preregister=str(broken)))
    with caplog.at_level(logging.ERROR, logger="bridge_kit.app.service"):
        async with app:
            for _ in range(int(TIMEOUT * 10)):
                if "pre-registration failed" in caplog.text:
                    break
                await asyncio.sleep(0.1)
    assert "pre-registration failed" in caplog.text
    assert "utf-8" in caplog.text


async def test_a_user_query_that_cannot_be_provisioned_is_answered_no(
    homeserver: TestHomeserver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = make_app(homeserver, tmp_path / "bk.db")
    async with app:

        async def store_down(localpart: str) -> bool:
            raise StoreError("the database went away")

        monkeypatch.setattr(app.puppets, "ensure_registered", store_down)
        assert not await user_query(app, "@_bk_nostore:test.local")


# -- lifecycle ---------------------------------------------------------------------------


async def test_a_second_start_is_refused_and_leaves_the_running_app_alone(
    homeserver: TestHomeserver, tmp_path: Path
) -> None:
    app = make_app(homeserver, tmp_path / "bk.db")
    async with app:
        with pytest.raises(LifecycleError, match="cannot start an AppService that is running"):
            await app.start()
        assert app.state is AppLifecycle.RUNNING
        assert app.client.state is ClientLifecycle.OPENED
        assert await app.store.count_registered() >= 0  # still open
        assert await user_query(app, "@_bk_still_served:test.local")
    assert app.state is AppLifecycle.STOPPED
    with pytest.raises(LifecycleError, match="stopped"):
        await app.start()


async def test_stop_runs_every_step_even_when_one_fails(
    homeserver: TestHomeserver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = make_app(homeserver, tmp_path / "bk.db")
    real_close = app.store.close

    async def failing_close() -> None:
        await real_close()
        raise StoreError("flush failed")

    monkeypatch.setattr(app.store, "close", failing_close)
    await app.start()
    with pytest.raises(StoreError, match="flush failed"):
        await app.stop()
    assert app.state is AppLifecycle.STOPPED
    assert app.client.state is ClientLifecycle.CLOSED  # closed after the failing step
    with pytest.raises(ClientClosed):
        await app.client.whoami()
    with socket.socket() as probe:  # the listener was stopped before the store
        assert probe.connect_ex(("127.0.0.1", app.config.appservice.port)) != 0


async def test_a_failed_start_closes_what_it_opened(
    homeserver: TestHomeserver, tmp_path: Path
) -> None:
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", homeserver.appservice_port))
        squatter.listen()
        app = make_app(homeserver, tmp_path / "bk.db")
        with pytest.raises(ListenError):
            await app.start()
    assert app.state is AppLifecycle.STOPPED
    assert app.client.state is ClientLifecycle.CLOSED
    with pytest.raises(StoreError, match="not open"):
        await app.store.count_registered()

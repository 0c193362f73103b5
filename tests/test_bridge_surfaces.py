"""The bridge's surfaces end to end, on a real Synapse with the toy network:
a provisioning client logs a Matrix user in, lists the login and logs out;
state changes reach a status endpoint, the metrics and the management room;
a message the network refuses shows its status in the room."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from bridge_kit import AppService
from bridge_kit.bridge.bridge import Bridge
from bridge_kit.bridge.connector import (
    LoginHandle,
    LoginInfo,
    MatrixMessage,
    NetworkClient,
    SentMessage,
)
from bridge_kit.bridge.login_flows import (
    FieldType,
    InputField,
    LoginFlow,
    LoginProcess,
    LoginStep,
)
from bridge_kit.bridge.provisioning import PREFIX
from bridge_kit.bridge.send_status import MESSAGE_STATUS_EVENT, StatusReason
from bridge_kit.client import HomeserverClient
from bridge_kit.config import AppServiceConfig, BridgeConfig, Config, HomeserverConfig
from bridge_kit.errors import SendFailed
from bridge_kit.store import MemoryStore
from bridge_kit.testing.synapse import free_port
from tests.conftest import TestHomeserver, _running_homeserver
from tests.helpers.provisioning_schema import provision as call_provisioning
from tests.helpers.toy_network import ToyClient, ToyConfig, ToyConnector, ToyNetwork
from tests.test_bridge_layer import DOMAIN, Human, body_is, eventually, lobby

TIMEOUT = 60.0


@pytest.fixture(scope="module")
async def homeserver(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[TestHomeserver]:
    async with _running_homeserver(tmp_path_factory.mktemp("surfaces")) as hs:
        yield hs


class NameLogin(LoginProcess[LoginInfo]):
    async def start(self) -> LoginStep[LoginInfo]:
        field = InputField(FieldType.USERNAME, "name", "Toy name")
        return LoginStep.user_input("toy.name", [field], "Your name on Toy")

    async def submit_user_input(self, values: Mapping[str, str]) -> LoginStep[LoginInfo]:
        name = values["name"]
        return LoginStep.complete("toy.done", LoginInfo(id=name, remote_name=name))


class PickyClient(ToyClient):
    """Refuses messages that mention "forbidden", as a moderated channel would."""

    async def send_message(self, message: MatrixMessage) -> SentMessage:
        if "forbidden" in message.text:
            raise SendFailed("the channel is moderated", reason=StatusReason.NO_PERMISSION)
        return await super().send_message(message)


class FlowToy(ToyConnector):
    network_icon = "mxc://toy.example/icon"

    def login_flows(self) -> Sequence[LoginFlow]:
        return [LoginFlow("name", "Name", "Log in with your Toy name")]

    async def create_login(self, user_id: str, flow_id: str) -> LoginProcess[LoginInfo] | None:
        return NameLogin() if flow_id == "name" else None

    def load_login(self, login: LoginHandle) -> NetworkClient:
        return PickyClient(self.network, login)


class StatusEndpoint:
    def __init__(self) -> None:
        self.states: list[dict[str, Any]] = []
        self.tokens: set[str] = set()
        self.changed = asyncio.Condition()

    async def handle(self, request: web.Request) -> web.Response:
        async with self.changed:
            self.tokens.add(request.headers["Authorization"])
            self.states.append(await request.json())
            self.changed.notify_all()
        return web.json_response({})

    async def wait_for(self, state: str, remote_id: str = "") -> dict[str, Any]:
        def found() -> dict[str, Any] | None:
            return next(
                (
                    s
                    for s in self.states
                    if s["state_event"] == state and s.get("remote_id", "") == remote_id
                ),
                None,
            )

        async with asyncio.timeout(TIMEOUT), self.changed:
            await self.changed.wait_for(lambda: found() is not None)
        result = found()
        assert result is not None
        return result


@pytest.fixture
async def endpoint() -> AsyncIterator[tuple[StatusEndpoint, str]]:
    receiver = StatusEndpoint()
    app = web.Application()
    app.router.add_post("/state", receiver.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield receiver, f"http://127.0.0.1:{port}/state"
    await runner.cleanup()


def make_bridge(
    hs: TestHomeserver, network: ToyNetwork, status_url: str, chat: str, **bridge: Any
) -> Bridge:
    config = Config(
        homeserver=HomeserverConfig(url=hs.url),
        appservice=AppServiceConfig(
            registration=str(hs.registration_path), port=hs.appservice_port
        ),
        bridge=BridgeConfig(permissions={DOMAIN: "user"}, status_endpoint=status_url, **bridge),
        extra_sections={"toy": ToyConfig(chats=[chat])},
    )
    return Bridge(AppService(config, store=MemoryStore()), FlowToy(network))


@contextlib.asynccontextmanager
async def person(hs: TestHomeserver, name: str) -> AsyncIterator[tuple[Human, str]]:
    """A real Matrix user and their access token."""
    token = await hs.create_user(name)
    async with HomeserverClient(hs.url, token) as client:
        yield Human(client, f"@{name}:{DOMAIN}"), token


async def provision(
    bridge: Bridge, method: str, route: str, token: str, path: str | None = None, **kw: Any
) -> tuple[int, Any]:
    """Call the bridge's provisioning API as a client written from the file would."""
    port = bridge.config.bridge.provisioning_port or bridge.config.appservice.port
    return await call_provisioning(port, token, method, route, path, **kw)


async def test_a_provisioning_client_logs_in_lists_and_logs_out(
    homeserver: TestHomeserver, endpoint: tuple[StatusEndpoint, str], unique: str
) -> None:
    receiver, url = endpoint
    network, chat = ToyNetwork(), f"c{unique}"
    lobby(network, chat)
    bridge = make_bridge(homeserver, network, url, chat)
    async with bridge, person(homeserver, f"p{unique}") as (alice, token):
        await receiver.wait_for("RUNNING")
        assert receiver.tokens == {f"Bearer {bridge.app.registration.as_token}"}
        _, flows = await provision(bridge, "GET", "/v3/login/flows", token)
        (flow,) = flows["flows"]
        _, step = await provision(
            bridge, "POST", "/v3/login/start/{flowID}", token, f"/v3/login/start/{flow['id']}"
        )
        assert [f["id"] for f in step["user_input"]["fields"]] == ["name"]
        route = "/v3/login/step/{loginProcessID}/{stepID}/user_input"
        path = f"/v3/login/step/{step['login_id']}/{step['step_id']}/user_input"
        _, done = await provision(bridge, "POST", route, token, path, json={"name": f"a{unique}"})
        login_id = done["complete"]["user_login_id"]
        assert login_id == f"a{unique}"
        connected = await receiver.wait_for("CONNECTED", login_id)
        assert connected["user_id"] == alice.user_id and connected["remote_name"] == login_id
        assert await provision(bridge, "GET", "/v3/logins", token) == (
            200,
            {"login_ids": [login_id]},
        )
        _, whoami = await provision(bridge, "GET", "/v3/whoami", token)
        assert [(x["id"], x["state"]["state_event"]) for x in whoami["logins"]] == [
            (login_id, "CONNECTED")
        ]
        # Her messages now go out through her own login.
        room_id = await alice.join(f"#_bk_toy_{chat}:{DOMAIN}")
        await alice.say(room_id, f"mine {unique}")
        sent = await network.wait_for("message", lambda r: r.item.text == f"mine {unique}")
        assert sent.login == login_id
        metrics = await _metrics(bridge)
        assert 'bridge_kit_login_states{state="CONNECTED"} 2.0' in metrics  # hers, the relay
        assert 'bridge_kit_bridge_state{state="RUNNING"} 1.0' in metrics
        path = f"/v3/logout/{login_id}"
        assert await provision(bridge, "POST", "/v3/logout/{loginID}", token, path) == (200, {})
        await receiver.wait_for("LOGGED_OUT", login_id)
        assert await provision(bridge, "GET", "/v3/logins", token) == (200, {"login_ids": []})
        assert bridge.logins.get(login_id) is None


async def test_the_login_command_drives_the_flow_and_the_room_hears_the_state(
    homeserver: TestHomeserver, endpoint: tuple[StatusEndpoint, str], unique: str
) -> None:
    receiver, url = endpoint
    network, chat = ToyNetwork(), f"c{unique}"
    lobby(network, chat)
    bridge = make_bridge(homeserver, network, url, chat)
    async with bridge, person(homeserver, f"m{unique}") as (alice, token):
        dm = await alice.dm_with(bridge.app.bot.user_id)
        await alice.find(dm, lambda e: e.get("sender") == bridge.app.bot.user_id, "the welcome")
        await alice.say(dm, f"login name b{unique}")
        await alice.find(
            dm, lambda e: f"Logging in as **b{unique}**" in _body(e), "the command's answer"
        )
        await receiver.wait_for("CONNECTED", f"b{unique}")
        await alice.find(dm, lambda e: f"b{unique}: connected" in _body(e), "the state notice")
        _, whoami = await provision(bridge, "GET", "/v3/whoami", token)
        assert whoami["management_room"] == dm


async def test_a_refused_message_shows_its_status(
    homeserver: TestHomeserver, endpoint: tuple[StatusEndpoint, str], unique: str
) -> None:
    network, chat = ToyNetwork(), f"c{unique}"
    lobby(network, chat)
    bridge = make_bridge(homeserver, network, endpoint[1], chat)
    async with bridge, person(homeserver, f"r{unique}") as (alice, _):
        room_id = await alice.join(f"#_bk_toy_{chat}:{DOMAIN}")
        event_id = await alice.say(room_id, "a forbidden word")
        status = await alice.find(
            room_id, lambda e: e.get("type") == MESSAGE_STATUS_EVENT, "the send status"
        )
        assert status["content"]["m.relates_to"] == {
            "rel_type": "m.reference",
            "event_id": event_id,
        }
        assert status["content"]["status"] == "FAIL_PERMANENT"
        assert status["content"]["reason"] == "m.no_permission"
        notice = await alice.find(
            room_id, lambda e: "was not bridged" in _body(e), "the failure notice"
        )
        assert notice["content"]["m.relates_to"]["m.in_reply_to"]["event_id"] == event_id

        # No claim is left behind for it: one per refused message would pile up.
        async def released() -> bool:
            return await bridge.app.store.message_by_event(event_id) is None

        await eventually(released, "the refused message's claim released")
        # An ordinary message still goes through (the relay) and gets no status.
        await alice.say(room_id, f"fine {unique}")
        await network.wait_for("message", lambda r: f"fine {unique}" in r.item.text)
        await alice.find(room_id, body_is(f"fine {unique}"), "the message")


async def test_the_api_on_a_listener_of_its_own(
    homeserver: TestHomeserver, endpoint: tuple[StatusEndpoint, str], unique: str
) -> None:
    network, chat = ToyNetwork(), f"c{unique}"
    lobby(network, chat)
    secret = "a-manager-secret-0123456789"
    port = free_port()
    bridge = make_bridge(
        homeserver, network, endpoint[1], chat, provisioning_port=port, provisioning_secret=secret
    )
    async with bridge:
        status, body = await provision(
            bridge, "GET", "/v3/logins", secret, params={"user_id": f"@x{unique}:{DOMAIN}"}
        )
        assert (status, body) == (200, {"login_ids": []})
        # Not on the appservice's listener then.
        url = f"http://127.0.0.1:{bridge.config.appservice.port}{PREFIX}/v3/logins"
        async with aiohttp.ClientSession() as session, session.get(url) as response:
            assert response.status == 404
    # Stopped with the bridge.
    with pytest.raises(aiohttp.ClientConnectionError):
        await provision(bridge, "GET", "/v3/logins", secret)


async def test_a_send_failing_past_the_quick_retries_is_retried_by_the_inbox(
    homeserver: TestHomeserver, endpoint: tuple[StatusEndpoint, str], unique: str
) -> None:
    network, chat = ToyNetwork(), f"c{unique}"
    lobby(network, chat)
    bridge = make_bridge(homeserver, network, endpoint[1], chat)
    async with bridge, person(homeserver, f"t{unique}") as (alice, _):
        room_id = await alice.join(f"#_bk_toy_{chat}:{DOMAIN}")
        network.failing_sends = 3  # the first try and both quick retries fail
        event_id = await alice.say(room_id, f"persistent {unique}")
        await network.wait_for("message", lambda r: f"persistent {unique}" in r.item.text)

        async def statuses() -> list[str] | None:
            found = [
                e["content"]["status"]
                for e in await alice.events(room_id)
                if e.get("type") == MESSAGE_STATUS_EVENT
                and e["content"]["m.relates_to"]["event_id"] == event_id
            ]
            return found if found and found[-1] == "SUCCESS" else None

        assert await eventually(statuses, "the success status") == [
            "PENDING",
            "FAIL_RETRIABLE",
            "SUCCESS",
        ]
        sent = [r for r in network.of("message") if f"persistent {unique}" in r.item.text]
        assert len(sent) == 1
        await alice.find(room_id, lambda e: "may not have been bridged" in _body(e), "notice")


def _body(event: dict[str, Any]) -> str:
    body = event.get("content", {}).get("body", "")
    return body if isinstance(body, str) else ""


async def _metrics(bridge: Bridge) -> str:
    url = f"http://127.0.0.1:{bridge.config.appservice.port}/metrics"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return await response.text()

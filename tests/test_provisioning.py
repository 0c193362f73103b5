"""The provisioning API (bridgev2 v3) on the appservice's listener, on a real Synapse.

Every answer is checked against the schema of its route and status in
mautrix-go's provisioning.yaml (``tests/helpers/provisioning_schema.py``). The
network is FlowNet (``tests/helpers/flownet.py``), whose logins take steps.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest

from bridge_kit import AppService
from bridge_kit.bridge.connector import LoginInfo
from bridge_kit.bridge.login_flows import LoginSessions, StepType, login_with_args
from bridge_kit.bridge.provisioning import (
    PREFIX,
    TOKEN_CACHE_SECONDS,
    AppHost,
    ProvisioningAPI,
    ProvisioningSettings,
)
from bridge_kit.bridge.records import LoginRecord, LoginState
from bridge_kit.bridge.status import StateEvent, StatusReporter
from bridge_kit.config import AppServiceConfig, BridgeConfig, Config, HomeserverConfig
from bridge_kit.errors import InvalidInput
from tests.conftest import TestHomeserver, _running_homeserver
from tests.helpers.flownet import FlowNet
from tests.helpers.provisioning_schema import check_reply

SECRET = "a-shared-secret-of-some-length"
TIMEOUT = 30.0


# A private Synapse (fixture ``hs``): -m "not synapse" leaves these out.
pytestmark = pytest.mark.synapse


@pytest.fixture(scope="module")
async def hs(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[TestHomeserver]:
    # A private Synapse: this module's apps listen on its appservice port in turn.
    async with _running_homeserver(tmp_path_factory.mktemp("provisioning")) as homeserver:
        yield homeserver


class Clock:
    """A monotonic clock the test moves (token cache, rate limits)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Bridge:
    """The parts a bridge ties together for the API, on a running AppService."""

    def __init__(self, app: AppService, api: ProvisioningAPI, connector: FlowNet) -> None:
        self.app, self.api, self.connector = app, api, connector
        self.base = f"http://127.0.0.1:{app.config.appservice.port}{PREFIX}"

    async def call(
        self,
        method: str,
        route: str,
        *,
        token: str | None = None,
        path: str | None = None,
        json: Any = None,
        data: bytes | None = None,
        **query: str,
    ) -> tuple[int, Any]:
        """Call ``route`` (as the file writes it; ``path`` fills it in) and check the
        answer against the file's schema for that route and status."""
        status, body = await self.raw(
            method, path or route, token=token, json=json, data=data, **query
        )
        check_reply(method, route, status, body)
        return status, body

    async def raw(
        self,
        method: str,
        path: str,
        *,
        token: str | None = None,
        json: Any = None,
        data: bytes | None = None,
        **query: str,
    ) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        async with (
            aiohttp.ClientSession() as session,
            session.request(
                method, self.base + path, headers=headers, json=json, data=data, params=query
            ) as response,
        ):
            return response.status, await response.json(content_type=None)


@contextlib.asynccontextmanager
async def running_bridge(
    hs: TestHomeserver, db: Path, *, per_minute: int = 600, clock: Clock | None = None
) -> AsyncIterator[Bridge]:
    config = Config(
        homeserver=HomeserverConfig(url=hs.url),
        appservice=AppServiceConfig(
            registration=str(hs.registration_path), store=f"sqlite:///{db}", port=hs.appservice_port
        ),
        bridge=BridgeConfig(permissions={"*": "relay", "test.local": "user"}),
    )
    app = AppService(config)
    connector = FlowNet()
    status = StatusReporter(metrics=app.metrics)

    async def finish(user_id: str, info: LoginInfo, relogin: str | None, room: str | None) -> str:
        record = LoginRecord(info.id, user_id, info.remote_name, LoginState.CONNECTED)
        await app.store.put_login(record)
        await status.set_login(user_id, info.id, LoginState.CONNECTED, remote_name=info.remote_name)
        return info.id

    async def logout(record: LoginRecord) -> None:
        await app.store.delete_login(record.id)
        await status.set_login(record.user_id, record.id, StateEvent.LOGGED_OUT)

    sessions = LoginSessions(connector.create_login, finish)
    host = AppHost(app, connector, logout)
    settings = ProvisioningSettings(shared_secret=SECRET, per_minute=per_minute)
    api = ProvisioningAPI(host, sessions, status, settings, clock=clock or Clock())
    app.web_apps[PREFIX] = api.app
    async with app:
        connector.bot = app.bot
        yield Bridge(app, api, connector)
        await sessions.close()


@pytest.fixture
async def bridge(hs: TestHomeserver, tmp_path: Path) -> AsyncIterator[Bridge]:
    async with running_bridge(hs, tmp_path / "bridge.db") as running:
        yield running


async def a_user(hs: TestHomeserver, name: str) -> tuple[str, str]:
    """A new local user: their ID and access token."""
    return f"@{name}:test.local", await hs.create_user(name)


# -- auth ------------------------------------------------------------------------------------


async def test_whoami_with_a_local_access_token(
    bridge: Bridge, hs: TestHomeserver, unique: str
) -> None:
    user_id, token = await a_user(hs, f"who{unique}")
    status, body = await bridge.call("GET", "/v3/whoami", token=token)
    assert status == 200
    assert body["bridge_bot"] == bridge.app.bot.user_id
    assert body["homeserver"] == "test.local"
    assert body["network"]["network_id"] == "flownet"
    assert [f["id"] for f in body["login_flows"]] == ["password", "qr", "cookies"]
    assert body["logins"] == []
    # The same user named explicitly is the same; another user is not.
    assert (await bridge.call("GET", "/v3/whoami", token=token, user_id=user_id))[0] == 200
    status, body = await bridge.call("GET", "/v3/whoami", token=token, user_id="@x:test.local")
    assert (status, body["errcode"]) == (401, "M_UNKNOWN_TOKEN")


async def test_missing_and_wrong_tokens_get_the_files_401s(bridge: Bridge) -> None:
    status, body = await bridge.call("GET", "/v3/whoami")
    assert (status, body) == (401, {"errcode": "M_MISSING_TOKEN", "error": "Missing auth token"})
    status, body = await bridge.call("GET", "/v3/login/flows", token="not-a-token")
    assert (status, body) == (401, {"errcode": "M_UNKNOWN_TOKEN", "error": "Invalid auth token"})


async def test_the_shared_secret_acts_for_the_named_user(bridge: Bridge) -> None:
    status, body = await bridge.call("GET", "/v3/logins", token=SECRET, user_id="@ann:test.local")
    assert (status, body) == (200, {"login_ids": []})
    # Without user_id the secret says nobody: a clear error, not a guess.
    status, body = await bridge.raw("GET", "/v3/logins", token=SECRET)
    assert (status, body["errcode"]) == (400, "M_MISSING_PARAM")
    status, body = await bridge.raw("GET", "/v3/logins", token=SECRET, user_id="not an id")
    assert (status, body["errcode"]) == (400, "M_INVALID_PARAM")
    # A prefix of the secret is no secret.
    status, body = await bridge.call(
        "GET", "/v3/logins", token=SECRET[:-1], user_id="@a:test.local"
    )
    assert (status, body["errcode"]) == (401, "M_UNKNOWN_TOKEN")


async def test_a_user_without_the_user_permission_is_forbidden(bridge: Bridge) -> None:
    status, body = await bridge.raw(
        "GET", "/v3/whoami", token=SECRET, user_id="@guest:elsewhere.example"
    )
    assert (status, body) == (
        403,
        {"errcode": "M_FORBIDDEN", "error": "User does not have login permissions"},
    )


async def test_an_openid_token_is_checked_with_the_users_server(
    bridge: Bridge, hs: TestHomeserver, unique: str
) -> None:
    user_id, token = await a_user(hs, f"oid{unique}")
    url = f"{hs.url}/_matrix/client/v3/user/{quote(user_id)}/openid/request_token"
    async with hs.http.post(url, json={}, headers={"Authorization": f"Bearer {token}"}) as resp:
        assert resp.status == 200, await resp.text()
        openid = (await resp.json())["access_token"]
    status, body = await bridge.call("GET", "/v3/whoami", token=f"openid:{openid}", user_id=user_id)
    assert status == 200, body
    status, body = await bridge.call(
        "GET", "/v3/whoami", token=f"openid:{openid}", user_id=f"@other{unique}:test.local"
    )
    assert (status, body["errcode"]) == (401, "M_UNKNOWN_TOKEN")
    status, body = await bridge.call("GET", "/v3/whoami", token="openid:forged", user_id=user_id)
    assert (status, body["errcode"]) == (401, "M_UNKNOWN_TOKEN")


async def test_a_checked_token_is_trusted_for_a_while_then_asked_again(
    hs: TestHomeserver, tmp_path: Path, unique: str
) -> None:
    clock = Clock()
    async with running_bridge(hs, tmp_path / "b.db", clock=clock) as bridge:
        _, token = await a_user(hs, f"cache{unique}")
        assert (await bridge.call("GET", "/v3/logins", token=token))[0] == 200
        logout = f"{hs.url}/_matrix/client/v3/logout"
        async with hs.http.post(logout, headers={"Authorization": f"Bearer {token}"}) as resp:
            assert resp.status == 200
        # The homeserver no longer knows the token; the cache still does.
        assert (await bridge.call("GET", "/v3/logins", token=token))[0] == 200
        clock.now += TOKEN_CACHE_SECONDS + 1
        status, body = await bridge.call("GET", "/v3/logins", token=token)
        assert (status, body["errcode"]) == (401, "M_UNKNOWN_TOKEN")


async def test_each_user_has_a_rate_limit(hs: TestHomeserver, tmp_path: Path) -> None:
    clock = Clock()
    async with running_bridge(hs, tmp_path / "b.db", per_minute=2, clock=clock) as bridge:
        for _ in range(2):
            assert (await bridge.call("GET", "/v3/logins", token=SECRET, user_id="@a:test.local"))[
                0
            ] == 200
        status, body = await bridge.raw("GET", "/v3/logins", token=SECRET, user_id="@a:test.local")
        assert (status, body["errcode"]) == (429, "M_LIMIT_EXCEEDED")
        assert body["retry_after_ms"] > 0
        # Another user has a budget of their own; time refills the first one's.
        assert (await bridge.raw("GET", "/v3/logins", token=SECRET, user_id="@b:test.local"))[
            0
        ] == 200
        clock.now += 30
        assert (await bridge.raw("GET", "/v3/logins", token=SECRET, user_id="@a:test.local"))[
            0
        ] == 200


async def test_made_up_tokens_are_asked_about_within_a_budget_per_address(
    hs: TestHomeserver, tmp_path: Path, unique: str
) -> None:
    """Each unknown token costs a request to a server (the homeserver's whoami, or
    any server named in an OpenID user ID): a client flooding made-up ones gets 429s,
    not one outgoing request each."""
    clock = Clock()
    async with running_bridge(hs, tmp_path / "b.db", per_minute=2, clock=clock) as bridge:
        _, token = await a_user(hs, f"flood{unique}")
        assert (await bridge.call("GET", "/v3/logins", token=token))[0] == 200  # one lookup
        status, body = await bridge.call("GET", "/v3/logins", token=f"made-up-1{unique}")
        assert (status, body["errcode"]) == (401, "M_UNKNOWN_TOKEN")
        for made_up in (f"made-up-2{unique}", f"openid:made-up-3{unique}"):
            status, body = await bridge.raw(
                "GET", "/v3/logins", token=made_up, user_id=f"@x:{unique}.example"
            )
            assert (status, body["errcode"]) == (429, "M_LIMIT_EXCEEDED")
            assert body["retry_after_ms"] > 0
        # A token known already, or the shared secret, asks nobody: still answered.
        assert (await bridge.call("GET", "/v3/logins", token=token))[0] == 200
        assert (await bridge.call("GET", "/v3/logins", token=SECRET, user_id="@a:test.local"))[
            0
        ] == 200
        clock.now += 60
        status, body = await bridge.call("GET", "/v3/logins", token=f"made-up-4{unique}")
        assert (status, body["errcode"]) == (401, "M_UNKNOWN_TOKEN")


async def test_cors_for_web_clients(bridge: Bridge) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.options(
            bridge.base + "/v3/whoami",
            headers={"Origin": "https://app.example", "Access-Control-Request-Method": "GET"},
        ) as preflight,
    ):
        assert preflight.status == 200
        assert preflight.headers["Access-Control-Allow-Origin"] == "*"
        assert "Authorization" in preflight.headers["Access-Control-Allow-Headers"]
    headers = {"Authorization": f"Bearer {SECRET}"}
    async with (
        aiohttp.ClientSession() as session,
        session.get(bridge.base + "/v3/logins?user_id=@c:test.local", headers=headers) as ok,
        session.get(bridge.base + "/v3/logins") as refused,
    ):
        assert ok.headers["Access-Control-Allow-Origin"] == "*"
        assert refused.headers["Access-Control-Allow-Origin"] == "*"


async def test_unknown_routes_and_methods_answer_json(bridge: Bridge) -> None:
    status, body = await bridge.raw("GET", "/v3/nothing", token=SECRET, user_id="@a:test.local")
    assert (status, body["errcode"]) == (404, "M_UNRECOGNIZED")
    status, body = await bridge.raw(
        "GET", "/v3/login/start/password", token=SECRET, user_id="@a:test.local"
    )
    assert (status, body["errcode"]) == (405, "M_UNRECOGNIZED")


# -- logging in ------------------------------------------------------------------------------


def as_user(user: str) -> dict[str, str]:
    return {"token": SECRET, "user_id": user}


def step_route(kind: str) -> str:
    return f"/v3/login/step/{{loginProcessID}}/{{stepID}}/{kind}"


def step_path(step: dict[str, Any], kind: str | None = None) -> str:
    return f"/v3/login/step/{step['login_id']}/{step['step_id']}/{kind or step['type']}"


async def test_password_flow_logs_in_lists_and_logs_out(bridge: Bridge, unique: str) -> None:
    me = as_user(f"@pw{unique}:test.local")
    status, flows = await bridge.call("GET", "/v3/login/flows", **me)
    assert [f["id"] for f in flows["flows"]] == ["password", "qr", "cookies"]
    status, step = await bridge.call(
        "POST", "/v3/login/start/{flowID}", path="/v3/login/start/password", **me
    )
    assert (status, step["type"]) == (200, "user_input")
    fields = step["user_input"]["fields"]
    assert [(f["id"], f["type"]) for f in fields] == [
        ("name", "username"),
        ("password", "password"),
        ("otp", "2fa_code"),
    ]
    status, done = await bridge.call(
        "POST",
        step_route("user_input"),
        path=step_path(step),
        json={"name": "alice", "password": "wonderland"},
        **me,
    )
    assert (status, done["type"], done["complete"]) == (
        200,
        "complete",
        {"user_login_id": "fn-alice"},
    )
    assert await bridge.call("GET", "/v3/logins", **me) == (200, {"login_ids": ["fn-alice"]})
    status, whoami = await bridge.call("GET", "/v3/whoami", **me)
    (login,) = whoami["logins"]
    assert (login["id"], login["name"], login["state"]["state_event"]) == (
        "fn-alice",
        "alice",
        "CONNECTED",
    )
    assert await bridge.call("POST", "/v3/logout/{loginID}", path="/v3/logout/fn-alice", **me) == (
        200,
        {},
    )
    assert await bridge.call("GET", "/v3/logins", **me) == (200, {"login_ids": []})
    status, body = await bridge.call(
        "POST", "/v3/logout/{loginID}", path="/v3/logout/fn-alice", **me
    )
    assert (status, body["errcode"]) == (404, "M_NOT_FOUND")


async def test_a_wrong_password_ends_the_process_with_its_reason(
    bridge: Bridge, unique: str
) -> None:
    me = as_user(f"@bad{unique}:test.local")
    _, step = await bridge.call(
        "POST", "/v3/login/start/{flowID}", path="/v3/login/start/password", **me
    )
    status, body = await bridge.raw(
        "POST", step_path(step), json={"name": "alice", "password": "guess"}, **me
    )
    assert (status, body) == (
        400,
        {"errcode": "M_INVALID_PARAM", "error": "wrong name or password"},
    )
    status, body = await bridge.call(
        "POST",
        step_route("user_input"),
        path=step_path(step),
        json={"name": "alice", "password": "wonderland"},
        **me,
    )
    assert (status, body["errcode"]) == (404, "M_NOT_FOUND")


async def test_a_step_must_be_the_one_shown(bridge: Bridge, unique: str) -> None:
    me = as_user(f"@step{unique}:test.local")
    _, step = await bridge.call(
        "POST", "/v3/login/start/{flowID}", path="/v3/login/start/password", **me
    )
    wrong_id = f"/v3/login/step/{step['login_id']}/other.step/user_input"
    status, body = await bridge.call("POST", step_route("user_input"), path=wrong_id, json={}, **me)
    assert (status, body["errcode"]) == (400, "M_BAD_STATE")
    status, body = await bridge.call(
        "POST", step_route("cookies"), path=step_path(step, "cookies"), json={}, **me
    )
    assert (status, body["errcode"]) == (400, "M_BAD_STATE")
    status, body = await bridge.call(
        "POST", step_route("user_input"), path=step_path(step), data=b"{not json", **me
    )
    assert (status, body["errcode"]) == (400, "M_NOT_JSON")
    status, body = await bridge.raw(
        "POST", step_path(step), data=b'{"name": "' + b"x" * 70_000 + b'"}', **me
    )
    assert (status, body["errcode"]) == (413, "M_TOO_LARGE")
    # Missing required fields are refused before the connector sees them.
    status, body = await bridge.raw("POST", step_path(step), json={"name": "alice"}, **me)
    assert (status, body["errcode"], body["error"]) == (
        400,
        "M_INVALID_PARAM",
        "missing value for password",
    )


async def test_another_users_process_is_not_found(bridge: Bridge, unique: str) -> None:
    _, step = await bridge.call(
        "POST",
        "/v3/login/start/{flowID}",
        path="/v3/login/start/password",
        **as_user(f"@a{unique}:test.local"),
    )
    thief = as_user(f"@b{unique}:test.local")
    status, body = await bridge.call(
        "POST",
        step_route("user_input"),
        path=step_path(step),
        json={"name": "alice", "password": "wonderland"},
        **thief,
    )
    assert (status, body["errcode"]) == (404, "M_NOT_FOUND")
    path = f"/v3/login/cancel/{step['login_id']}"
    status, body = await bridge.call(
        "POST", "/v3/login/cancel/{loginProcessID}", path=path, **thief
    )
    assert (status, body["errcode"]) == (404, "M_NOT_FOUND")


async def test_qr_flow_waits_until_scanned(bridge: Bridge, unique: str) -> None:
    me = as_user(f"@qr{unique}:test.local")
    _, step = await bridge.call("POST", "/v3/login/start/{flowID}", path="/v3/login/start/qr", **me)
    assert step["display_and_wait"] == {"type": "qr", "data": "flownet:login:1234"}
    waiting = asyncio.create_task(
        bridge.call("POST", step_route("display_and_wait"), path=step_path(step), **me)
    )
    await asyncio.sleep(0)
    assert not waiting.done()
    bridge.connector.scanned.set()
    status, done = await asyncio.wait_for(waiting, TIMEOUT)
    assert (status, done["complete"]) == (200, {"user_login_id": "fn-qr"})


async def test_a_wait_nobody_completes_ends_the_process(bridge: Bridge, unique: str) -> None:
    bridge.api.sessions.step_timeout = 0.2
    me = as_user(f"@late{unique}:test.local")
    _, step = await bridge.call("POST", "/v3/login/start/{flowID}", path="/v3/login/start/qr", **me)
    status, body = await bridge.call(
        "POST", step_route("display_and_wait"), path=step_path(step), **me
    )
    assert (status, body) == (404, {"errcode": "M_NOT_FOUND", "error": "Login process timed out"})
    assert bridge.connector.processes[-1].cancelled  # type: ignore[attr-defined]
    assert bridge.api.sessions.of_user(me["user_id"]) == []


async def test_cookie_flow(bridge: Bridge, unique: str) -> None:
    me = as_user(f"@ck{unique}:test.local")
    _, step = await bridge.call(
        "POST", "/v3/login/start/{flowID}", path="/v3/login/start/cookies", **me
    )
    assert step["cookies"]["fields"] == [
        {"type": "cookie", "name": "session", "cookie_domain": "flownet.example"}
    ]
    status, done = await bridge.call(
        "POST", step_route("cookies"), path=step_path(step), json={"session": "s3cr3t"}, **me
    )
    assert (status, done["complete"]) == (200, {"user_login_id": "fn-web"})


async def test_cancel_ends_a_process(bridge: Bridge, unique: str) -> None:
    me = as_user(f"@cx{unique}:test.local")
    _, step = await bridge.call("POST", "/v3/login/start/{flowID}", path="/v3/login/start/qr", **me)
    path = f"/v3/login/cancel/{step['login_id']}"
    assert await bridge.call("POST", "/v3/login/cancel/{loginProcessID}", path=path, **me) == (
        200,
        {},
    )
    assert bridge.connector.processes[-1].cancelled  # type: ignore[attr-defined]
    status, body = await bridge.call(
        "POST", step_route("display_and_wait"), path=step_path(step), **me
    )
    assert (status, body["errcode"]) == (404, "M_NOT_FOUND")


async def test_an_unknown_flow_is_not_found(bridge: Bridge) -> None:
    status, body = await bridge.call(
        "POST", "/v3/login/start/{flowID}", path="/v3/login/start/sms", **as_user("@u:test.local")
    )
    assert (status, body["errcode"]) == (404, "M_NOT_FOUND")


# -- starting chats --------------------------------------------------------------------------


async def logged_in(bridge: Bridge, me: dict[str, str]) -> None:
    _, step = await bridge.call(
        "POST", "/v3/login/start/{flowID}", path="/v3/login/start/password", **me
    )
    await bridge.call(
        "POST",
        step_route("user_input"),
        path=step_path(step),
        json={"name": "bob", "password": "builder"},
        **me,
    )


async def test_resolve_and_create_dm_through_the_connector(bridge: Bridge, unique: str) -> None:
    me = as_user(f"@dm{unique}:test.local")
    route = "/v3/resolve_identifier/{identifier}"
    status, body = await bridge.call("GET", route, path="/v3/resolve_identifier/alice", **me)
    assert (status, body["errcode"]) == (404, "M_NOT_FOUND")  # no login yet
    await logged_in(bridge, me)
    status, body = await bridge.call("GET", route, path="/v3/resolve_identifier/alice", **me)
    assert (status, body) == (200, {"id": "alice", "name": "Alice"})
    status, body = await bridge.call("GET", route, path="/v3/resolve_identifier/nobody", **me)
    assert (status, body["errcode"]) == (404, "M_NOT_FOUND")
    status, body = await bridge.call(
        "POST", "/v3/create_dm/{identifier}", path="/v3/create_dm/alice", **me
    )
    assert status == 200 and body["dm_room_mxid"].startswith("!")
    members = await bridge.app.bot.get_joined_members(body["dm_room_mxid"])
    assert bridge.app.bot.user_id in members
    status, body = await bridge.call("POST", "/v3/search_users", json={"query": "b"}, **me)
    assert (status, body) == (200, {"results": [{"id": "bob"}]})
    status, body = await bridge.call(
        "GET", route, path="/v3/resolve_identifier/alice", login_id="fn-nope", **me
    )
    assert (status, body["errcode"]) == (404, "M_NOT_FOUND")


async def test_what_the_connector_cannot_do_is_501(bridge: Bridge, unique: str) -> None:
    me = as_user(f"@no{unique}:test.local")
    await logged_in(bridge, me)
    status, body = await bridge.call("GET", "/v3/contacts", **me)
    assert (status, body["errcode"]) == (501, "M_UNRECOGNIZED")
    status, body = await bridge.call(
        "POST", "/v3/create_group/{type}", path="/v3/create_group/channel", json={}, **me
    )
    assert (status, body["errcode"]) == (501, "M_UNRECOGNIZED")


# -- the login process without HTTP -----------------------------------------------------------


async def test_the_login_command_drives_the_same_flows(bridge: Bridge, unique: str) -> None:
    sessions = bridge.api.sessions
    user = f"@cmd{unique}:test.local"
    step = await login_with_args(sessions, user, "password", ["bob", "builder"])
    assert (step.type, step.login_id) == (StepType.COMPLETE, "fn-bob")
    with pytest.raises(InvalidInput, match="missing Password"):
        await login_with_args(sessions, user, "password", ["bob"])
    step = await login_with_args(sessions, user, "qr", [])
    assert step.type is StepType.DISPLAY_AND_WAIT
    assert sessions.of_user(user) == []  # what the command cannot finish is not left behind

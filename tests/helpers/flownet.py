"""FlowNet: a tiny in-process network whose logins take steps, for the login-flow tests.

Three flows, one per kind of step: ``password`` (a ``user_input`` step, the
account name and its password), ``qr`` (a ``display_and_wait`` step that
finishes once the test "scans" the code) and ``cookies`` (a ``cookies`` step).
It also finds users and opens DMs (:class:`~bridge_kit.bridge.provisioning.ChatStarter`),
each DM a real room the bridge bot creates.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

from bridge_kit.bridge.connector import LoginHandle, LoginInfo, NetworkClient, NetworkConnector
from bridge_kit.bridge.login_flows import (
    CookieField,
    CookiesParams,
    DisplayParams,
    DisplayType,
    FieldType,
    InputField,
    LoginFlow,
    LoginProcess,
    LoginStep,
)
from bridge_kit.bridge.provisioning import ResolvedIdentifier
from bridge_kit.bridge.records import LoginRecord
from bridge_kit.errors import InvalidInput
from bridge_kit.intent import Intent

ACCOUNTS = {"alice": "wonderland", "bob": "builder"}
FLOWS = (
    LoginFlow("password", "Password", "Log in with your FlowNet name and password"),
    LoginFlow("qr", "QR code", "Scan a code with the FlowNet app"),
    LoginFlow("cookies", "Web login", "Log in on the FlowNet website"),
)


class PasswordLogin(LoginProcess[LoginInfo]):
    async def start(self) -> LoginStep[LoginInfo]:
        fields = [
            InputField(FieldType.USERNAME, "name", "Name"),
            InputField(FieldType.PASSWORD, "password", "Password"),
            InputField(FieldType.TWO_FACTOR_CODE, "otp", "One-time code", optional=True),
        ]
        return LoginStep.user_input("net.flownet.password", fields, "Your FlowNet account")

    async def submit_user_input(self, values: Mapping[str, str]) -> LoginStep[LoginInfo]:
        name = values["name"]
        if ACCOUNTS.get(name) != values["password"]:
            raise InvalidInput("wrong name or password")
        return LoginStep.complete("net.flownet.done", LoginInfo(id=f"fn-{name}", remote_name=name))


class QrLogin(LoginProcess[LoginInfo]):
    def __init__(self, scanned: asyncio.Event) -> None:
        self.scanned = scanned
        self.cancelled = False

    async def start(self) -> LoginStep[LoginInfo]:
        params = DisplayParams(DisplayType.QR, data="flownet:login:1234")
        return LoginStep.display_and_wait("net.flownet.qr", params, "Scan this code")

    async def wait(self) -> LoginStep[LoginInfo]:
        await self.scanned.wait()
        return LoginStep.complete("net.flownet.done", LoginInfo(id="fn-qr", remote_name="qr-user"))

    async def cancel(self) -> None:
        self.cancelled = True


class CookieLogin(LoginProcess[LoginInfo]):
    async def start(self) -> LoginStep[LoginInfo]:
        params = CookiesParams(
            url="https://flownet.example/login",
            fields=(CookieField("cookie", "session", cookie_domain="flownet.example"),),
        )
        return LoginStep.cookies_step("net.flownet.cookies", params)

    async def submit_cookies(self, values: Mapping[str, str]) -> LoginStep[LoginInfo]:
        if not values.get("session"):
            raise InvalidInput("no session cookie")
        info = LoginInfo(
            id="fn-web", remote_name="web-user", credentials=values["session"].encode()
        )
        return LoginStep.complete("net.flownet.done", info)


class FlowNet(NetworkConnector):
    network_id = "flownet"
    display_name = "FlowNet"
    network_url = "https://flownet.example"
    network_icon = "mxc://flownet.example/icon"

    def __init__(self) -> None:
        self.scanned = asyncio.Event()
        self.processes: list[LoginProcess[LoginInfo]] = []
        self.bot: Intent | None = None

    def login_flows(self) -> Sequence[LoginFlow]:
        return FLOWS

    async def create_login(self, user_id: str, flow_id: str) -> LoginProcess[LoginInfo] | None:
        process: LoginProcess[LoginInfo]
        if flow_id == "password":
            process = PasswordLogin()
        elif flow_id == "qr":
            process = QrLogin(self.scanned)
        elif flow_id == "cookies":
            process = CookieLogin()
        else:
            return None
        self.processes.append(process)
        return process

    def load_login(self, login: LoginHandle) -> NetworkClient:
        raise NotImplementedError("FlowNet logins have no client in these tests")

    async def login(self, user_id: str, args: Sequence[str]) -> LoginInfo:
        raise InvalidInput("use the login flows")

    # -- ChatStarter ------------------------------------------------------------

    async def resolve_identifier(
        self, login: LoginRecord, identifier: str, create_dm: bool
    ) -> ResolvedIdentifier | None:
        if identifier not in ACCOUNTS:
            return None
        found = ResolvedIdentifier(id=identifier, name=identifier.title())
        if not create_dm:
            return found
        assert self.bot is not None
        room_id = await self.bot.create_room(name=f"{found.name} (FlowNet)", is_direct=True)
        mxid = f"@flownet_{identifier}:test.local"
        return ResolvedIdentifier(id=identifier, name=found.name, mxid=mxid, dm_room_mxid=room_id)

    async def search_users(self, login: LoginRecord, query: str) -> Sequence[ResolvedIdentifier]:
        return [ResolvedIdentifier(id=name) for name in sorted(ACCOUNTS) if query in name]

    async def contacts(self, login: LoginRecord) -> Sequence[ResolvedIdentifier]:
        raise NotImplementedError

    async def create_group(
        self, login: LoginRecord, group_type: str, params: Mapping[str, Any]
    ) -> tuple[str, str]:
        raise NotImplementedError

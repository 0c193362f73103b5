"""A tiny in-process remote network, and its connector for the bridge layer.

It is not IRC: chats have ids, messages have ids, and it takes edits, reactions,
redactions and replies, so the layer is tested on what a modern network does.
What Matrix users do arrives in :attr:`ToyNetwork.received`; tests play the
remote users by calling ``bridge.handle_remote``.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import attrs

from bridge_kit.bridge.connector import (
    BridgeContext,
    Capabilities,
    ChatInfo,
    LoginHandle,
    LoginInfo,
    MatrixEdit,
    MatrixMessage,
    MatrixReaction,
    MatrixReactionRemove,
    MatrixRedaction,
    MatrixTyping,
    NetworkClient,
    NetworkConnector,
    SentMessage,
    UserInfo,
)
from bridge_kit.bridge.events import Sender
from bridge_kit.bridge.records import LoginState, PortalKey
from bridge_kit.config import Section
from bridge_kit.errors import InvalidInput, LoginRefused, RemoteError

TIMEOUT = 30.0


@attrs.frozen
class ToyConfig(Section):
    """``toy:`` in the config: the bridged chats at start."""

    section: ClassVar[str] = "toy"

    chats: list[str] = attrs.field(factory=list)


@attrs.define
class ToyChat:
    name: str
    topic: str = ""
    members: dict[str, str] = attrs.field(factory=dict)  # remote id -> name


@attrs.frozen
class Received:
    """Something a login sent to the network: ``what`` is message/edit/reaction/..."""

    login: str
    what: str
    item: Any


class ToyNetwork:
    """The remote side: its chats and users, and what Matrix users sent to it."""

    def __init__(self) -> None:
        self.chats: dict[str, ToyChat] = {}
        self.users: dict[str, str] = {}
        self.received: list[Received] = []
        self.connects: list[str] = []
        #: Connects of a login that fail (a network hiccup) before one succeeds.
        self.failing_connects: dict[str, int] = {}
        #: Logins whose credentials the network refuses.
        self.refused: set[str] = set()
        #: Messages sent from Matrix that fail (before reaching the network).
        self.failing_sends = 0
        self._changed = asyncio.Condition()
        self._ids = itertools.count(1)

    def add_chat(self, chat_id: str, name: str, members: dict[str, str]) -> None:
        self.chats[chat_id] = ToyChat(name, f"topic of {name}", dict(members))
        self.users.update(members)

    async def record(self, login: str, what: str, item: Any) -> str:
        async with self._changed:
            self.received.append(Received(login, what, item))
            self._changed.notify_all()
        return f"toy{next(self._ids)}"

    def of(self, what: str) -> list[Received]:
        return [r for r in self.received if r.what == what]

    async def wait_for(
        self, what: str, where: Callable[[Received], bool] = lambda r: True
    ) -> Received:
        """The first received ``what`` that matches ``where``, when it comes."""

        def found() -> Received | None:
            return next((r for r in self.of(what) if where(r)), None)

        async with asyncio.timeout(TIMEOUT), self._changed:
            await self._changed.wait_for(lambda: found() is not None)
        result = found()
        assert result is not None
        return result


class ToyClient(NetworkClient):
    def __init__(self, network: ToyNetwork, login: LoginHandle) -> None:
        self.network = network
        self.login = login

    async def connect(self) -> None:
        login_id = self.login.id
        self.network.connects.append(login_id)
        if login_id in self.network.refused:
            raise LoginRefused(f"{login_id}: wrong password")
        if self.network.failing_connects.get(login_id, 0) > 0:
            self.network.failing_connects[login_id] -= 1
            raise RemoteError("the toy network hiccuped")
        await self.login.set_state(LoginState.CONNECTED)

    async def disconnect(self) -> None:
        return None

    async def send_message(self, message: MatrixMessage) -> SentMessage:
        if self.network.failing_sends > 0:
            self.network.failing_sends -= 1
            raise RemoteError("the toy network dropped the message")
        remote_id = await self.network.record(self.login.id, "message", message)
        return SentMessage(remote_id)

    async def send_edit(self, edit: MatrixEdit) -> None:
        await self.network.record(self.login.id, "edit", edit)

    async def send_reaction(self, reaction: MatrixReaction) -> str | None:
        return await self.network.record(self.login.id, "reaction", reaction)

    async def send_reaction_remove(self, removal: MatrixReactionRemove) -> None:
        await self.network.record(self.login.id, "reaction_remove", removal)

    async def send_redaction(self, redaction: MatrixRedaction) -> None:
        await self.network.record(self.login.id, "redaction", redaction)

    async def send_typing(self, typing: MatrixTyping) -> None:
        await self.network.record(self.login.id, "typing", typing)


class ToyConnector(NetworkConnector):
    network_id = "toy"
    display_name = "Toy"
    capabilities = Capabilities(
        edits=True, reactions=True, redactions=True, replies=True, typing=True, formatting=True
    )
    config_sections = (ToyConfig,)
    ghost_localpart_template = "_bk_toy_{id}"
    alias_localpart_template = "_bk_toy_{id}"
    default_relay_login = "relay"

    def __init__(self, network: ToyNetwork) -> None:
        self.network = network
        self.bridge: BridgeContext | None = None

    async def start(self, bridge: BridgeContext) -> None:
        self.bridge = bridge
        await bridge.add_login(bridge.app.bot.user_id, LoginInfo(id="relay", remote_name="relay"))
        for chat in bridge.config.section(ToyConfig).chats:
            await bridge.ensure_portal(PortalKey(chat))

    def load_login(self, login: LoginHandle) -> NetworkClient:
        return ToyClient(self.network, login)

    async def login(self, user_id: str, args: Sequence[str]) -> LoginInfo:
        if len(args) != 1:
            raise InvalidInput("login takes one argument: your toy name")
        return LoginInfo(id=args[0], remote_name=args[0], credentials=b"secret-" + args[0].encode())

    async def get_chat_info(self, portal: PortalKey) -> ChatInfo | None:
        chat = self.network.chats.get(portal.id)
        if chat is None:
            return None
        members = [Sender(remote_id, name) for remote_id, name in chat.members.items()]
        return ChatInfo(name=chat.name, topic=chat.topic, members=members)

    async def get_user_info(self, user_id: str) -> UserInfo | None:
        name = self.network.users.get(user_id)
        return None if name is None else UserInfo(name=name)

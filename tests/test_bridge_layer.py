"""The bridge layer on real Synapse, driven by a tiny in-process network (the toy).

A real Matrix user (the project's own client with a user token) plays the human;
the tests play the toy network's users by handing remote events to the bridge.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import attrs
import pytest
from aiohttp import web

from bridge_kit import AppService, AppServiceConfig, Config, HomeserverClient, HomeserverConfig
from bridge_kit.bridge.bridge import Bridge
from bridge_kit.bridge.connector import ChatInfo, LoginInfo
from bridge_kit.bridge.core import RELAY_OFF
from bridge_kit.bridge.events import (
    Membership,
    MessageKind,
    RemoteChatInfoChange,
    RemoteEdit,
    RemoteMedia,
    RemoteMembership,
    RemoteMessage,
    RemoteProfileChange,
    RemoteReaction,
    RemoteRedaction,
    Sender,
)
from bridge_kit.bridge.portals import CREATING_ROOM
from bridge_kit.bridge.records import LoginState, PortalKey, PortalRecord
from bridge_kit.client.homeserver import ClientObserver
from bridge_kit.config import BridgeConfig, EncryptionConfig
from bridge_kit.errors import MatrixRequestError
from bridge_kit.store import Store, open_store
from bridge_kit.store.memory import MemoryStore
from bridge_kit.testing.synapse import free_port
from bridge_kit.types import Event
from tests.conftest import TestHomeserver, _running_homeserver, scratch_database
from tests.helpers.toy_network import Received, ToyConfig, ToyConnector, ToyNetwork
from tests.test_store import run_sql

T = TypeVar("T")
TIMEOUT = 60.0
DOMAIN = "test.local"


@pytest.fixture(scope="module")
async def homeserver(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[TestHomeserver]:
    # devices=True: the registration also asks for ephemeral events (typing).
    async with _running_homeserver(tmp_path_factory.mktemp("bridge"), devices=True) as hs:
        yield hs


class Registrations(ClientObserver):
    """Counts registration requests (a restart must send none)."""

    def __init__(self) -> None:
        self.count = 0

    def on_response(
        self, method: str, endpoint: str, status: int, errcode: str | None, seconds: float
    ) -> None:
        if endpoint.endswith("/register"):
            self.count += 1


def make_bridge(
    hs: TestHomeserver,
    store: Store,
    network: ToyNetwork,
    chats: tuple[str, ...] = (),
    *,
    port: int | None = None,
    pickle_key: str | None = None,
    level: str = "user",
    connector: ToyConnector | None = None,
) -> Bridge:
    """A bridge on the toy network; ``port``: a second daemon, which the homeserver
    does not push to (only the registration's port is pinged)."""
    config = Config(
        homeserver=HomeserverConfig(url=hs.url),
        appservice=AppServiceConfig(
            registration=str(hs.registration_path), port=port or hs.appservice_port
        ),
        bridge=BridgeConfig(permissions={DOMAIN: level}),
        encryption=EncryptionConfig(pickle_key=pickle_key),
        extra_sections={"toy": ToyConfig(chats=list(chats))},
    )
    app = AppService(config, store=store, ping=port is None)
    return Bridge(app, connector or ToyConnector(network))


async def eventually(probe: Callable[[], Awaitable[T | None]], what: str) -> T:
    """``probe()``'s first true result; fails after TIMEOUT."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        result = await probe()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


class Human:
    """A real Matrix user on the homeserver."""

    def __init__(self, client: HomeserverClient, user_id: str) -> None:
        self.client = client
        self.user_id = user_id
        self._txn = 0

    async def call(self, method: str, path: str, body: Any = None, **query: str) -> dict[str, Any]:
        return await self.client.request(
            method, f"/_matrix/client/v3{path}", body=body, query=query or None
        )

    async def join(self, room: str) -> str:
        reply = await self.call("POST", f"/join/{quote(room, safe='')}", {})
        return str(reply["room_id"])

    async def send(
        self, room_id: str, content: dict[str, Any], kind: str = "m.room.message"
    ) -> str:
        self._txn += 1
        path = f"/rooms/{quote(room_id, safe='')}/send/{kind}/h{time.monotonic_ns()}{self._txn}"
        return str((await self.call("PUT", path, content))["event_id"])

    async def say(self, room_id: str, text: str) -> str:
        return await self.send(room_id, {"msgtype": "m.text", "body": text})

    async def events(self, room_id: str) -> list[dict[str, Any]]:
        path = f"/rooms/{quote(room_id, safe='')}/messages"
        reply = await self.call("GET", path, dir="b", limit="100")
        return list(reversed(reply["chunk"]))

    async def find(
        self, room_id: str, match: Callable[[dict[str, Any]], bool], what: str
    ) -> dict[str, Any]:
        async def probe() -> dict[str, Any] | None:
            return next((e for e in await self.events(room_id) if match(e)), None)

        return await eventually(probe, what)

    async def dm_with(self, user_id: str) -> str:
        reply = await self.call(
            "POST",
            "/createRoom",
            {"invite": [user_id], "is_direct": True, "preset": "trusted_private_chat"},
        )
        return str(reply["room_id"])


@contextlib.asynccontextmanager
async def human(hs: TestHomeserver, name: str) -> AsyncIterator[Human]:
    token = await hs.create_user(name)
    async with HomeserverClient(hs.url, token) as client:
        yield Human(client, f"@{name}:{DOMAIN}")


def body_is(text: str) -> Callable[[dict[str, Any]], bool]:
    return lambda e: e.get("type") == "m.room.message" and e["content"].get("body") == text


def lobby(network: ToyNetwork, chat: str) -> None:
    network.add_chat(chat, f"Lobby {chat}", {"bob": "Bob", "carol": "Carol"})


async def remote_says(bridge: Bridge, chat: str, msg_id: str, text: str, **kw: Any) -> bool:
    sender = kw.pop("sender", Sender("bob", "Bob"))
    event = RemoteMessage(portal=PortalKey(chat), sender=sender, id=msg_id, text=text, **kw)
    return await bridge.handle_remote(event)


async def mapped(bridge: Bridge, chat: str, msg_id: str) -> str:
    async def probe() -> str | None:
        parts = await bridge.app.store.messages(PortalKey(chat), msg_id)
        return parts[0].event_id if parts else None

    return await eventually(probe, f"remote message {msg_id} bridged")


# -- the tests ------------------------------------------------------------------------


async def test_remote_message_creates_the_portal_with_its_members(
    homeserver: TestHomeserver, unique: str
) -> None:
    network, chat = ToyNetwork(), f"c{unique}"
    lobby(network, chat)
    bridge = make_bridge(homeserver, MemoryStore(), network)
    async with bridge, human(homeserver, f"h{unique}") as alice:
        assert await remote_says(bridge, chat, "1", "hello **there**", html="hello <b>there</b>")
        assert not await remote_says(bridge, chat, "1", "hello **there**")  # redelivered: dropped
        event_id = await mapped(bridge, chat, "1")
        portal = await bridge.app.store.portal(PortalKey(chat))
        assert portal is not None and portal.room_id is not None
        # The human joins through the portal's alias: the same room.
        assert await alice.join(f"#_bk_toy_{chat}:{DOMAIN}") == portal.room_id
        message = await alice.find(portal.room_id, body_is("hello **there**"), "the message")
        assert message["event_id"] == event_id
        assert message["sender"] == f"@_bk_toy_bob:{DOMAIN}"
        assert message["content"]["formatted_body"] == "hello <b>there</b>"
        state_path = f"/_matrix/client/v3/rooms/{quote(portal.room_id, safe='')}/state"

        async def members() -> dict[str, Any] | None:
            state = await alice.client.request_json("GET", state_path)
            joined = {
                e["state_key"]: e["content"].get("displayname")
                for e in state
                if e["type"] == "m.room.member" and e["content"]["membership"] == "join"
            }
            # The members join in the background (a big chat outlasts a handler run).
            return joined if f"@_bk_toy_carol:{DOMAIN}" in joined else None

        joined = await eventually(members, "the chat's members")
        assert joined[f"@_bk_toy_bob:{DOMAIN}"] == "Bob"
        assert joined[f"@_bk_toy_carol:{DOMAIN}"] == "Carol"
        state = await alice.client.request_json("GET", state_path)
        kinds = {e["type"] for e in state}
        assert {"m.bridge", "uk.half-shot.bridge"} <= kinds
        bridge_info = next(e["content"] for e in state if e["type"] == "m.bridge")
        assert bridge_info["protocol"]["id"] == "toy"
        assert bridge_info["channel"]["id"] == chat
        # Emotes and notices keep their kind.
        await remote_says(bridge, chat, "2", "waves", kind=MessageKind.EMOTE)
        emote = await alice.find(portal.room_id, body_is("waves"), "the emote")
        assert emote["content"]["msgtype"] == "m.emote"


async def test_matrix_messages_are_relayed_then_sent_through_the_login(
    homeserver: TestHomeserver, unique: str
) -> None:
    network, chat = ToyNetwork(), f"c{unique}"
    lobby(network, chat)
    bridge = make_bridge(homeserver, MemoryStore(), network, chats=(chat,))
    async with bridge, human(homeserver, f"h{unique}") as alice:
        room_id = await alice.join(f"#_bk_toy_{chat}:{DOMAIN}")
        await alice.say(room_id, f"hi from matrix {unique}")
        got = await network.wait_for("message", lambda r: unique in r.item.text)
        assert got.login == "relay"
        assert got.item.relayed
        assert got.item.text == f"<h{unique}> hi from matrix {unique}"
        assert got.item.plain_text == f"hi from matrix {unique}"
        # In the management room (a DM with the bot) she logs in.
        dm = await alice.dm_with(bridge.app.bot.user_id)
        await alice.find(dm, lambda e: e.get("sender") == bridge.app.bot.user_id, "the welcome")
        await alice.say(dm, "logout")  # no login yet: one clear line
        await alice.find(dm, notice_with("You are not logged in."), "the logout refusal")
        await alice.say(dm, "login alice")
        await alice.find(
            dm, lambda e: "Logging in" in e.get("content", {}).get("body", ""), "reply"
        )
        login = await eventually(_connected(bridge, "alice"), "alice's login connected")
        assert login.user_id == alice.user_id
        stored = await bridge.app.store.login("alice")
        assert stored is not None and stored.credentials == b"secret-alice"
        await alice.say(room_id, f"now as me {unique}")
        own = await network.wait_for("message", lambda r: r.item.text == f"now as me {unique}")
        assert own.login == "alice" and not own.item.relayed
        # A command in the portal needs the prefix.
        await alice.say(room_id, "!bk logins")
        await alice.find(
            room_id, lambda e: "`alice`" in e.get("content", {}).get("body", ""), "logins"
        )


async def test_only_its_owner_or_an_admin_changes_a_portals_relay(
    homeserver: TestHomeserver, unique: str
) -> None:
    """A user may not take over, nor turn off, the relay another user set up: the
    other users' messages would go out through their account, or not at all."""
    network, chat = ToyNetwork(), f"c{unique}"
    lobby(network, chat)
    bridge = make_bridge(homeserver, MemoryStore(), network, chats=(chat,))
    alias = f"#_bk_toy_{chat}:{DOMAIN}"
    async with (
        bridge,
        human(homeserver, f"ra{unique}") as alice,
        human(homeserver, f"rb{unique}") as eve,
    ):
        room_id = await alice.join(alias)
        await eve.join(alias)
        for who, login_id in ((alice, f"la{unique}"), (eve, f"le{unique}")):
            dm = await who.dm_with(bridge.app.bot.user_id)
            await who.find(dm, lambda e: e.get("sender") == bridge.app.bot.user_id, "welcome")
            await who.say(dm, f"login {login_id}")
            await eventually(_connected(bridge, login_id), f"{login_id} connected")

        async def relay() -> str | None:
            portal = await bridge.app.store.portal(PortalKey(chat))
            assert portal is not None
            return portal.relay_login

        async def answered(who: Human, command: str, words: str) -> None:
            event_id = await who.say(room_id, command)

            def answer(e: dict[str, Any]) -> bool:
                content = e.get("content", {})
                replied = content.get("m.relates_to", {}).get("m.in_reply_to", {})
                return replied.get("event_id") == event_id and words in content.get("body", "")

            await who.find(room_id, answer, f"the answer to {command}")

        await answered(alice, "!bk set-relay", f"`la{unique}`")
        assert await relay() == f"la{unique}"
        await answered(eve, "!bk set-relay", "Only a bridge admin")
        await answered(eve, "!bk unset-relay", "Only a bridge admin")
        assert await relay() == f"la{unique}"
        await answered(alice, "!bk unset-relay", "Relaying is off")
        assert await relay() == RELAY_OFF
        # Off is nobody's relay: a user may relay through her own login again.
        await answered(eve, "!bk set-relay", f"`le{unique}`")
        assert await relay() == f"le{unique}"


async def test_a_login_typed_in_a_portal_is_refused_and_removed(
    homeserver: TestHomeserver, unique: str
) -> None:
    """Credentials typed in a shared room: refused (everyone there reads them), and
    the message redacted."""
    network, chat = ToyNetwork(), f"c{unique}"
    lobby(network, chat)
    bridge = make_bridge(homeserver, MemoryStore(), network, chats=(chat,))
    async with bridge, human(homeserver, f"h{unique}") as alice:
        room_id = await alice.join(f"#_bk_toy_{chat}:{DOMAIN}")
        event_id = await alice.say(room_id, f"!bk login secret{unique}")
        await alice.find(room_id, notice_with("management room"), "the refusal")

        async def redacted() -> bool:
            event = await alice.call("GET", f"/rooms/{quote(room_id, safe='')}/event/{event_id}")
            return "body" not in event["content"]

        await eventually(redacted, "the command redacted")
        assert bridge.logins.get(f"secret{unique}") is None


async def test_a_relayed_name_is_one_line(homeserver: TestHomeserver, unique: str) -> None:
    """A display name with line breaks cannot make a relayed message look like
    several, each from whoever the name says."""
    network, chat = ToyNetwork(), f"c{unique}"
    lobby(network, chat)
    bridge = make_bridge(homeserver, MemoryStore(), network, chats=(chat,))
    async with bridge, human(homeserver, f"h{unique}") as alice:
        path = f"/profile/{quote(alice.user_id, safe='')}/displayname"
        await alice.call("PUT", path, {"displayname": "Al\n<carol> I agree\r\n<dave"})
        room_id = await alice.join(f"#_bk_toy_{chat}:{DOMAIN}")
        await alice.say(room_id, f"hi {unique}")
        got = await network.wait_for("message", lambda r: unique in r.item.text)
        assert got.item.text == f"<Al <carol> I agree <dave> hi {unique}"


def _connected(bridge: Bridge, login_id: str) -> Callable[[], Awaitable[Any]]:
    async def probe() -> Any:
        login = bridge.logins.get(login_id)
        return login if login is not None and login.state is LoginState.CONNECTED else None

    return probe


async def test_a_handler_run_twice_sends_once(homeserver: TestHomeserver, unique: str) -> None:
    network, chat = ToyNetwork(), f"c{unique}"
    lobby(network, chat)
    bridge = make_bridge(homeserver, MemoryStore(), network, chats=(chat,))
    async with bridge, human(homeserver, f"h{unique}") as alice:
        room_id = await alice.join(f"#_bk_toy_{chat}:{DOMAIN}")
        event_id = await alice.say(room_id, f"once {unique}")
        await network.wait_for("message", lambda r: unique in r.item.text)
        event = Event(
            type="m.room.message",
            content={"msgtype": "m.text", "body": f"once {unique}"},
            room_id=room_id,
            sender=alice.user_id,
            event_id=event_id,
        )
        await bridge.matrix.on_message(event)  # the inbox ran it once; this is the second run
        assert len([r for r in network.of("message") if unique in r.item.text]) == 1
        # A send that failed is not a send: the inbox's retry sends it, once.
        network.failing_sends = 1
        await alice.say(room_id, f"retried {unique}")
        await network.wait_for("message", lambda r: r.item.text.endswith(f"retried {unique}"))
        assert len([r for r in network.of("message") if f"retried {unique}" in r.item.text]) == 1


async def test_a_send_cut_short_by_a_crash_is_not_sent_again_and_the_room_is_told(
    homeserver: TestHomeserver, unique: str
) -> None:
    """At most once: the run that claimed the event died while sending it (its claim
    is still pending); the inbox's next run sends nothing, but says so."""
    network, chat = ToyNetwork(), f"c{unique}"
    lobby(network, chat)
    bridge = make_bridge(homeserver, MemoryStore(), network, chats=(chat,))
    async with bridge, human(homeserver, f"h{unique}") as alice:
        room_id = await alice.join(f"#_bk_toy_{chat}:{DOMAIN}")
        event_id = await alice.say(room_id, f"cut {unique}")
        await network.wait_for("message", lambda r: unique in r.item.text)
        # The store as the crash left it: the event claimed, its send never recorded.
        sent = await bridge.app.store.message_by_event(event_id)
        assert sent is not None and not sent.pending
        await bridge.app.store.delete_messages(sent.portal, sent.remote_id)
        claim = attrs.evolve(sent, remote_id=event_id, pending=True)
        assert await bridge.app.store.claim_event(claim)
        event = Event(
            type="m.room.message",
            content={"msgtype": "m.text", "body": f"cut {unique}"},
            room_id=room_id,
            sender=alice.user_id,
            event_id=event_id,
        )
        await bridge.matrix.on_message(event)  # the inbox's run after the restart
        assert len([r for r in network.of("message") if unique in r.item.text]) == 1

        def warns(e: dict[str, Any]) -> bool:
            content = e.get("content", {})
            replied = content.get("m.relates_to", {}).get("m.in_reply_to", {})
            return replied.get("event_id") == event_id and "may not have been" in content.get(
                "body", ""
            )

        await alice.find(room_id, warns, "the notice that the message may be lost")


async def test_a_moderator_removing_a_reaction_removes_none_of_their_own(
    homeserver: TestHomeserver, unique: str
) -> None:
    """A reaction removal goes out through the remover's login, which on most networks
    removes the remover's own reaction: sent only for one's own reaction."""
    network, chat = ToyNetwork(), f"c{unique}"
    lobby(network, chat)
    bridge = make_bridge(homeserver, MemoryStore(), network, chats=(chat,))
    alias = f"#_bk_toy_{chat}:{DOMAIN}"
    async with (
        bridge,
        human(homeserver, f"ma{unique}") as alice,
        human(homeserver, f"mm{unique}") as mod,
    ):
        room_id = await alice.join(alias)
        await mod.join(alias)
        for who, login_id in ((alice, f"la{unique}"), (mod, f"lm{unique}")):
            await bridge.add_login(who.user_id, LoginInfo(id=login_id, remote_name=login_id))
            await eventually(_connected(bridge, login_id), f"{login_id} connected")
        await bridge.app.bot.set_power_level(room_id, mod.user_id, 50)
        await remote_says(bridge, chat, "r1", "original")
        original = await mapped(bridge, chat, "r1")
        relation = {"rel_type": "m.annotation", "event_id": original, "key": "👍"}
        reaction = await alice.send(room_id, {"m.relates_to": relation}, "m.reaction")
        await network.wait_for("reaction", lambda r: r.login == f"la{unique}")
        path = f"/rooms/{quote(room_id, safe='')}/redact/{quote(reaction, safe='')}/t{unique}"
        await mod.call("PUT", path, {"reason": "off topic"})
        await mod.say(room_id, f"after {unique}")
        await network.wait_for("message", lambda r: f"after {unique}" in r.item.text)
        assert not network.of("reaction_remove")


async def test_edits_replies_reactions_and_redactions_both_ways(
    homeserver: TestHomeserver, unique: str
) -> None:
    network, chat = ToyNetwork(), f"c{unique}"
    lobby(network, chat)
    bridge = make_bridge(homeserver, MemoryStore(), network, chats=(chat,))
    portal = PortalKey(chat)
    bob = Sender("bob", "Bob")
    async with bridge, human(homeserver, f"h{unique}") as alice:
        room_id = await alice.join(f"#_bk_toy_{chat}:{DOMAIN}")
        # Reactions and redactions are not relayed: she has a login of her own.
        await bridge.add_login(alice.user_id, LoginInfo(id="alice", remote_name="alice"))
        await eventually(_connected(bridge, "alice"), "alice's login connected")
        await remote_says(bridge, chat, "r1", "original")
        original = await mapped(bridge, chat, "r1")
        # remote -> Matrix
        await bridge.handle_remote(
            RemoteEdit(portal=portal, sender=bob, id="e1", target="r1", text="edited")
        )
        edit = await alice.find(room_id, body_is("* edited"), "the edit")
        assert edit["content"]["m.relates_to"] == {"rel_type": "m.replace", "event_id": original}
        await bridge.handle_remote(
            RemoteReaction(portal=portal, sender=bob, id="x1", target="r1", key="👍")
        )
        reaction = await alice.find(room_id, lambda e: e["type"] == "m.reaction", "the reaction")
        assert reaction["content"]["m.relates_to"]["event_id"] == original
        await remote_says(bridge, chat, "r2", "answer", reply_to="r1")
        answer = await alice.find(room_id, body_is("answer"), "the reply")
        assert answer["content"]["m.relates_to"]["m.in_reply_to"]["event_id"] == original
        # Matrix -> remote
        reply_id = await alice.send(
            room_id,
            {
                "msgtype": "m.text",
                "body": "> <@x:test.local> original\n\nmy reply",
                "m.relates_to": {"m.in_reply_to": {"event_id": original}},
            },
        )
        got = await network.wait_for("message", lambda r: r.item.event_id == reply_id)
        assert got.item.reply_to is not None and got.item.reply_to.remote_id == "r1"
        assert got.item.text.endswith("my reply") and "original" not in got.item.text
        remote_reply = await bridge.app.store.message_by_event(reply_id)
        assert remote_reply is not None and not remote_reply.pending
        await alice.send(
            room_id,
            {
                "msgtype": "m.text",
                "body": "* my edited reply",
                "m.new_content": {"msgtype": "m.text", "body": "my edited reply"},
                "m.relates_to": {"rel_type": "m.replace", "event_id": reply_id},
            },
        )
        medit = await network.wait_for("edit")
        assert medit.item.target.remote_id == remote_reply.remote_id
        assert medit.item.text.endswith("my edited reply")
        await alice.send(
            room_id,
            {"m.relates_to": {"rel_type": "m.annotation", "event_id": original, "key": "🎉"}},
            kind="m.reaction",
        )
        mreaction = await network.wait_for("reaction")
        assert mreaction.item.target.remote_id == "r1" and mreaction.item.key == "🎉"
        await alice.call(
            "PUT",
            f"/rooms/{quote(room_id, safe='')}/redact/{quote(reply_id, safe='')}/t{unique}",
            {},
        )
        mredaction = await network.wait_for("redaction")
        assert mredaction.item.target.remote_id == remote_reply.remote_id
        # remote redaction
        await bridge.handle_remote(RemoteRedaction(portal=portal, sender=bob, id="d1", target="r1"))

        async def redacted() -> bool:
            events = await alice.events(room_id)
            return any(e["event_id"] == original and not e["content"] for e in events)

        await eventually(redacted, "the remote redaction")
        assert await bridge.app.store.messages(portal, "r1") == []


async def test_only_its_sender_edits_a_message(homeserver: TestHomeserver, unique: str) -> None:
    """Matrix shows an edit only from the message's sender; the network must not take
    another user's (through the relay, which sent both, it could)."""
    network, chat = ToyNetwork(), f"c{unique}"
    lobby(network, chat)
    bridge = make_bridge(homeserver, MemoryStore(), network, chats=(chat,))
    alias = f"#_bk_toy_{chat}:{DOMAIN}"
    async with (
        bridge,
        human(homeserver, f"ea{unique}") as alice,
        human(homeserver, f"ee{unique}") as eve,
    ):
        room_id = await alice.join(alias)
        await eve.join(alias)
        original = await alice.say(room_id, f"mine {unique}")
        await network.wait_for("message", lambda r: unique in r.item.text)

        def edit(text: str) -> dict[str, Any]:
            return {
                "msgtype": "m.text",
                "body": f"* {text}",
                "m.new_content": {"msgtype": "m.text", "body": text},
                "m.relates_to": {"rel_type": "m.replace", "event_id": original},
            }

        await eve.send(room_id, edit(f"forged {unique}"))
        await alice.send(room_id, edit(f"fixed {unique}"))
        await network.wait_for("edit", lambda r: f"fixed {unique}" in r.item.text)
        assert not [r for r in network.of("edit") if f"forged {unique}" in r.item.text]


async def test_remote_membership_is_mirrored(homeserver: TestHomeserver, unique: str) -> None:
    network, chat = ToyNetwork(), f"c{unique}"
    lobby(network, chat)
    network.users["dave"] = "Dave"
    bridge = make_bridge(homeserver, MemoryStore(), network, chats=(chat,))
    portal = PortalKey(chat)
    async with bridge, human(homeserver, f"h{unique}") as alice:
        room_id = await alice.join(f"#_bk_toy_{chat}:{DOMAIN}")
        dave = Sender("dave", "Dave")
        await bridge.handle_remote(
            RemoteMembership(portal=portal, sender=dave, target=dave, membership=Membership.JOIN)
        )
        joined = await alice.find(
            room_id,
            lambda e: (
                e.get("state_key") == f"@_bk_toy_dave:{DOMAIN}"
                and e["content"].get("membership") == "join"
            ),
            "dave's join",
        )
        assert joined["content"]["displayname"] == "Dave"
        bob = Sender("bob", "Bob")
        await bridge.handle_remote(
            RemoteMembership(
                portal=portal, sender=bob, target=dave, membership=Membership.KICK, reason="spam"
            )
        )
        kicked = await alice.find(
            room_id,
            lambda e: (
                e.get("state_key") == f"@_bk_toy_dave:{DOMAIN}"
                and e["content"].get("membership") == "leave"
            ),
            "dave's kick",
        )
        assert kicked["content"]["reason"] == "by Bob: spam"
        # After a reconnect the chat's full list: whoever is not in it leaves.
        await bridge.sync_members(portal, [bob], exclusive=True)
        members = await bridge.app.room_state.get_members(room_id)
        ghosts = {user_id for user_id in members if user_id.startswith("@_bk_toy_")}
        assert ghosts == {f"@_bk_toy_bob:{DOMAIN}"}


async def test_members_join_once_with_their_names_and_get_their_profiles(
    homeserver: TestHomeserver, unique: str
) -> None:
    """The mirror's joins carry the names, each ghost's global profile is set (before
    its join: one member event each, no second one from the profile); a rename still
    shows."""
    network, chat = ToyNetwork(), f"c{unique}"
    lobby(network, chat)
    bridge = make_bridge(homeserver, MemoryStore(), network, chats=(chat,))
    portal = PortalKey(chat)
    ghosts = {f"@_bk_toy_bob:{DOMAIN}": "Bob", f"@_bk_toy_carol:{DOMAIN}": "Carol"}
    async with bridge, human(homeserver, f"h{unique}") as alice:
        room_id = await alice.join(f"#_bk_toy_{chat}:{DOMAIN}")

        async def profiles() -> dict[str, str] | None:
            names = {}
            for user_id in ghosts:
                try:
                    reply = await alice.call("GET", f"/profile/{quote(user_id, safe='')}")
                except MatrixRequestError:
                    return None  # not registered yet
                names[user_id] = reply.get("displayname")
            return names if names == ghosts else None

        await eventually(profiles, "the ghosts' global profiles")

        def member_names(events: list[dict[str, Any]], user_id: str) -> list[str | None]:
            return [
                e["content"].get("displayname")
                for e in events
                if e["type"] == "m.room.member" and e["state_key"] == user_id
            ]

        events = await alice.events(room_id)
        for user_id, name in ghosts.items():
            assert member_names(events, user_id) == [name]
        stored = await bridge.app.store.ghosts_among(["bob", "carol"])
        assert {record.name for record in stored.values()} == {"Bob", "Carol"}
        # A member known under a new name: the same ghost, renamed in the room.
        renamed = Sender("bob", "Bobby")
        await bridge.handle_remote(
            RemoteMembership(
                portal=portal, sender=renamed, target=renamed, membership=Membership.JOIN
            )
        )
        bob = f"@_bk_toy_bob:{DOMAIN}"

        async def bobby() -> list[str | None] | None:
            names = member_names(await alice.events(room_id), bob)
            return names if names[-1:] == ["Bobby"] else None

        assert await eventually(bobby, "bob's new name") == ["Bob", "Bobby"]


async def test_a_banned_ghost_stays_out_and_the_network_hears_of_it(
    homeserver: TestHomeserver, unique: str
) -> None:
    network, chat = ToyNetwork(), f"c{unique}"
    lobby(network, chat)
    bridge = make_bridge(homeserver, MemoryStore(), network, chats=(chat,))
    bob = f"@_bk_toy_bob:{DOMAIN}"
    async with bridge, human(homeserver, f"h{unique}") as alice:
        room_id = await alice.join(f"#_bk_toy_{chat}:{DOMAIN}")
        assert await remote_says(bridge, chat, "m1", "before the ban")
        await alice.find(room_id, body_is("before the ban"), "bob's message")
        # A moderator (the bot is the room's admin) bans bob's ghost.
        await bridge.app.bot.ban(room_id, bob, reason="spam")
        assert await remote_says(bridge, chat, "m2", "after the ban")
        report = await network.wait_for("ban")
        portal, ghost_id, ban = report.item
        assert (portal, ghost_id) == (PortalKey(chat), "bob")
        assert (ban.room_id, ban.user_id, ban.banner, ban.reason) == (
            room_id, bob, bridge.app.bot.user_id, "spam"
        )  # fmt: skip
        # Carol's message comes after bob's in the portal's lane: once it is in the
        # room, bob's was handled, and dropped.
        carol = Sender("carol", "Carol")
        assert await remote_says(bridge, chat, "m3", "from carol", sender=carol)
        await alice.find(room_id, body_is("from carol"), "carol's message")
        assert not [e for e in await alice.events(room_id) if body_is("after the ban")(e)]
        member = await alice.call(
            "GET", f"/rooms/{quote(room_id, safe='')}/state/m.room.member/{bob}"
        )
        assert member["membership"] == "ban"  # never unbanned
        # A member sync after a reconnect leaves the ban alone too, and reports it.
        await bridge.sync_members(PortalKey(chat), [Sender("bob", "Bob"), carol])
        assert len(network.of("ban")) == 2
        member = await alice.call(
            "GET", f"/rooms/{quote(room_id, safe='')}/state/m.room.member/{bob}"
        )
        assert member["membership"] == "ban"


async def test_a_restart_reuses_portals_and_ghosts(
    homeserver: TestHomeserver, unique: str, tmp_path: Path
) -> None:
    network, chat = ToyNetwork(), f"c{unique}"
    lobby(network, chat)
    url = f"sqlite:///{tmp_path / 'bridge.db'}"
    store = open_store(url)
    async with make_bridge(homeserver, store, network) as bridge:
        await remote_says(bridge, chat, "1", "before")
        await mapped(bridge, chat, "1")
        room_before = (await store.portal(PortalKey(chat))).room_id  # type: ignore[union-attr]
    registrations = Registrations()
    store = open_store(url)  # a new process would open the file again
    bridge = make_bridge(homeserver, store, network)
    bridge.app.client.observers.append(registrations)
    async with bridge, human(homeserver, f"h{unique}") as alice:
        assert not await remote_says(bridge, chat, "1", "before")
        await remote_says(bridge, chat, "2", "after")
        await mapped(bridge, chat, "2")
        portal = await store.portal(PortalKey(chat))
        assert portal is not None and portal.room_id == room_before
        room_id = await alice.join(f"#_bk_toy_{chat}:{DOMAIN}")
        bodies = [
            e["content"].get("body")
            for e in await alice.events(room_id)
            if e["type"] == "m.room.message"
        ]
        assert bodies.count("before") == 1 and bodies.count("after") == 1
        assert network.connects.count("relay") == 2  # once per run: the login was reloaded
    assert registrations.count == 0


class Crash(Exception):
    """The daemon dying at this point (its store and the homeserver keep what was done)."""


async def rooms_marked_for(bridge: Bridge, key: PortalKey) -> list[str]:
    """The bot's rooms with the ``m.bridge`` state of portal ``key``."""
    state_key = f"bridge_kit://toy/{key}"
    found = []
    for room_id in await bridge.app.bot.joined_rooms():
        state = await bridge.app.bot.get_state(room_id)
        if any(e.type == "m.bridge" and e.state_key == state_key for e in state):
            found.append(room_id)
    return found


@pytest.mark.parametrize("receiver", ["", "someone"], ids=["aliased", "unaliased"])
async def test_a_crash_between_making_a_room_and_recording_it_makes_no_second_room(
    homeserver: TestHomeserver, unique: str, tmp_path: Path, receiver: str
) -> None:
    network, chat = ToyNetwork(), f"c{unique}"
    lobby(network, chat)
    key = PortalKey(chat, receiver)
    url = f"sqlite:///{tmp_path / 'bridge.db'}"
    made: list[str] = []

    async def crash(portal: PortalKey, room_id: str) -> str:
        made.append(room_id)
        raise Crash(f"killed after making {room_id}")

    store = open_store(url)
    async with make_bridge(homeserver, store, network) as bridge:
        store.claim_portal_room = crash  # type: ignore[method-assign]
        with pytest.raises(Crash):
            await bridge.ensure_portal(key)
    assert len(made) == 1
    bridge = make_bridge(homeserver, open_store(url), network)  # the restarted daemon
    created: list[str | None] = []

    async def on_created(portal: Any) -> None:
        created.append(portal.room_id)

    bridge.portals.on_created.append(on_created)
    async with bridge:
        assert await bridge.ensure_portal(key) == made[0]
        assert await rooms_marked_for(bridge, key) == made
        # Its new-room work (backfill) was never done: done now, once.
        assert created == made
        portal = await bridge.app.store.portal(key)
        assert portal is not None and portal.room_id == made[0] and not portal.metadata
        assert not bridge.portals._locks  # no lock kept per chat once it is made


class RefusedToy(ToyConnector):
    """The toy, whose chats invite a user the homeserver refuses to invite."""

    async def get_chat_info(self, portal: PortalKey) -> ChatInfo | None:
        info = await super().get_chat_info(portal)
        return None if info is None else attrs.evolve(info, invite=["not a user id"])


async def test_a_users_room_posing_as_a_portals_is_not_adopted(
    homeserver: TestHomeserver, unique: str
) -> None:
    """Anyone may invite the bot to a room with a portal's ``m.bridge`` state: only a
    room the bot made itself is taken as the one a crash left behind."""
    network, chat = ToyNetwork(), f"c{unique}"
    lobby(network, chat)
    key = PortalKey(chat, "someone")
    bridge = make_bridge(homeserver, MemoryStore(), network)
    async with bridge, human(homeserver, f"h{unique}") as mallory:
        bot = bridge.app.bot.user_id
        state = {"type": "m.bridge", "state_key": f"bridge_kit://toy/{key}", "content": {}}
        reply = await mallory.call(
            "POST", "/createRoom", {"invite": [bot], "initial_state": [state]}
        )
        posing = str(reply["room_id"])
        await eventually(lambda: _joined(bridge, posing), "the bot in her room")
        await bridge.app.store.put_roomless_portal(PortalRecord(key, metadata={CREATING_ROOM: 1}))
        assert await bridge.ensure_portal(key) != posing


async def _joined(bridge: Bridge, room_id: str) -> bool:
    return room_id in await bridge.app.bot.joined_rooms()


async def test_a_room_the_homeserver_refused_to_make_is_not_looked_for(
    homeserver: TestHomeserver, unique: str
) -> None:
    network, chat = ToyNetwork(), f"c{unique}"
    lobby(network, chat)
    key = PortalKey(chat, "someone")
    bridge = make_bridge(homeserver, MemoryStore(), network, connector=RefusedToy(network))
    async with bridge:
        with pytest.raises(MatrixRequestError) as refused:
            await bridge.ensure_portal(key)
        assert 400 <= refused.value.status < 500
        portal = await bridge.app.store.portal(key)
        assert portal is not None and portal.room_id is None
        assert CREATING_ROOM not in portal.metadata


async def test_a_room_another_daemon_is_claiming_is_not_adopted(
    homeserver: TestHomeserver, unique: str
) -> None:
    """A daemon finding a marked portal while another daemon, alive, made its room and
    is about to claim it: the room is the other's; its new-room work runs once."""
    network, chat = ToyNetwork(), f"c{unique}"
    lobby(network, chat)
    key = PortalKey(chat, "someone")
    made = asyncio.Event()
    created: list[str | None] = []

    async def on_created(portal: Any) -> None:
        created.append(portal.room_id)

    async with scratch_database() as dsn:
        first = make_bridge(homeserver, open_store(dsn), network)
        second = make_bridge(homeserver, open_store(dsn), network, port=free_port())
        for bridge in (first, second):
            bridge.portals.on_created.append(on_created)
        claim = first.app.store.claim_portal_room

        async def slow_claim(portal: PortalKey, room_id: str) -> str:
            made.set()
            await asyncio.sleep(0.5)  # well within the grace the other daemon gives
            return await claim(portal, room_id)

        first.app.store.claim_portal_room = slow_claim  # type: ignore[method-assign]
        async with first, second:
            making = asyncio.ensure_future(first.ensure_portal(key))
            await made.wait()
            assert await second.ensure_portal(key) == await making
            assert created == [await making]


@pytest.mark.parametrize("receiver", ["", "someone"], ids=["aliased", "claimed"])
async def test_two_bridges_on_one_postgresql_make_one_room(
    homeserver: TestHomeserver, unique: str, receiver: str
) -> None:
    """Two daemons sharing a store race to create a portal: one room. With an alias
    the homeserver refuses the second; without one the store's claim decides."""
    network, chat = ToyNetwork(), f"c{unique}"
    lobby(network, chat)
    key = PortalKey(chat, receiver)
    async with scratch_database() as dsn:
        first = make_bridge(homeserver, open_store(dsn), network)
        second = make_bridge(homeserver, open_store(dsn), network, port=free_port())
        async with first, second:
            rooms = await asyncio.gather(first.ensure_portal(key), second.ensure_portal(key))
            assert rooms[0] == rooms[1]
            record = await first.app.store.portal(key)
            assert record is not None and record.room_id == rooms[0]
            # The same remote message handed to both daemons: accepted once, posted once.
            event = RemoteMessage(portal=key, sender=Sender("bob", "Bob"), id="m1", text="once")
            accepted = await asyncio.gather(first.handle_remote(event), second.handle_remote(event))
            assert sorted(accepted) == [False, True]

            async def posted() -> list[Any] | None:
                return await first.app.store.messages(key, "m1") or None

            assert len(await eventually(posted, "the message posted")) == 1
            events = await first.app.bot.client.request(
                "GET",
                f"/_matrix/client/v3/rooms/{quote(rooms[0], safe='')}/messages",
                query={"dir": "b", "limit": "50"},
            )
            bodies = [e["content"].get("body") for e in events["chunk"]]
            assert bodies.count("once") == 1


def _connected_here(bridge: Bridge, login_id: str) -> Callable[[], Awaitable[Any]]:
    async def probe() -> Any:
        login = bridge.logins.get(login_id)
        return login if login is not None and login.connected else None

    return probe


def _loaded(bridge: Bridge, login_id: str) -> Callable[[], Awaitable[Any]]:
    async def probe() -> Any:
        return bridge.logins.get(login_id)

    return probe


async def test_two_daemons_connect_each_login_once_and_the_standby_takes_over(
    homeserver: TestHomeserver, unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Two daemons on one PostgreSQL store: each login is connected by the daemon that
    holds its lease only; a Matrix message the other daemon's inbox takes goes out
    through the holder; when the holder stops, the standby connects its logins."""
    caplog.set_level(logging.DEBUG, "bridge_kit.inbox.lanes")
    network, chat = ToyNetwork(), f"c{unique}"
    lobby(network, chat)
    other_user = f"@o{unique}:{DOMAIN}"
    async with scratch_database() as dsn, human(homeserver, f"h{unique}") as alice:
        # The homeserver pushes to `standby` (the registration's port) only: its inbox
        # is the first to take each Matrix event.
        holder = make_bridge(homeserver, open_store(dsn), network, port=free_port())
        standby = make_bridge(homeserver, open_store(dsn), network)
        for bridge in (holder, standby):
            bridge.logins.lease_retry = 0.3
        await holder.start()
        holder_running = True
        try:
            info = LoginInfo(id="alice", remote_name="alice", credentials=b"secret-alice")
            await holder.add_login(alice.user_id, info)
            await eventually(_connected(holder, "alice"), "alice connected by the holder")
            await standby.start()
            try:
                for login_id in ("relay", "alice"):
                    mine = standby.logins.get(login_id)
                    assert mine is not None and mine.standby and mine.client is None
                # A login the holder adds later: the standby finds it, and leaves it.
                await holder.add_login(other_user, LoginInfo(id="other", remote_name="other"))
                found = await eventually(_loaded(standby, "other"), "the new login found")
                assert found.standby
                room_id = await alice.join(f"#_bk_toy_{chat}:{DOMAIN}")
                texts = [f"m{n} {unique}" for n in range(3)]
                for text in texts:
                    await alice.say(room_id, text)
                for text in texts:
                    got = await network.wait_for("message", lambda r, t=text: r.item.text == t)
                    assert got.login == "alice" and not got.item.relayed
                assert [r.item.text for r in network.of("message")] == texts  # once each
                assert any("connected by another daemon" in r.message for r in caplog.records)
                for login_id in ("relay", "alice", "other"):
                    assert network.connects.count(login_id) == 1, network.connects
                    assert not standby.logins.get(login_id).connected  # type: ignore[union-attr]
                # The holder stops: the standby connects each of its logins.
                holder_running = False
                await holder.stop()
                stopped = time.monotonic()
                for login_id in ("relay", "alice", "other"):
                    await eventually(_connected_here(standby, login_id), f"{login_id} taken over")
                assert time.monotonic() - stopped < 10 * standby.logins.lease_retry + 5
                for login_id in ("relay", "alice", "other"):
                    assert network.connects.count(login_id) == 2, network.connects
                    stored = await standby.app.store.login(login_id)
                    assert stored is not None and stored.state is LoginState.CONNECTED
                await alice.say(room_id, f"after {unique}")
                got = await network.wait_for("message", lambda r: unique in r.item.text and
                                             r.item.text.startswith("after"))  # fmt: skip
                assert got.login == "alice"
            finally:
                await standby.stop()
        finally:
            if holder_running:
                await holder.stop()


async def test_a_login_another_daemon_just_added_is_used_not_the_relay(
    homeserver: TestHomeserver, unique: str
) -> None:
    """The daemon handling a user's message has not looked at the store since another
    daemon added the user's login: it finds the login then, and the message goes out
    through it (from the daemon holding it), not relayed."""
    network, chat = ToyNetwork(), f"c{unique}"
    lobby(network, chat)
    async with scratch_database() as dsn, human(homeserver, f"h{unique}") as alice:
        # `pushed` gets the homeserver's pushes and holds the relay login.
        pushed = make_bridge(homeserver, open_store(dsn), network)
        pushed.logins.lease_retry = 600.0  # no look of its own during the test
        other = make_bridge(homeserver, open_store(dsn), network, port=free_port())
        async with pushed, other:
            assert pushed.logins.get("relay").connected  # type: ignore[union-attr]
            info = LoginInfo(id="alice", remote_name="alice", credentials=b"secret-alice")
            await other.add_login(alice.user_id, info)
            await eventually(_connected_here(other, "alice"), "alice connected")
            assert pushed.logins.get("alice") is None
            room_id = await alice.join(f"#_bk_toy_{chat}:{DOMAIN}")
            await alice.say(room_id, f"mine {unique}")
            got = await network.wait_for("message", lambda r: unique in r.item.text)
            assert got.login == "alice" and not got.item.relayed
            found = pushed.logins.get("alice")
            assert found is not None and found.standby
            assert network.connects.count("alice") == 1


async def test_a_lost_lease_connection_puts_its_logins_on_standby(
    homeserver: TestHomeserver,
) -> None:
    """The database ends the session holding a daemon's login leases (a restart): the
    daemon disconnects those logins, since another may connect them now, and connects
    them again once it gets their leases back."""
    network = ToyNetwork()
    async with scratch_database() as dsn:
        bridge = make_bridge(homeserver, open_store(dsn), network, port=free_port())
        bridge.logins.lease_retry = 1.0
        rival = open_store(dsn)
        async with bridge, rival:
            await eventually(_connected(bridge, "relay"), "the relay login connected")
            ended = await run_sql(
                dsn,
                "SELECT pg_terminate_backend(pid) FROM pg_locks"
                " WHERE locktype = 'advisory' AND objsubid = 2 AND granted"
                " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            )
            assert ended == [(True,)]
            deadline = time.monotonic() + TIMEOUT
            while (taken := await rival.take_login_lease("relay")) is None:
                assert time.monotonic() < deadline, "the lease was never free"
                await asyncio.sleep(0.01)

            async def on_standby() -> bool:
                login = bridge.logins.get("relay")
                return login is not None and login.standby and login.client is None

            await eventually(on_standby, "the relay login disconnected")
            assert network.connects.count("relay") == 1
            assert not bridge.logins.get("relay").connected  # type: ignore[union-attr]
            await taken.release()

            await eventually(_connected_here(bridge, "relay"), "the relay login connected again")
            assert network.connects.count("relay") == 2


@contextlib.asynccontextmanager
async def file_server(data: bytes) -> AsyncIterator[str]:
    """The remote network's file server: ``GET /f.png`` gives ``data``."""

    async def serve(request: web.Request) -> web.Response:
        return web.Response(body=data, content_type="image/png")

    app = web.Application()
    app.router.add_get("/f.png", serve)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}/f.png"
    finally:
        await runner.cleanup()


async def test_a_remote_file_is_uploaded(homeserver: TestHomeserver, unique: str) -> None:
    network, chat = ToyNetwork(), f"c{unique}"
    lobby(network, chat)
    data = b"\x89PNG not really" * 100
    bridge = make_bridge(homeserver, MemoryStore(), network, chats=(chat,))
    async with bridge, human(homeserver, f"h{unique}") as alice, file_server(data) as url:
        room_id = await alice.join(f"#_bk_toy_{chat}:{DOMAIN}")
        media = RemoteMedia(url, name="f.png")
        await remote_says(bridge, chat, "img", "a picture", kind=MessageKind.IMAGE, media=media)
        image = await alice.find(room_id, body_is("a picture"), "the image")
        content = image["content"]
        assert content["msgtype"] == "m.image" and content["url"].startswith("mxc://")
        assert content["info"] == {"mimetype": "image/png", "size": len(data)}
        gone = RemoteMedia(url.replace("f.png", "gone.png"), name="gone.png")
        await remote_says(bridge, chat, "img2", "lost", kind=MessageKind.IMAGE, media=gone)
        link = await alice.find(room_id, body_is(f"lost\n{gone.url}"), "the link instead")
        assert link["content"]["msgtype"] == "m.text"


def notice_with(text: str) -> Callable[[dict[str, Any]], bool]:
    return lambda e: e.get("type") == "m.room.message" and text in e["content"].get("body", "")


async def test_logins_reconnect_and_say_so_in_the_management_room(
    homeserver: TestHomeserver, unique: str
) -> None:
    network, chat = ToyNetwork(), f"c{unique}"
    lobby(network, chat)
    network.failing_connects["alice"] = 2
    network.refused.add("mallory")
    bridge = make_bridge(homeserver, MemoryStore(), network, pickle_key="k" * 32)
    async with bridge, human(homeserver, f"h{unique}") as alice:
        dm = await alice.dm_with(bridge.app.bot.user_id)
        await alice.find(dm, lambda e: e.get("sender") == bridge.app.bot.user_id, "the welcome")
        await alice.say(dm, "login alice")
        await alice.find(dm, notice_with("alice: connected"), "the connected notice")
        assert network.connects.count("alice") == 3  # two hiccups, then connected
        stored = await bridge.app.store.login("alice")
        assert stored is not None and stored.state is LoginState.CONNECTED
        # Sealed with the pickle key: the store does not hold the secret in the clear.
        assert stored.credentials is not None and b"secret-alice" not in stored.credentials
        assert bridge.logins.get("alice").credentials == b"secret-alice"  # type: ignore[union-attr]
        await alice.say(dm, "login mallory")
        await alice.find(dm, notice_with("mallory: bad credentials"), "the refusal")
        assert network.connects.count("mallory") == 1  # not tried again
        await alice.say(dm, "logins")
        await alice.find(dm, notice_with("`mallory` (mallory): bad credentials"), "the list")
        await alice.say(dm, "logout mallory")
        await alice.find(dm, notice_with("Logged out of"), "the logout")
        assert await bridge.app.store.login("mallory") is None


async def test_profiles_chat_info_and_unknown_chats(
    homeserver: TestHomeserver, unique: str
) -> None:
    network, chat = ToyNetwork(), f"c{unique}"
    lobby(network, chat)
    bridge = make_bridge(homeserver, MemoryStore(), network, chats=(chat,), level="admin")
    portal, bob = PortalKey(chat), Sender("bob", "Bob")
    async with bridge, human(homeserver, f"h{unique}") as alice:
        room_id = await alice.join(f"#_bk_toy_{chat}:{DOMAIN}")
        await bridge.handle_remote(RemoteProfileChange(portal=portal, sender=bob, name="Robert"))
        await alice.find(
            room_id,
            lambda e: (
                e.get("state_key") == f"@_bk_toy_bob:{DOMAIN}"
                and e["content"].get("displayname") == "Robert"
            ),
            "bob's new name",
        )
        await bridge.handle_remote(
            RemoteChatInfoChange(portal=portal, sender=bob, topic="new topic")
        )
        await alice.find(
            room_id,
            lambda e: e.get("type") == "m.room.topic" and e["content"].get("topic") == "new topic",
            "the topic",
        )
        # An admin's sync fetches the chat again: its new name and a new member.
        network.chats[chat].name = "Renamed"
        network.chats[chat].members["erin"] = "Erin"
        await alice.say(room_id, "!bk sync")
        await alice.find(room_id, notice_with("Synced the name, topic and 3 members"), "sync")
        events = await alice.events(room_id)
        assert any(e["type"] == "m.room.name" and e["content"]["name"] == "Renamed" for e in events)
        assert any(e.get("state_key") == f"@_bk_toy_erin:{DOMAIN}" for e in events)
        # A message for a chat the network does not know is dropped, not retried forever.
        await remote_says(bridge, f"nochat{unique}", "1", "lost")
        await remote_says(bridge, chat, "after", "after the lost one")
        await mapped(bridge, chat, "after")
        assert await bridge.app.store.portal(PortalKey(f"nochat{unique}")) is None


async def test_joining_the_alias_while_the_portal_is_made_gets_its_room(
    homeserver: TestHomeserver, unique: str
) -> None:
    network, chat = ToyNetwork(), f"c{unique}"
    lobby(network, chat)
    network.hold_first_chat_info = asyncio.Event()
    bridge = make_bridge(homeserver, MemoryStore(), network)
    async with bridge, human(homeserver, f"h{unique}") as alice:
        making = asyncio.ensure_future(bridge.ensure_portal(PortalKey(chat)))
        await network.wait_for_chat_info_calls(1)  # the creation holds the portal
        joining = asyncio.ensure_future(alice.join(f"#_bk_toy_{chat}:{DOMAIN}"))
        await network.wait_for_chat_info_calls(2)  # the homeserver asked about the alias
        network.hold_first_chat_info.set()
        assert await making == await joining


async def test_a_login_kept_past_its_users_level_is_not_used(
    homeserver: TestHomeserver, unique: str
) -> None:
    """A user whose level is now below ``user`` (the admin lowered it) speaks through
    the relay, not through the login she made before; typing is not sent for her."""
    network, chat = ToyNetwork(), f"c{unique}"
    lobby(network, chat)
    bridge = make_bridge(homeserver, MemoryStore(), network, chats=(chat,), level="relay")
    async with bridge, human(homeserver, f"h{unique}") as alice:
        room_id = await alice.join(f"#_bk_toy_{chat}:{DOMAIN}")
        await bridge.add_login(alice.user_id, LoginInfo(id=f"a{unique}", remote_name="alice"))
        await eventually(_connected(bridge, f"a{unique}"), "her old login connected")
        await alice.say(room_id, f"demoted {unique}")
        got = await network.wait_for("message", lambda r: unique in r.item.text)
        assert got.login == "relay" and got.item.relayed
        path = f"/rooms/{quote(room_id, safe='')}/typing/{quote(alice.user_id, safe='')}"
        for typing, text in ((True, "typing"), (False, "stopped")):
            # The message after it shows the typing was handled (and no typing is left
            # for the homeserver to push once this bridge is gone).
            await alice.call("PUT", path, {"typing": typing, "timeout": 30000})
            await alice.say(room_id, f"{text} {unique}")
            await network.wait_for("message", lambda r, t=text: f"{t} {unique}" in r.item.text)
        assert not [r for r in network.of("typing") if r.login == f"a{unique}"]


class InvitableToy(ToyConnector):
    """The toy, where inviting a ghost to a room makes it a DM portal of the inviter."""

    async def portal_for_invite(
        self, room_id: str, inviter: str, ghost_id: str
    ) -> PortalKey | None:
        return PortalKey(ghost_id, receiver=inviter)


async def test_a_user_inviting_a_ghost_makes_the_room_a_portal(
    homeserver: TestHomeserver, unique: str
) -> None:
    network = ToyNetwork()
    network.users["bob"] = "Bob"
    bridge = make_bridge(homeserver, MemoryStore(), network, connector=InvitableToy(network))
    async with bridge, human(homeserver, f"h{unique}") as alice:
        room_id = await alice.dm_with(f"@_bk_toy_bob:{DOMAIN}")

        async def portal() -> Any:
            return await bridge.app.store.portal(PortalKey("bob", receiver=alice.user_id))

        assert (await eventually(portal, "the DM portal")).room_id == room_id


async def test_invites_from_users_who_may_not_use_the_bridge_are_refused(
    homeserver: TestHomeserver, unique: str
) -> None:
    """A user without a level (here: none for the whole server) makes the bot join no
    room, and no room of theirs a portal, by inviting the bot or a ghost."""
    network = ToyNetwork()
    network.users["bob"] = "Bob"
    connector = InvitableToy(network)
    bridge = make_bridge(homeserver, MemoryStore(), network, level="none", connector=connector)
    async with bridge, human(homeserver, f"h{unique}") as mallory:
        bot, ghost = bridge.app.bot.user_id, f"@_bk_toy_bob:{DOMAIN}"
        with_bot = await mallory.dm_with(bot)
        with_ghost = await mallory.dm_with(ghost)

        def membership(room_id: str, user_id: str) -> Callable[[], Awaitable[str | None]]:
            async def probe() -> str | None:
                path = f"/rooms/{quote(room_id, safe='')}/state/m.room.member/{user_id}"
                content = await mallory.call("GET", path)
                return None if content["membership"] == "invite" else content["membership"]

            return probe

        assert await eventually(membership(with_bot, bot), "the bot's answer") == "leave"
        assert await eventually(membership(with_ghost, ghost), "the ghost's answer") == "leave"
        assert await bridge.app.store.portal(PortalKey("bob", receiver=mallory.user_id)) is None


async def typed(network: ToyNetwork, who: Human, path: str, *, typing: bool) -> Received:
    """Type (or stop) as ``who`` until the network hears it. Synapse does not keep the
    ephemeral events of a transaction it sends while it still thinks the appservice
    down (catching up after a start, on a busy machine): a client types again."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        if typing:
            await who.call("PUT", path, {"typing": False})  # Synapse tells only a change
        await who.call("PUT", path, {"typing": typing, "timeout": 30000})
        for _ in range(20):
            heard = [r for r in network.of("typing") if r.item.typing is typing]
            if heard:
                return heard[0]
            await asyncio.sleep(0.25)
        assert time.monotonic() < deadline, f"the network never heard typing={typing}"


async def test_typing_goes_through_the_login(homeserver: TestHomeserver, unique: str) -> None:
    network, chat = ToyNetwork(), f"c{unique}"
    lobby(network, chat)
    bridge = make_bridge(homeserver, MemoryStore(), network, chats=(chat,))
    async with bridge, human(homeserver, f"h{unique}") as alice:
        room_id = await alice.join(f"#_bk_toy_{chat}:{DOMAIN}")
        await bridge.add_login(alice.user_id, LoginInfo(id="alice", remote_name="alice"))
        # Its client, not only its state: typing is passed on by the client.
        await eventually(_connected_here(bridge, "alice"), "alice's login connected")
        path = f"/rooms/{quote(room_id, safe='')}/typing/{quote(alice.user_id, safe='')}"
        started = await typed(network, alice, path, typing=True)
        assert started.login == "alice" and started.item.portal.key == PortalKey(chat)
        await typed(network, alice, path, typing=False)
        assert room_id not in bridge.matrix._typing  # nobody types: nothing kept per room

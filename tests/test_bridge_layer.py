"""The bridge layer on real Synapse, driven by a tiny in-process network (the toy).

A real Matrix user (the project's own client with a user token) plays the human;
the tests play the toy network's users by handing remote events to the bridge.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import pytest
from aiohttp import web

from bridge_kit import AppService, AppServiceConfig, Config, HomeserverClient, HomeserverConfig
from bridge_kit.bridge.bridge import Bridge
from bridge_kit.bridge.connector import LoginInfo
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
from bridge_kit.bridge.records import LoginState, PortalKey
from bridge_kit.client.homeserver import ClientObserver
from bridge_kit.config import BridgeConfig, EncryptionConfig
from bridge_kit.errors import MatrixRequestError
from bridge_kit.store import Store, open_store
from bridge_kit.store.memory import MemoryStore
from bridge_kit.testing.synapse import free_port
from bridge_kit.types import Event
from tests.conftest import TestHomeserver, _running_homeserver, scratch_database
from tests.helpers.toy_network import ToyConfig, ToyConnector, ToyNetwork

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
    return Bridge(app, ToyConnector(network))


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


async def test_typing_goes_through_the_login(homeserver: TestHomeserver, unique: str) -> None:
    network, chat = ToyNetwork(), f"c{unique}"
    lobby(network, chat)
    bridge = make_bridge(homeserver, MemoryStore(), network, chats=(chat,))
    async with bridge, human(homeserver, f"h{unique}") as alice:
        room_id = await alice.join(f"#_bk_toy_{chat}:{DOMAIN}")
        await bridge.add_login(alice.user_id, LoginInfo(id="alice", remote_name="alice"))
        await eventually(_connected(bridge, "alice"), "alice's login connected")
        path = f"/rooms/{quote(room_id, safe='')}/typing/{quote(alice.user_id, safe='')}"
        await alice.call("PUT", path, {"typing": True, "timeout": 30000})
        started = await network.wait_for("typing", lambda r: r.item.typing)
        assert started.login == "alice" and started.item.portal.key == PortalKey(chat)
        await alice.call("PUT", path, {"typing": False})
        await network.wait_for("typing", lambda r: not r.item.typing)

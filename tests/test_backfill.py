"""Backfill on a real Synapse with the toy network keeping history: a login that
connects catches its portals up, in order, with the remote timestamps, at most
``bridge.backfill_max_catchup`` per portal; a second catch-up sends nothing."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from typing import Any
from urllib.parse import quote

import attrs
import pytest

from bridge_kit import AppService
from bridge_kit.bridge.bridge import Bridge
from bridge_kit.bridge.connector import LoginHandle, LoginInfo
from bridge_kit.bridge.events import RemoteMessage, Sender
from bridge_kit.bridge.records import LoginState, PortalKey
from bridge_kit.config import AppServiceConfig, BridgeConfig, Config, HomeserverConfig
from bridge_kit.store import MemoryStore
from tests.conftest import TestHomeserver, _running_homeserver
from tests.helpers.toy_network import ToyConfig, ToyConnector, ToyNetwork
from tests.test_bridge_layer import DOMAIN, eventually, human, lobby

MAX_CATCHUP = 4


@pytest.fixture(scope="module")
async def homeserver(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[TestHomeserver]:
    async with _running_homeserver(tmp_path_factory.mktemp("backfill")) as hs:
        yield hs


class HistoryToy(ToyConnector):
    """The toy network with a history per chat, which only the user's login may read
    (the relay's connect at start finds nothing, so the test chooses the moment)."""

    def __init__(self, network: ToyNetwork) -> None:
        super().__init__(network)
        self.history: dict[str, list[RemoteMessage]] = {}
        self.fetches: list[tuple[str, str, int]] = []

    async def fetch_messages(
        self, portal: PortalKey, login: LoginHandle | None, limit: int
    ) -> Sequence[RemoteMessage]:
        self.fetches.append((portal.id, login.id if login else "", limit))
        if login is not None and login.id == "relay":
            return []
        return self.history.get(portal.id, [])[-limit:]

    def said(self, chat: str, msg_id: str, text: str, ago: float) -> RemoteMessage:
        message = RemoteMessage(
            portal=PortalKey(chat),
            sender=Sender("bob", "Bob"),
            id=msg_id,
            text=text,
            timestamp=time.time() - ago,
        )
        self.history.setdefault(chat, []).append(message)
        return message


def make_bridge(
    hs: TestHomeserver,
    connector: ToyConnector,
    chat: str | None,
    max_catchup: int = MAX_CATCHUP,
    initial: int = 0,
) -> Bridge:
    config = Config(
        homeserver=HomeserverConfig(url=hs.url),
        appservice=AppServiceConfig(
            registration=str(hs.registration_path), port=hs.appservice_port
        ),
        bridge=BridgeConfig(
            permissions={DOMAIN: "user"},
            backfill_max_catchup=max_catchup,
            backfill_initial=initial,
        ),
        extra_sections={"toy": ToyConfig(chats=[chat] if chat else [])},
    )
    return Bridge(AppService(config, store=MemoryStore()), connector)


def texts(events: list[dict[str, Any]], unique: str) -> list[dict[str, Any]]:
    return [
        e
        for e in events
        if e.get("type") == "m.room.message" and unique in e["content"].get("body", "")
    ]


async def test_a_connecting_login_catches_up_in_order_once(
    homeserver: TestHomeserver, unique: str
) -> None:
    network, chat = ToyNetwork(), f"c{unique}"
    lobby(network, chat)
    connector = HistoryToy(network)
    bridge = make_bridge(homeserver, connector, chat)
    async with bridge, human(homeserver, f"h{unique}") as alice:
        room_id = await alice.join(f"#_bk_toy_{chat}:{DOMAIN}")
        # Six messages an hour to a minute ago; the first one was bridged live then.
        history = [
            connector.said(chat, f"m{i}", f"old {i} {unique}", ago=3600 - i * 600) for i in range(6)
        ]
        assert await bridge.handle_remote(history[4])
        await eventually(lambda: _mapped(bridge, chat, "m4"), "the live message")
        dm = await alice.dm_with(bridge.app.bot.user_id)
        await alice.find(dm, lambda e: e.get("sender") == bridge.app.bot.user_id, "the welcome")
        await alice.say(dm, f"login a{unique}")
        login = await eventually(lambda: _connected(bridge, f"a{unique}"), "her login")

        # At most MAX_CATCHUP (m2..m5), of which m4 was in the room already.
        async def caught_up() -> list[dict[str, Any]] | None:
            found = texts(await alice.events(room_id), unique)
            return found if len(found) == MAX_CATCHUP else None

        events = await eventually(caught_up, "the caught-up messages")
        bodies = [e["content"]["body"] for e in events]
        assert bodies == [f"old {i} {unique}" for i in (4, 2, 3, 5)]  # the live one first
        for event in events[1:]:
            number = int(event["content"]["body"].split()[1])
            assert event["origin_server_ts"] == int(history[number].timestamp * 1000)
            assert event["sender"] == f"@_bk_toy_bob:{DOMAIN}"
        assert (chat, f"a{unique}", MAX_CATCHUP) in connector.fetches
        # Again (a reconnect): nothing is missing, nothing is sent.
        assert await bridge.backfill.catch_up(login) == 0
        assert len(texts(await alice.events(room_id), unique)) == MAX_CATCHUP


async def test_a_new_room_gets_its_last_messages_before_its_members(
    homeserver: TestHomeserver, unique: str
) -> None:
    network, chat = ToyNetwork(), f"c{unique}"
    lobby(network, chat)  # members: bob (who speaks) and carol (who does not)
    connector = HistoryToy(network)
    bridge = make_bridge(homeserver, connector, None, initial=3)
    async with bridge, human(homeserver, f"h{unique}") as alice:
        history = [
            connector.said(chat, f"m{i}", f"before {i} {unique}", ago=600 - i * 100)
            for i in range(5)
        ]
        # The newest one arrives live: the portal's room is made for it.
        assert await bridge.handle_remote(history[-1])
        await eventually(lambda: _mapped(bridge, chat, "m4"), "the live message")
        assert (chat, "", 3) in connector.fetches
        room_id = await alice.join(f"#_bk_toy_{chat}:{DOMAIN}")
        carol = f"@_bk_toy_carol:{DOMAIN}"

        async def with_carol() -> list[dict[str, Any]] | None:
            events = await alice.events(room_id)
            joined = any(e["type"] == "m.room.member" and e["state_key"] == carol for e in events)
            return events if joined else None

        events = await eventually(with_carol, "the members' joins")
        messages = texts(events, unique)
        assert [e["content"]["body"] for e in messages] == [
            f"before {i} {unique}"
            for i in (2, 3, 4)  # the live one once
        ]
        for event in messages:
            number = int(event["content"]["body"].split()[1])
            assert event["origin_server_ts"] == int(history[number].timestamp * 1000)
        position = {e["event_id"]: i for i, e in enumerate(events)}
        carol_joined = next(
            position[e["event_id"]]
            for e in events
            if e["type"] == "m.room.member" and e["state_key"] == carol
        )
        assert carol_joined > max(position[e["event_id"]] for e in messages)


class KeyTrustingToy(HistoryToy):
    """A connector that reads a chat's history by its id alone and files what it
    finds under the portal it was asked about (an easy one to write)."""

    async def fetch_messages(
        self, portal: PortalKey, login: LoginHandle | None, limit: int
    ) -> Sequence[RemoteMessage]:
        found = await super().fetch_messages(portal, login, limit)
        return [attrs.evolve(message, portal=portal) for message in found]


async def test_a_login_catches_up_no_other_logins_private_chats(
    homeserver: TestHomeserver, unique: str
) -> None:
    """Another login's DM portal is not the catching-up login's to read, whatever
    the connector would give: its history would land in someone else's room."""
    network, chat = ToyNetwork(), f"d{unique}"
    lobby(network, chat)
    connector = KeyTrustingToy(network)
    bridge = make_bridge(homeserver, connector, None)
    theirs = PortalKey(chat, receiver=f"other{unique}")
    async with bridge:
        room_id = await bridge.ensure_portal(theirs)
        connector.said(chat, "p1", f"private {unique}", ago=60)
        login = await bridge.add_login(f"@a{unique}:{DOMAIN}", LoginInfo(id=f"a{unique}"))
        await eventually(lambda: _connected(bridge, f"a{unique}"), "her login")
        assert await bridge.backfill.catch_up(login) == 0
        assert (chat, f"a{unique}", MAX_CATCHUP) not in connector.fetches
        assert not await bridge.app.store.messages(theirs, "p1")
        events = await bridge.app.bot.client.request(
            "GET",
            f"/_matrix/client/v3/rooms/{quote(room_id, safe='')}/messages",
            query={"dir": "b", "limit": "50"},
        )
        assert not texts(events["chunk"], unique)


async def test_no_catch_up_without_history_or_when_off(
    homeserver: TestHomeserver, unique: str
) -> None:
    network, chat = ToyNetwork(), f"c{unique}"
    lobby(network, chat)
    assert make_bridge(homeserver, HistoryToy(network), chat).backfill.enabled
    assert not make_bridge(homeserver, HistoryToy(network), chat, max_catchup=0).backfill.enabled
    # A connector without fetch_messages: nothing to catch up from.
    assert not make_bridge(homeserver, ToyConnector(network), chat).backfill.enabled


async def _mapped(bridge: Bridge, chat: str, msg_id: str) -> bool:
    return bool(await bridge.app.store.messages(PortalKey(chat), msg_id))


async def _connected(bridge: Bridge, login_id: str) -> Any:
    login = bridge.logins.get(login_id)
    return login if login is not None and login.state is LoginState.CONNECTED else None

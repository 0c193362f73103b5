"""The bridge layer's parts that need no homeserver: config sections, localpart
escaping, remote events through the inbox's JSON, credential sealing."""

from __future__ import annotations

import re
from typing import ClassVar

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge_kit._json import json_text
from bridge_kit.bridge.connector import (
    NetworkConnector,
    escape_localpart,
    unescape_localpart,
)
from bridge_kit.bridge.core import BridgeCore
from bridge_kit.bridge.events import (
    EVENT_TYPES,
    Membership,
    MessageKind,
    RemoteMedia,
    RemoteMembership,
    RemoteMessage,
    Sender,
    event_from_payload,
    event_payload,
)
from bridge_kit.bridge.logins import Sealer
from bridge_kit.bridge.records import PortalKey
from bridge_kit.config import Config, Section
from bridge_kit.errors import ConfigError, WrongPickleKey
from bridge_kit.ids import localpart_problem
from bridge_kit.inbox.items import RemoteItem, item_event_id, parse_item
from bridge_kit.inbox.records import ItemKind
from tests.helpers.toy_network import ToyConnector, ToyNetwork

BASE = "homeserver: {url: 'http://127.0.0.1:8008'}\nappservice: {registration: r.yaml}\n"


@attrs.frozen
class ChatConfig(Section):
    section: ClassVar[str] = "chat"

    server: str
    channels: list[str] = attrs.field(factory=list)
    nicks: dict[str, str] = attrs.field(factory=dict)


def load(text: str) -> Config:
    return Config.loads(BASE + text, check_files=False, sections=(ChatConfig,))


def test_a_bridge_declares_its_own_config_section() -> None:
    config = load("chat: {server: 'irc:6667', channels: ['#a'], nicks: {a: b}}\n")
    assert config.section(ChatConfig) == ChatConfig("irc:6667", ["#a"], {"a": "b"})
    assert config.bridge.relay_template == "<{displayname}> {message}"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("chat: {server: x, chanels: []}\n", "unknown key chat.chanels (did you mean channels?)"),
        ("chat: {server: x, channels: [1]}\n", "chat.channels must be a list of strings"),
        ("chat: {server: x, nicks: [a]}\n", "chat.nicks must be a mapping of strings to strings"),
        ("", "missing required key chat.server"),
        ("chat: {server: x}\nchatt: {}\n", "unknown key chatt (did you mean chat?)"),
        ("chat: {server: x}\nbridge: {permissions: {'*': boss}}\n", "level must be one of"),
        ("chat: {server: x}\nbridge: {relay_template: '{nick}: {message}'}\n", "relay_template"),
        ("chat: {server: x}\nbridge: {command_prefix: 'a b'}\n", "bridge.command_prefix"),
    ],
)
def test_a_wrong_bridge_config_is_named_precisely(text: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(problem)):
        load(text)


def test_a_section_overrides_from_the_environment() -> None:
    environ = {"BRIDGE_KIT__CHAT__SERVER": "other:1"}
    config = Config.loads(
        BASE + "chat: {server: x}\n", check_files=False, environ=environ, sections=(ChatConfig,)
    )
    assert config.section(ChatConfig).server == "other:1"


def test_a_section_not_loaded_is_a_clear_error() -> None:
    config = Config.loads(BASE, check_files=False)
    with pytest.raises(ConfigError, match=r"sections=\(ChatConfig,\)"):
        config.section(ChatConfig)


def test_a_section_named_like_bridge_kits_own_is_refused() -> None:
    @attrs.frozen
    class Clash(Section):
        section: ClassVar[str] = "bridge"

    with pytest.raises(ConfigError, match="declared twice"):
        Config.loads(BASE, check_files=False, sections=(Clash,))


@given(st.text(min_size=1, max_size=40))
def test_localpart_escaping_is_reversible_and_valid(remote_id: str) -> None:
    escaped = escape_localpart(remote_id)
    assert unescape_localpart(escaped) == remote_id
    assert set(escaped) <= set("abcdefghijklmnopqrstuvwxyz0123456789._-/=")
    assert localpart_problem(f"irc_{escaped}"[:200], "example.org") is None or len(escaped) > 150


def test_templates_map_both_ways() -> None:
    connector = ToyConnector(ToyNetwork())
    assert connector.ghost_localpart("Bob[m]") == "_bk_toy__bob=5bm=5d"
    assert connector.ghost_for_localpart("_bk_toy__bob=5bm=5d") == "Bob[m]"
    assert connector.ghost_for_localpart("_bk_bot") is None
    assert connector.ghost_for_localpart("_bk_toy_=zz") is None
    assert connector.alias_localpart(PortalKey("lobby")) == "_bk_toy_lobby"
    assert connector.alias_localpart(PortalKey("dm", "alice")) is None
    assert connector.portal_for_alias("_bk_toy_lobby") == PortalKey("lobby")


@pytest.mark.parametrize(
    "event",
    [
        RemoteMessage(
            portal=PortalKey("c", "r"),
            sender=Sender("bob", "Bob"),
            id="1",
            text="hi",
            html="<b>hi</b>",
            kind=MessageKind.EMOTE,
            reply_to="0",
            media=RemoteMedia("https://x/y.png", "y.png", "image/png", 3),
            timestamp=1.5,
        ),
        RemoteMembership(
            portal=PortalKey("c"),
            sender=Sender("bob"),
            target=Sender("dave", "Dave"),
            membership=Membership.KICK,
            reason="spam",
        ),
    ],
)
def test_remote_events_survive_the_inbox(event: RemoteMessage | RemoteMembership) -> None:
    payload = event_payload(event)
    stored = json_text({"type": payload["type"], "key": "remote:k", "content": payload["content"]})
    item = parse_item(ItemKind.REMOTE, stored)
    assert isinstance(item, RemoteItem) and item_event_id(item) == "remote:k"
    assert event_from_payload(item.type, item.content) == event


def test_every_remote_event_type_is_named_once() -> None:
    assert len(EVENT_TYPES) == 8 and all(
        EVENT_TYPES[cls.type] is cls for cls in EVENT_TYPES.values()
    )
    with pytest.raises(ValueError, match="unknown remote event type"):
        event_from_payload("nope", {})


def test_the_remote_txn_id_names_network_portal_type_and_id() -> None:
    txn = BridgeCore._remote_txn_id
    core = type("Core", (), {"connector": ToyConnector(ToyNetwork())})()
    one = RemoteMessage(portal=PortalKey("c"), sender=Sender("b"), id="1", text="x")
    assert txn(core, one) == txn(core, attrs.evolve(one, text="changed"))  # type: ignore[arg-type]
    assert txn(core, one) != txn(core, attrs.evolve(one, portal=PortalKey("d")))  # type: ignore[arg-type]
    no_id = attrs.evolve(one, id="")
    assert txn(core, no_id) != txn(core, no_id)  # type: ignore[arg-type]


def test_credentials_are_sealed_with_the_pickle_key() -> None:
    sealer = Sealer("a pickle key")
    sealed = sealer.seal("login1", b"password")
    assert sealed is not None and b"password" not in sealed
    assert sealer.unseal("login1", sealed) == b"password"
    with pytest.raises(WrongPickleKey):
        Sealer("another key").unseal("login1", sealed)
    with pytest.raises(WrongPickleKey):
        sealer.unseal("login2", sealed)  # bound to its login: a copy elsewhere does not open
    with pytest.raises(WrongPickleKey, match="pickle_key"):
        Sealer(None).unseal("login1", sealed)
    assert Sealer(None).seal("login1", b"plain") == b"plain"


def test_a_connector_needs_its_abstract_methods() -> None:
    with pytest.raises(TypeError):
        NetworkConnector()  # type: ignore[abstract]

"""How the IRC connector turns what the relay sees into the layer's remote events
(the kick, which miniircd cannot do, and the bridge's own nicks); the rest is
covered end to end in test_irc_bridge."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from irc_bridge.client import Joined, Left, Renamed, Said, Topic
from irc_bridge.connector import RELAY, IrcConfig, IrcConnector, portal_of

from bridge_kit import Config
from bridge_kit.bridge.events import (
    Membership,
    MessageKind,
    RemoteChatInfoChange,
    RemoteEvent,
    RemoteMembership,
    RemoteMessage,
    Sender,
)
from tests.helpers.daemons import ROOT


class Handle:
    def __init__(self, login_id: str, user_id: str, nick: str) -> None:
        self.id, self.user_id, self.remote_name = login_id, user_id, nick
        self.credentials = None
        self.metadata: dict[str, Any] = {}

    async def set_state(self, state: Any, message: str = "") -> None:
        return None


class Recorder:
    """The connector's view of the bridge, keeping the remote events it is given."""

    def __init__(self) -> None:
        self.events: list[RemoteEvent] = []
        self.app = SimpleNamespace(puppets=SimpleNamespace(domain="x"))

    async def handle_remote(self, event: RemoteEvent) -> bool:
        self.events.append(event)
        return True


@pytest.fixture
def connector() -> tuple[IrcConnector, Recorder]:
    irc = IrcConnector(IrcConfig(server="127.0.0.1:6667", nick="relay", channels=["#c"]))
    recorder = Recorder()
    irc._bridge = recorder  # type: ignore[assignment]
    irc.load_login(Handle(RELAY, "@bot:x", "relay"))
    irc.load_login(Handle("@alice:x", "@alice:x", "Alice"))
    return irc, recorder


async def test_a_kick_is_a_kick_by_the_kicker(connector: tuple[IrcConnector, Recorder]) -> None:
    irc, seen = connector
    await irc.on_relay_event(Left("#C", "Pat", "kick", "behave", by="Op"))
    (event,) = seen.events
    assert isinstance(event, RemoteMembership)
    assert (event.portal, event.membership, event.reason) == (
        portal_of("#c"),
        Membership.KICK,
        "behave",
    )
    assert (event.target, event.sender) == (Sender("pat", "Pat"), Sender("op", "Op"))


async def test_the_bridges_own_nicks_are_not_mirrored(
    connector: tuple[IrcConnector, Recorder],
) -> None:
    irc, seen = connector
    await irc.on_relay_event(Joined("#c", "alice"))  # a logged-in Matrix user's connection
    await irc.on_relay_event(Said("#c", "Alice", "said on Matrix already"))
    await irc.on_relay_event(Said("#c", "RELAY", "the relay itself"))
    await irc.on_relay_event(Said("relay", "bob", "a private message"))
    assert seen.events == []
    await irc.on_relay_event(Said("#c", "bob", "\x01ACTION waves"[8:], action=True))
    (event,) = seen.events
    assert isinstance(event, RemoteMessage)
    assert (event.kind, event.text, event.sender) == (
        MessageKind.EMOTE,
        "waves",
        Sender("bob", "bob"),
    )
    assert irc.nick_of("@alice:x") == "Alice"
    assert irc.nick_of("@irc_bob:x") == "bob"


async def test_a_nick_change_is_the_old_ghost_leaving_and_the_new_joining(
    connector: tuple[IrcConnector, Recorder],
) -> None:
    irc, seen = connector
    await irc.on_relay_event(Renamed("bob", "Robert", ("#c",)))
    assert [(e.target, e.membership) for e in seen.events if isinstance(e, RemoteMembership)] == [
        (Sender("bob", "bob"), Membership.LEAVE),
        (Sender("robert", "Robert"), Membership.JOIN),
    ]


async def test_a_topic_change_changes_the_room_topic(
    connector: tuple[IrcConnector, Recorder],
) -> None:
    irc, seen = connector
    await irc.on_relay_event(Topic("#c", "on joining"))  # kept for the room's creation
    assert seen.events == []
    assert (await irc.get_chat_info(portal_of("#c"))).topic == "on joining"  # type: ignore[union-attr]
    await irc.on_relay_event(Topic("#c", "new topic", "bob"))
    (event,) = seen.events
    assert isinstance(event, RemoteChatInfoChange) and event.topic == "new topic"


async def test_a_line_addressing_a_nick_pills_its_matrix_user(
    connector: tuple[IrcConnector, Recorder],
) -> None:
    irc, seen = connector
    relay = irc.relay
    assert relay is not None
    relay.connection.members["#c"] = {"relay", "Alice", "bob", "cy"}
    await irc.on_relay_event(Said("#c", "cy", "alice: hi \x02there\x02"))
    await irc.on_relay_event(Said("#c", "cy", "Bob, <yo>"))
    await irc.on_relay_event(Said("#c", "cy", "nobody: here"))
    assert [e.html for e in seen.events if isinstance(e, RemoteMessage)] == [
        '<a href="https://matrix.to/#/@alice:x">alice</a>: hi <b>there</b>',
        '<a href="https://matrix.to/#/@irc_bob:x">Bob</a>, &lt;yo&gt;',
        None,
    ]


def test_the_config_example_loads(tmp_path: Path) -> None:
    example = ROOT / "examples" / "irc_bridge" / "config.yaml.example"
    (tmp_path / "registration.yaml").write_text((ROOT / "registration.yaml.example").read_text())
    config = Config.load(_copy(example, tmp_path), sections=IrcConnector.config_sections)
    assert config.section(IrcConfig) == IrcConfig(
        server="127.0.0.1:6667", nick="bkrelay", channels=["#lobby"]
    )


def _copy(source: Path, directory: Path) -> Path:
    target = directory / "config.yaml"
    target.write_text(source.read_text())
    return target

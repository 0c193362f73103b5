"""The IRC network on the bridge layer: channels are portals, nicks are ghosts.

The relay connection (``irc.nick``) sits in every configured channel and is the
bridge's eyes: what it sees becomes remote events. A Matrix user who logged in
(``login <nick>``) gets a connection of her own, which only speaks: her nick is
not mirrored back as a ghost, and what she says is not bridged twice.
"""

from __future__ import annotations

import asyncio
import html
import logging
import re
import uuid
from collections.abc import Sequence
from typing import ClassVar

import attrs

from bridge_kit.bridge.connector import (
    BridgeContext,
    Capabilities,
    ChatInfo,
    LoginHandle,
    LoginInfo,
    MatrixEdit,
    MatrixMessage,
    NetworkClient,
    NetworkConnector,
    SentMessage,
    UserInfo,
)
from bridge_kit.bridge.events import (
    Membership,
    MessageKind,
    RemoteChatInfoChange,
    RemoteEvent,
    RemoteMembership,
    RemoteMessage,
    Sender,
)
from bridge_kit.bridge.formatting import Formatter, pill
from bridge_kit.bridge.records import LoginState, PortalKey
from bridge_kit.config import Section
from bridge_kit.errors import InvalidInput

from .client import (
    Connected,
    Disconnected,
    IrcConnection,
    IrcEvent,
    Joined,
    Left,
    Names,
    Renamed,
    Said,
    Topic,
    fold,
)
from .formatting import COLOUR, irc_colour, irc_to_html, strip_codes

__all__ = ["IrcConfig", "IrcConnector"]

log = logging.getLogger("irc_bridge")

RELAY = "relay"
#: What IRC servers take as a nick (RFC 2812, with the usual longer length).
NICK = re.compile(r"^[A-Za-z\[\]\\`_^{|}][A-Za-z0-9\[\]\\`_^{|}-]{0,29}$")
#: How IRC users address someone: ``nick: text`` or ``nick, text``.
ADDRESSED = re.compile(r"^([^\s:,\x00-\x1f]+)([:,] )")
#: Seconds ``connect`` waits for the server's welcome before the layer retries.
CONNECT_WAIT = 30.0


def _check_server(value: object) -> str | None:
    host, _, port = str(value).rpartition(":")
    return None if host and port.isdigit() else "must be host:port"


def _check_channels(value: object) -> str | None:
    bad = [c for c in value if not str(c).startswith("#")] if isinstance(value, list) else None
    return f"must be channel names starting with #, not {bad}" if bad else None


@attrs.frozen
class IrcConfig(Section):
    """``irc``: the server, the relay connection's nick and the bridged channels."""

    section: ClassVar[str] = "irc"

    server: str = attrs.field(metadata={"check": _check_server})
    nick: str = attrs.field(
        default="bkrelay",
        metadata={"check": lambda v: None if NICK.match(str(v)) else "is not a valid IRC nick"},
    )
    channels: list[str] = attrs.field(factory=list, metadata={"check": _check_channels})
    #: Flood control: lines sent at once, then seconds between lines.
    burst: int = 10
    interval: float = 0.5

    @property
    def address(self) -> tuple[str, int]:
        host, _, port = self.server.rpartition(":")
        return host, int(port)


def portal_of(channel: str) -> PortalKey:
    """A channel's portal: its name without ``#``, case folded (``#Lobby`` is ``#lobby``)."""
    return PortalKey(fold(channel).removeprefix("#"))


def channel_of(portal: PortalKey) -> str:
    return "#" + portal.id


def target_of(portal: PortalKey) -> str:
    """Where a portal's messages go on IRC: its channel, or the nick of a private chat."""
    return portal.id if portal.receiver else channel_of(portal)


class IrcFormatter(Formatter):
    """Matrix HTML as IRC formatting codes; pills as the nick IRC users know."""

    paragraph_break = "\n"

    def __init__(self, connector: IrcConnector) -> None:
        self.connector = connector

    def bold(self, text: str) -> str:
        return f"\x02{text}\x02"

    def italic(self, text: str) -> str:
        return f"\x1d{text}\x1d"

    def underline(self, text: str) -> str:
        return f"\x1f{text}\x1f"

    def strikethrough(self, text: str) -> str:
        return f"\x1e{text}\x1e"

    def inline_code(self, code: str) -> str:
        return f"\x11{code}\x11"

    def color(self, text: str, foreground: str | None, background: str | None) -> str:
        if foreground is None:
            return text
        code = f"{irc_colour(foreground):02d}"
        if background is not None:
            code += f",{irc_colour(background):02d}"
        return f"{COLOUR}{code}{text}{COLOUR}"

    async def matrix_mention(self, user_id: str, text: str) -> str:
        return self.connector.nick_of(user_id) or text


class IrcConnector(NetworkConnector):
    network_id = "irc"
    display_name = "IRC"
    capabilities = Capabilities(formatting=True, edits=True, replies=True)
    config_sections = (IrcConfig,)
    ghost_localpart_template = "irc_{id}"
    alias_localpart_template = "irc_{id}"
    default_relay_login = RELAY

    def __init__(self, config: IrcConfig) -> None:
        # Given here, not read at start: stored logins are loaded before ``start``.
        self.config = config
        self._bridge: BridgeContext | None = None
        self.clients: dict[str, IrcClient] = {}  # login id → its client
        self.topics: dict[str, str] = {}  # folded channel → its topic
        self._opening: set[asyncio.Task[None]] = set()

    @property
    def bridge(self) -> BridgeContext:
        assert self._bridge is not None, "the connector has not started"
        return self._bridge

    @property
    def relay(self) -> IrcClient | None:
        return self.clients.get(RELAY)

    async def start(self, bridge: BridgeContext) -> None:
        self._bridge = bridge
        info = LoginInfo(id=RELAY, remote_name=self.config.nick)
        await bridge.add_login(bridge.app.bot.user_id, info)

    async def stop(self) -> None:
        for task in list(self._opening):
            task.cancel()
        await asyncio.gather(*self._opening, return_exceptions=True)
        for client in list(self.clients.values()):
            await client.disconnect()

    def formatter(self) -> Formatter:
        return IrcFormatter(self)

    def load_login(self, login: LoginHandle) -> NetworkClient:
        client = IrcClient(self, login)
        self.clients[login.id] = client
        return client

    async def login(self, user_id: str, args: Sequence[str]) -> LoginInfo:
        if len(args) != 1 or not NICK.match(args[0]):
            raise InvalidInput("usage: login <nick> (an IRC nick: letters, digits, -[]\\`_^{|})")
        return LoginInfo(id=user_id, remote_name=args[0])

    async def get_chat_info(self, portal: PortalKey) -> ChatInfo | None:
        if portal.receiver:  # a private chat of a logged-in user with a nick
            client = self.clients.get(portal.receiver)
            if client is None:
                return None
            them = Sender(portal.id)
            return ChatInfo(members=[them], is_direct=True, invite=[client.login.user_id])
        channel = channel_of(portal)
        if fold(channel) not in {fold(c) for c in self.config.channels}:
            return None  # only configured channels are bridged
        relay = self.relay
        nicks = relay.connection.members.get(fold(channel), set()) if relay else set()
        return ChatInfo(
            name=channel,
            topic=self.topics.get(fold(channel)) or None,
            members=[self.sender(n) for n in sorted(nicks) if not self.is_own(n)],
        )

    async def get_user_info(self, user_id: str) -> UserInfo | None:
        return UserInfo(name=user_id)

    # -- who is who ------------------------------------------------------------------

    @staticmethod
    def sender(nick: str) -> Sender:
        """A nick's ghost: keyed by its folded form, named as typed."""
        return Sender(fold(nick), name=nick)

    def is_own(self, nick: str) -> bool:
        """One of the bridge's connections (the relay's, or a logged-in Matrix user's)."""
        folded = fold(nick)
        return any(
            folded in (fold(c.connection.nick), fold(c.connection.wanted))
            for c in self.clients.values()
        )

    def nick_of(self, user_id: str) -> str | None:
        """The IRC nick of a Matrix user: a ghost's nick, or a logged-in user's own."""
        for client in self.clients.values():
            if client.login.id != RELAY and client.login.user_id == user_id:
                return client.connection.nick
        return self.ghost_for_localpart(user_id[1:].split(":", 1)[0])

    # -- IRC → Matrix (the relay's events) ---------------------------------------------

    async def on_relay_event(self, event: IrcEvent) -> None:
        if isinstance(event, Said):
            await self._said(event)
        elif isinstance(event, Joined) and not self.is_own(event.nick):
            await self._membership(event.channel, event.nick, Membership.JOIN)
        elif isinstance(event, Left) and not self.is_own(event.nick):
            kind = Membership.KICK if event.kind == "kick" else Membership.LEAVE
            await self._membership(event.channel, event.nick, kind, event.reason, by=event.by)
        elif isinstance(event, Renamed):
            await self._renamed(event)
        elif isinstance(event, Names):
            await self._names(event)
        elif isinstance(event, Topic):
            await self._topic(event)

    async def _said(self, event: Said) -> None:
        if not event.target.startswith("#") or self.is_own(event.nick):
            return  # private messages are not bridged; our own lines are on Matrix already
        kind = MessageKind.EMOTE if event.action else MessageKind.TEXT
        kind = MessageKind.NOTICE if event.notice else kind
        await self._remote(
            RemoteMessage(
                portal=portal_of(event.target),
                sender=self.sender(event.nick),
                id=uuid.uuid4().hex,
                text=strip_codes(event.text),
                html=self._html(event.target, event.text),
                kind=kind,
            )
        )

    def _html(self, channel: str, text: str) -> str | None:
        """The HTML of an IRC line: its formatting, and the nick it addresses as a pill."""
        match = ADDRESSED.match(text)
        user_id = self.user_of(channel, match.group(1)) if match else None
        if match is None or user_id is None:
            return irc_to_html(text)
        rest = text[match.end() :]
        body = irc_to_html(rest) or html.escape(rest, quote=False)
        return pill(user_id, match.group(1)) + match.group(2) + body

    def user_of(self, channel: str, nick: str) -> str | None:
        """The Matrix user behind a nick in ``channel``: a logged-in user, or a ghost."""
        folded = fold(nick)
        for client in self.clients.values():
            if client.login.id != RELAY and fold(client.connection.nick) == folded:
                return client.login.user_id
        relay = self.relay
        members = relay.connection.members.get(fold(channel), set()) if relay else set()
        if self.is_own(nick) or not any(fold(m) == folded for m in members):
            return None
        return f"@{self.ghost_localpart(folded)}:{self.bridge.app.puppets.domain}"

    async def on_private(self, client: IrcClient, event: Said) -> None:
        """A private message to a logged-in user: her private chat with that nick."""
        if self.is_own(event.nick):
            return
        await self._remote(
            RemoteMessage(
                portal=PortalKey(fold(event.nick), receiver=client.login.id),
                sender=self.sender(event.nick),
                id=uuid.uuid4().hex,
                text=strip_codes(event.text),
                html=irc_to_html(event.text),
                kind=MessageKind.EMOTE if event.action else MessageKind.TEXT,
            )
        )

    async def _membership(
        self, channel: str, nick: str, membership: Membership, reason: str = "", *, by: str = ""
    ) -> None:
        target = self.sender(nick)
        await self._remote(
            RemoteMembership(
                portal=portal_of(channel),
                sender=self.sender(by) if by else target,
                id=uuid.uuid4().hex,
                target=target,
                membership=membership,
                reason=reason,
            )
        )

    async def _renamed(self, event: Renamed) -> None:
        """A nick is a ghost: the old one leaves, the new one joins with its name."""
        for channel in event.channels:
            if not self.is_own(event.old):
                await self._membership(
                    channel, event.old, Membership.LEAVE, f"now known as {event.new}"
                )
            if not self.is_own(event.new):
                await self._membership(channel, event.new, Membership.JOIN)

    async def _names(self, event: Names) -> None:
        """The relay is in a channel: its portal is opened in the background, so a
        big channel's members joining does not hold up what the relay reads (its
        events wait in the portal's lane meanwhile, in order)."""
        task = asyncio.create_task(self._open(event), name=f"open {event.channel}")
        self._opening.add(task)
        task.add_done_callback(self._opening.discard)

    async def _open(self, event: Names) -> None:
        key = portal_of(event.channel)
        try:
            existed = await self.bridge.app.store.portal(key)
            room_id = await self.bridge.ensure_portal(key)
            if existed is not None and existed.room_id is not None:
                await self._resync(event, room_id)
            # else: made just now, with the members (join_many)
        except Exception as exc:  # a background task: logged, and the next NAMES tries again
            log.warning("could not open %s: %s: %s", event.channel, type(exc).__name__, exc)

    async def _resync(self, event: Names, room_id: str) -> None:
        """A portal made before (a restart, a reconnect): ghosts of nicks gone meanwhile
        leave, and whoever is here now joins (the layer skips ghosts already in)."""
        present = {fold(nick) for nick in event.nicks}
        domain = f":{self.bridge.app.puppets.domain}"
        for user_id, member in (await self.bridge.app.bot.get_joined_members(room_id)).items():
            remote_id = self.ghost_for_localpart(user_id[1:].removesuffix(domain))
            if user_id.endswith(domain) and remote_id is not None and remote_id not in present:
                ghost = Sender(remote_id, name=member.displayname or remote_id)
                await self._remote(
                    RemoteMembership(
                        portal=portal_of(event.channel), sender=ghost, id=uuid.uuid4().hex,
                        target=ghost, membership=Membership.LEAVE, reason="not in the channel",
                    )
                )  # fmt: skip
        for nick in sorted(event.nicks):
            if not self.is_own(nick):
                await self._membership(event.channel, nick, Membership.JOIN)

    async def _topic(self, event: Topic) -> None:
        """The topic on joining goes into a new room; a change by someone, to the room."""
        self.topics[fold(event.channel)] = event.topic
        if event.nick:
            await self._remote(
                RemoteChatInfoChange(
                    portal=portal_of(event.channel), sender=self.sender(event.nick),
                    id=uuid.uuid4().hex, topic=event.topic,
                )
            )  # fmt: skip

    async def _remote(self, event: RemoteEvent) -> None:
        await self.bridge.handle_remote(event)


class IrcClient(NetworkClient):
    """One login's IRC connection: the relay's, or a Matrix user's own."""

    def __init__(self, connector: IrcConnector, login: LoginHandle) -> None:
        self.connector = connector
        self.login = login
        config = connector.config
        host, port = config.address
        self.connection = IrcConnection(
            host, port, login.remote_name or config.nick, self._on_event,
            channels=set(config.channels), username=_username(login),
        )  # fmt: skip
        self.connection.pacer.burst, self.connection.pacer.interval = config.burst, config.interval
        self._task: asyncio.Task[None] | None = None

    @property
    def is_relay(self) -> bool:
        return self.login.id == RELAY

    async def connect(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self.connection.run(), name=f"irc {self.login.id}")
        try:
            await asyncio.wait_for(self.connection.connected.wait(), CONNECT_WAIT)
        except TimeoutError:
            raise ConnectionError(
                f"no welcome from IRC server {self.connector.config.server}"
            ) from None

    async def disconnect(self) -> None:
        await self.connection.close()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def logout(self) -> None:
        """Quit IRC; her nick is nobody's now (the relay mirrors whoever takes it)."""
        if self.connector.clients.get(self.login.id) is self:
            del self.connector.clients[self.login.id]
        await self.disconnect()

    async def _on_event(self, connection: IrcConnection, event: IrcEvent) -> None:
        if isinstance(event, Connected):
            await self.login.set_state(LoginState.CONNECTED, f"connected as {event.nick}")
        elif isinstance(event, Disconnected):
            if not connection.closing:  # a stop is no disconnect
                await self.login.set_state(LoginState.TRANSIENT_DISCONNECT, event.reason)
        elif self.is_relay:
            await self.connector.on_relay_event(event)
        elif isinstance(event, Said) and fold(event.target) == fold(connection.nick):
            await self.connector.on_private(self, event)

    # -- Matrix → IRC ------------------------------------------------------------------

    async def send_message(self, message: MatrixMessage) -> SentMessage:
        prefix = self._relay_prefix(
            message.text, message.relayed, message.sender_name, message.sender_mxid
        )
        text = message.text[len(prefix) :]
        if message.reply_to is not None:
            text = f"{self._nick_for_reply(message)}: {text}"  # as IRC users answer
        action = message.kind is MessageKind.EMOTE
        if action and message.relayed:
            text, prefix, action = (
                f"* {message.sender_name} {text}",
                "",
                False,
            )  # as IRC shows a /me
        notice = message.kind is MessageKind.NOTICE
        await self._say(message.portal.key, prefix, text, action=action, notice=notice)
        return SentMessage(remote_id=f"{self.connection.nick}:{uuid.uuid4().hex}")

    async def send_edit(self, edit: MatrixEdit) -> None:
        """IRC has no edits: the new text goes out again, marked as IRC users do (``* ``)."""
        prefix = self._relay_prefix(edit.text, edit.relayed, edit.sender_name, edit.sender_mxid)
        await self._say(edit.portal.key, prefix, "* " + edit.text[len(prefix) :])

    def _relay_prefix(self, text: str, relayed: bool, name: str, mxid: str) -> str:
        """What the relay template put before the message in a relayed ``text``
        (``<name> `` with the default template), or ""."""
        if not relayed:
            return ""
        template = self.connector.bridge.config.bridge.relay_template
        prefix = template.format(displayname=name, message="\0", mxid=mxid).partition("\0")[0]
        return prefix if text.startswith(prefix) else ""

    async def _say(
        self,
        portal: PortalKey,
        prefix: str,
        text: str,
        *,
        action: bool = False,
        notice: bool = False,
    ) -> None:
        """``text`` to the channel, each of its lines after ``prefix``."""
        for line in text.split("\n"):
            if line.strip():
                await self.connection.say(
                    target_of(portal), prefix + line, action=action, notice=notice
                )

    def _nick_for_reply(self, message: MatrixMessage) -> str:
        assert message.reply_to is not None
        record = message.reply_to
        if record.sender:
            return record.sender
        return self.connector.nick_of(record.sender_mxid) or record.sender_mxid[1:].split(":")[0]


def _username(login: LoginHandle) -> str:
    return "bkrelay" if login.id == RELAY else "matrix"

"""The network connector: the one interface a bridge implements for its network.

A bridge writes two classes:

- a :class:`NetworkConnector` (one per bridge): names the network, declares its
  capabilities and config section, tells the layer about remote chats and users
  (:meth:`~NetworkConnector.get_chat_info`, :meth:`~NetworkConnector.get_user_info`),
  logs users in (:meth:`~NetworkConnector.login`) and builds a client for each
  login (:meth:`~NetworkConnector.load_login`);
- a :class:`NetworkClient` (one per login): connects, and sends what Matrix users
  do (messages, edits, reactions, redactions, typing) to the remote side.

Remote events go the other way, through
:meth:`~bridge_kit.bridge.core.BridgeCore.handle_remote` (see
:mod:`bridge_kit.bridge.events`). Everything else (rooms, puppets, the message
map, relaying, commands, retries, restarts) is the layer's work.
"""

from __future__ import annotations

import abc
import re
from collections.abc import Awaitable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import attrs

from bridge_kit.bridge.events import MessageKind, RemoteEvent, RemoteMedia, Sender
from bridge_kit.bridge.formatting import Formatter
from bridge_kit.bridge.records import (
    LoginState,
    MessageRecord,
    PortalKey,
    PortalRecord,
    ReactionRecord,
)

if TYPE_CHECKING:
    from bridge_kit.app.service import AppService
    from bridge_kit.config import Config, Section

__all__ = [
    "BridgeContext",
    "Capabilities",
    "ChatInfo",
    "LoginHandle",
    "LoginInfo",
    "MatrixEdit",
    "MatrixMessage",
    "MatrixReaction",
    "MatrixReactionRemove",
    "MatrixRedaction",
    "MatrixTyping",
    "NetworkClient",
    "NetworkConnector",
    "SentMessage",
    "UserInfo",
    "escape_localpart",
]


# -- what the connector tells the layer ----------------------------------------


@attrs.frozen
class Capabilities:
    """What the remote network can take from Matrix; the layer does not send the rest
    (an edit to a network without edits is dropped, with a notice to the sender)."""

    edits: bool = False
    reactions: bool = False
    redactions: bool = False
    replies: bool = False
    typing: bool = False
    media: bool = False
    #: The network renders formatting (the client gets ``html`` besides ``text``).
    formatting: bool = False
    #: Longest message text the network takes (``None``: no limit); the connector
    #: splits longer texts itself, the layer only tells commands' users.
    max_text_length: int | None = None


@attrs.frozen
class UserInfo:
    """A remote user's profile, for their ghost."""

    name: str | None = None
    avatar_url: str | None = None


@attrs.frozen
class ChatInfo:
    """What a portal's room is made from: name, topic, avatar and ``members``
    (remote users whose ghosts join the room, in bulk). ``is_direct``: a DM.
    ``invite``: Matrix users invited to the new room (e.g. the login's user of a DM)."""

    name: str | None = None
    topic: str | None = None
    avatar_url: str | None = None
    members: Sequence[Sender] = ()
    is_direct: bool = False
    invite: Sequence[str] = ()


@attrs.frozen
class LoginInfo:
    """A successful login, as :meth:`NetworkConnector.login` returns it.

    ``id`` is the login's id on the network (unique per network account);
    ``credentials`` are what reconnects it after a restart (a token, a password),
    sealed with the pickle key before they are stored when one is configured.
    """

    id: str
    remote_name: str = ""
    credentials: bytes | None = None
    metadata: dict[str, Any] = attrs.field(factory=dict)


class LoginHandle(Protocol):
    """A login as its :class:`NetworkClient` sees it (the layer's side of it)."""

    @property
    def id(self) -> str: ...

    @property
    def user_id(self) -> str:
        """The Matrix user whose login this is."""
        ...

    @property
    def remote_name(self) -> str: ...

    @property
    def credentials(self) -> bytes | None:
        """The credentials, unsealed."""
        ...

    @property
    def metadata(self) -> dict[str, Any]: ...

    async def set_state(self, state: LoginState, message: str = "") -> None:
        """Report a new state. The layer stores it, tells the user in the management
        room, and reconnects with backoff after ``TRANSIENT_DISCONNECT``; after
        ``BAD_CREDENTIALS`` or ``LOGGED_OUT`` it waits for the user."""
        ...


class BridgeContext(Protocol):
    """What a connector may use of the running bridge (given to
    :meth:`NetworkConnector.start`): the app, the config, and the remote events' door."""

    @property
    def app(self) -> AppService: ...

    @property
    def config(self) -> Config: ...

    def handle_remote(self, event: RemoteEvent) -> Awaitable[bool]:
        """Store ``event`` durably for its portal's lane; False for a duplicate."""
        ...

    def set_relay(self, portal: PortalKey, login_id: str | None) -> Awaitable[None]:
        """Make ``login_id`` relay Matrix users without a login in ``portal``."""
        ...

    def add_login(self, user_id: str, info: LoginInfo) -> Awaitable[LoginHandle]:
        """Store a login of Matrix user ``user_id`` (the bot's, for a relay connection),
        load its client and connect it; a stored one of the same id is replaced."""
        ...

    def ensure_portal(self, portal: PortalKey) -> Awaitable[str]:
        """The room of ``portal``, created with its members if it has none yet."""
        ...


# -- what the layer asks a client to send ----------------------------------------


@attrs.frozen(kw_only=True)
class MatrixMessage:
    """A Matrix message for the remote chat of ``portal``.

    ``text`` is the plain text (with the relay template applied when
    ``relayed``), ``html`` the Matrix HTML if it had any. ``reply_to`` is the
    message-map entry of the message it answers. ``media`` (for a file) is the
    ``mxc://`` URI's download. ``sender_name`` is the Matrix sender's display name.
    """

    portal: PortalRecord
    event_id: str
    sender_mxid: str
    sender_name: str
    kind: MessageKind
    text: str
    html: str | None = None
    reply_to: MessageRecord | None = None
    media: RemoteMedia | None = None
    relayed: bool = False
    #: The event's content as it came (for what the layer does not carry over).
    content: Mapping[str, Any] = attrs.field(factory=dict)


@attrs.frozen(kw_only=True)
class MatrixEdit:
    """``target`` (a bridged message) now reads ``text`` / ``html``."""

    portal: PortalRecord
    event_id: str
    sender_mxid: str
    sender_name: str
    target: MessageRecord
    text: str
    html: str | None = None
    relayed: bool = False


@attrs.frozen(kw_only=True)
class MatrixReaction:
    """``sender_mxid`` reacted to ``target`` with ``key``."""

    portal: PortalRecord
    event_id: str
    sender_mxid: str
    target: MessageRecord
    key: str


@attrs.frozen(kw_only=True)
class MatrixReactionRemove:
    """The reaction ``target`` was redacted on Matrix."""

    portal: PortalRecord
    event_id: str
    sender_mxid: str
    target: ReactionRecord


@attrs.frozen(kw_only=True)
class MatrixRedaction:
    """Message ``target`` was redacted on Matrix."""

    portal: PortalRecord
    event_id: str
    sender_mxid: str
    target: MessageRecord
    reason: str = ""


@attrs.frozen(kw_only=True)
class MatrixTyping:
    """``sender_mxid`` started (``typing``) or stopped typing in ``portal``."""

    portal: PortalRecord
    sender_mxid: str
    typing: bool


@attrs.frozen
class SentMessage:
    """What the remote side made of a sent message: its id there (for the message
    map; a network without ids makes one up, unique per portal) and its time."""

    remote_id: str
    timestamp: float = 0.0


# -- the interfaces -----------------------------------------------------------


class NetworkClient(abc.ABC):
    """One login's connection to the remote network.

    The send methods raise a :class:`~bridge_kit.errors.BridgeKitError` the
    inbox should not retry (a refusal), or anything else to be retried.
    The defaults refuse what :class:`Capabilities` says the network cannot do.
    """

    @abc.abstractmethod
    async def connect(self) -> None:
        """Connect (again); report ``CONNECTED`` through the login's
        :meth:`LoginHandle.set_state` once it is. Raise to be retried with backoff."""

    @abc.abstractmethod
    async def disconnect(self) -> None:
        """Close the connection (the bridge stops, or the user logs out)."""

    async def logout(self) -> None:
        """Log out on the remote side too (``logout`` command); default: disconnect."""
        await self.disconnect()

    @abc.abstractmethod
    async def send_message(self, message: MatrixMessage) -> SentMessage:
        """Send a message; its remote id goes into the message map."""

    async def send_edit(self, edit: MatrixEdit) -> None:
        raise NotImplementedError

    async def send_reaction(self, reaction: MatrixReaction) -> str | None:
        """React; the reaction's remote id if the network has one."""
        raise NotImplementedError

    async def send_reaction_remove(self, removal: MatrixReactionRemove) -> None:
        raise NotImplementedError

    async def send_redaction(self, redaction: MatrixRedaction) -> None:
        raise NotImplementedError

    async def send_typing(self, typing: MatrixTyping) -> None:
        return None


class NetworkConnector(abc.ABC):
    """A remote network, to the layer. Subclass it and fill in the class attributes.

    ``ghost_localpart_template`` and ``alias_localpart_template`` make a ghost's
    user localpart and a portal's alias localpart from a remote id: ``{id}`` is
    replaced by the id escaped to Matrix's localpart characters
    (:func:`escape_localpart`). Both must land in the registration's namespaces
    (``generate-registration --user-prefix irc_`` and ``irc_{id}``).
    """

    #: The network's id: in ``m.bridge`` state, transaction ids and logs. Never change it.
    network_id: ClassVar[str]
    #: Its name for people (``m.bridge`` ``protocol.displayname``).
    display_name: ClassVar[str]
    capabilities: ClassVar[Capabilities] = Capabilities()
    #: The config sections the bridge's config file has besides bridge_kit's
    #: (``Config.load(path, sections=connector.config_sections)``).
    config_sections: ClassVar[tuple[type[Section], ...]] = ()
    ghost_localpart_template: ClassVar[str] = "{id}"
    #: ``None``: portals get no alias (and a Matrix user cannot create one by joining).
    alias_localpart_template: ClassVar[str | None] = None
    #: The login that relays in every portal without one of its own (e.g. the IRC
    #: relay connection); ``None``: only portals given one with ``set-relay`` relay.
    default_relay_login: ClassVar[str | None] = None

    async def start(self, bridge: BridgeContext) -> None:
        """The bridge runs (the app started, stored logins are loaded and connecting):
        connect what is not a login (a relay connection), start bridging. Default: nothing."""
        return None

    async def stop(self) -> None:
        """The bridge stops (before its logins disconnect). Default: nothing."""
        return None

    @abc.abstractmethod
    def load_login(self, login: LoginHandle) -> NetworkClient:
        """The client of ``login`` (not yet connected: the layer calls ``connect``)."""

    @abc.abstractmethod
    async def login(self, user_id: str, args: Sequence[str]) -> LoginInfo:
        """Log Matrix user ``user_id`` in with the ``login`` command's ``args``.

        Raise :class:`~bridge_kit.errors.InvalidInput` with a one-line message
        for arguments that will not do (the user sees the message).
        """

    async def get_chat_info(self, portal: PortalKey) -> ChatInfo | None:
        """What the portal's room is made from; ``None``: the chat is not known
        (an alias query for it is answered no). Default: nothing but the id."""
        return ChatInfo()

    async def get_user_info(self, user_id: str) -> UserInfo | None:
        """A remote user's profile; ``None``: no such user. Default: the id as name."""
        return UserInfo(name=user_id)

    async def portal_for_invite(
        self, room_id: str, inviter: str, ghost_id: str
    ) -> PortalKey | None:
        """A Matrix user invited the ghost of remote user ``ghost_id`` to ``room_id``
        (a DM started from Matrix): the portal that room becomes, or ``None`` to
        leave the invite alone (the default). The ghost joins; the room is claimed
        for the portal unless the portal has a room already."""
        return None

    def formatter(self) -> Formatter:
        """How Matrix messages become the network's text (and mentions): override
        with a :class:`~bridge_kit.bridge.formatting.Formatter` subclass. Default:
        plain text. Called once, at start."""
        return Formatter()

    def ghost_localpart(self, user_id: str) -> str:
        """The localpart of remote user ``user_id``'s ghost."""
        return self.ghost_localpart_template.format(id=escape_localpart(user_id))

    def alias_localpart(self, portal: PortalKey) -> str | None:
        """The localpart of ``portal``'s alias, or ``None`` (no alias)."""
        template = self.alias_localpart_template
        if template is None or portal.receiver:
            return None
        return template.format(id=escape_localpart(portal.id))

    def portal_for_alias(self, localpart: str) -> PortalKey | None:
        """The portal an alias localpart names (the inverse of :meth:`alias_localpart`),
        or ``None``. Default: undo the template and the escaping."""
        template = self.alias_localpart_template
        if template is None:
            return None
        remote_id = _match_template(template, localpart)
        return None if remote_id is None else PortalKey(remote_id)

    def ghost_for_localpart(self, localpart: str) -> str | None:
        """The remote user id a ghost localpart names, or ``None``."""
        return _match_template(self.ghost_localpart_template, localpart)


# -- localpart escaping ----------------------------------------------------------

_SAFE = frozenset("abcdefghijklmnopqrstuvwxyz0123456789.-/")


def escape_localpart(remote_id: str) -> str:
    """``remote_id`` in Matrix localpart characters, reversibly: an upper-case letter
    becomes ``_`` + its lower case, ``_`` becomes ``__``, anything else outside
    ``a-z 0-9 . - /`` becomes ``=xx`` per UTF-8 byte (as mautrix and the spec's
    appendix on mapping ids do)."""
    out: list[str] = []
    for char in remote_id:
        if char in _SAFE:
            out.append(char)
        elif char == "_":
            out.append("__")
        elif "A" <= char <= "Z":
            out.append("_" + char.lower())
        else:
            out.extend(f"={byte:02x}" for byte in char.encode("utf-8"))
    return "".join(out)


_ESCAPED = re.compile(r"__|_[a-z]|(?:=[0-9a-f]{2})+")


def unescape_localpart(localpart: str) -> str | None:
    """The id :func:`escape_localpart` made ``localpart`` from, or ``None``."""

    def undo(match: re.Match[str]) -> str:
        text = match.group()
        if text == "__":
            return "_"
        if text.startswith("_"):
            return text[1].upper()
        return bytes.fromhex(text.replace("=", "")).decode("utf-8")

    try:
        remote_id = _ESCAPED.sub(undo, localpart)
    except UnicodeDecodeError:
        return None
    return remote_id if escape_localpart(remote_id) == localpart else None


def _match_template(template: str, localpart: str) -> str | None:
    prefix, marker, suffix = template.partition("{id}")
    if not marker or not localpart.startswith(prefix) or not localpart.endswith(suffix):
        return None
    escaped = localpart[len(prefix) : len(localpart) - len(suffix)]
    return unescape_localpart(escaped) if escaped else None

"""The bridge layer's records, as the store reads and writes them.

A *portal* is a remote chat and its Matrix room, a *ghost* a remote user and
their puppet, a *login* a Matrix user's account on the remote network, and
the *message map* pairs each bridged message (and reaction) with its Matrix
event, so that edits, replies, reactions and redactions find their
counterpart on either side. These are plain records: the store keeps them,
:mod:`bridge_kit.bridge` gives them behaviour.
"""

from __future__ import annotations

import enum
from typing import Any

import attrs

__all__ = [
    "GhostRecord",
    "LoginRecord",
    "LoginState",
    "MessageRecord",
    "PortalKey",
    "PortalRecord",
    "ReactionRecord",
]


class LoginState(enum.Enum):
    """Where a login stands, with bridgev2's state names (``bridgev2/status``)."""

    CONNECTING = "CONNECTING"
    CONNECTED = "CONNECTED"
    TRANSIENT_DISCONNECT = "TRANSIENT_DISCONNECT"
    BAD_CREDENTIALS = "BAD_CREDENTIALS"
    LOGGED_OUT = "LOGGED_OUT"
    UNKNOWN_ERROR = "UNKNOWN_ERROR"


@attrs.frozen(order=True)
class PortalKey:
    """Which remote chat a portal is: the network's chat id, and for a chat that
    each login sees on its own (a DM on most networks) the login's id."""

    id: str
    receiver: str = ""

    def __str__(self) -> str:
        return self.id if not self.receiver else f"{self.id}@{self.receiver}"


@attrs.frozen
class PortalRecord:
    """A remote chat and its room. ``room_id`` is ``None`` until the room exists;
    ``relay_login`` is the login that relays for Matrix users without one."""

    key: PortalKey
    room_id: str | None = None
    name: str | None = None
    topic: str | None = None
    avatar_mxc: str | None = None
    is_direct: bool = False
    relay_login: str | None = None
    metadata: dict[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class GhostRecord:
    """A remote user and their puppet (``user_id``), with the profile last set."""

    id: str
    user_id: str
    name: str | None = None
    avatar_mxc: str | None = None
    metadata: dict[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class LoginRecord:
    """A Matrix user's (``user_id``) account on the remote network.

    ``credentials`` are what the connector needs to reconnect, opaque to the
    layer and sealed with the pickle key before they are stored when one is set.
    """

    id: str
    user_id: str
    remote_name: str = ""
    state: LoginState = LoginState.CONNECTING
    credentials: bytes | None = attrs.field(default=None, repr=False)  # never in a log line
    metadata: dict[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class MessageRecord:
    """One bridged message (part): the remote message id and part, and its Matrix
    event in ``room_id``. ``sender`` is the remote user id (a ghost's or a login's
    remote id) and ``sender_mxid`` the Matrix user who sent it on Matrix."""

    portal: PortalKey
    remote_id: str
    event_id: str
    room_id: str
    part: str = ""
    sender: str = ""
    sender_mxid: str = ""
    timestamp: float = 0.0
    #: Set on a Matrix event claimed for sending to the remote side before its
    #: remote id is known; cleared (with the real ``remote_id``) once sent.
    pending: bool = False


@attrs.frozen
class ReactionRecord:
    """A reaction ``key`` by ``sender`` to a bridged message (part), and its event."""

    portal: PortalKey
    remote_id: str
    sender: str
    key: str
    event_id: str
    room_id: str
    part: str = ""
    sender_mxid: str = ""
    timestamp: float = 0.0

"""Act as one puppet (or the appservice's bot) on the homeserver.

An :class:`Intent` sends client-server requests with the appservice's
``as_token`` and ``?user_id=`` identity assertion. Before its first request
it makes sure its puppet is registered, once::

    puppet = Intent(client, "@_bridge_alice:example.org", ensure_registered=register_alice)
    await puppet.set_displayname("Alice")
    room_id = await puppet.join_room("#lobby:example.org")
    await puppet.send_text(room_id, "hello")
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import attrs

from bridge_kit.client import HomeserverClient, quote_segment, structure_reply
from bridge_kit.delivery import next_txn_id
from bridge_kit.types.converter import converter
from bridge_kit.types.room import (
    AvatarUrlUpdate,
    CreateRoomRequest,
    CreateRoomResponse,
    DisplaynameUpdate,
    InviteRequest,
    JoinRoomResponse,
    MembershipRequest,
    SendEventResponse,
    TextMessage,
)

__all__ = ["Intent"]

T = TypeVar("T")

_CLIENT = "/_matrix/client/v3"


class Intent:
    """One Matrix user the appservice acts as, through identity assertion.

    ``ensure_registered`` is awaited before the first request (and again after
    a failed attempt, never after a successful one); pass ``None`` for the
    appservice's sender, which needs no registration. Every method raises the
    :class:`~bridge_kit.errors.MatrixRequestError` subclass the homeserver's
    reply maps to, e.g. :class:`~bridge_kit.errors.Forbidden`.
    """

    def __init__(
        self,
        client: HomeserverClient,
        user_id: str,
        ensure_registered: Callable[[], Awaitable[object]] | None = None,
    ) -> None:
        self.client = client
        self.user_id = user_id
        self._register = ensure_registered
        self._registered = ensure_registered is None
        self._register_lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"<Intent {self.user_id}>"

    @property
    def is_registered(self) -> bool:
        """True once :meth:`ensure_registered` has succeeded (always, for the sender)."""
        return self._registered

    async def ensure_registered(self) -> None:
        """Register the puppet unless this intent already did; concurrent callers share one try."""
        if self._registered:
            return
        async with self._register_lock:
            if self._registered or self._register is None:
                return
            await self._register()
            self._registered = True

    async def set_displayname(self, name: str | None) -> None:
        """Set (or with ``None`` remove) the user's display name."""
        await self._request(
            "PUT",
            f"{_CLIENT}/profile/{quote_segment(self.user_id)}/displayname",
            "/profile/{userId}/displayname",
            body=DisplaynameUpdate(name),
        )

    async def set_avatar_url(self, mxc: str) -> None:
        """Set the user's avatar to an ``mxc://`` URI."""
        await self._request(
            "PUT",
            f"{_CLIENT}/profile/{quote_segment(self.user_id)}/avatar_url",
            "/profile/{userId}/avatar_url",
            body=AvatarUrlUpdate(mxc),
        )

    async def join_room(
        self, room_id_or_alias: str, *, via: Sequence[str] = (), reason: str | None = None
    ) -> str:
        """Join a room by ID or alias and return its room ID.

        ``via`` names servers to join through, for a room this homeserver is not in.
        """
        query: dict[str, Any] = {}
        if via:
            # ``server_name`` is the pre-v1.12 name of ``via``; older homeservers know only it.
            query = {"via": list(via), "server_name": list(via)}
        reply = await self._request(
            "POST",
            f"{_CLIENT}/join/{quote_segment(room_id_or_alias)}",
            "/join/{roomIdOrAlias}",
            body=MembershipRequest(reason),
            query=query,
        )
        return structure_reply(reply, JoinRoomResponse, "join").room_id

    async def leave_room(self, room_id: str, reason: str | None = None) -> None:
        """Leave a room (or reject an invite to it)."""
        await self._request(
            "POST",
            f"{_CLIENT}/rooms/{quote_segment(room_id)}/leave",
            "/rooms/{roomId}/leave",
            body=MembershipRequest(reason),
        )

    async def invite(self, room_id: str, user_id: str, reason: str | None = None) -> None:
        """Invite ``user_id`` to a room."""
        await self._request(
            "POST",
            f"{_CLIENT}/rooms/{quote_segment(room_id)}/invite",
            "/rooms/{roomId}/invite",
            body=InviteRequest(user_id, reason),
        )

    async def create_room(self, request: CreateRoomRequest | None = None, **fields: Any) -> str:
        """Create a room and return its ID.

        Pass a :class:`~bridge_kit.types.room.CreateRoomRequest`, its fields as
        keywords (``create_room(name="Lobby", invite=[bob])``), or both: the
        keywords then replace the request's fields.

        Unlike the other methods, this one is not sent again after a timeout, a
        broken connection or a 502/503/504, which may come after the room was
        made: it raises instead (:class:`~bridge_kit.errors.HomeserverUnreachable`
        or the :class:`~bridge_kit.errors.MatrixRequestError`), so that a retry
        cannot create a second room.
        """
        if request is None:
            request = CreateRoomRequest(**fields)
        elif fields:
            request = attrs.evolve(request, **fields)
        reply = await self._request(
            "POST", f"{_CLIENT}/createRoom", "/createRoom", body=request, resend=False
        )
        return structure_reply(reply, CreateRoomResponse, "createRoom").room_id

    async def send_event(
        self,
        room_id: str,
        event_type: str,
        content: Mapping[str, Any] | Any,
        *,
        txn_id: str | None = None,
        timestamp: int | None = None,
    ) -> str:
        """Send a message event and return its event ID.

        ``content`` is a mapping or an attrs model (e.g. :class:`TextMessage`).
        Sending again with the same ``txn_id`` is deduplicated by the homeserver.
        By default it is derived from the inbox event being handled, so a handler
        that runs again posts nothing twice (see :mod:`bridge_kit.delivery`);
        outside a handler it is random. ``timestamp`` (ms since the epoch) sets
        ``origin_server_ts``, for bridging history.
        """
        txn_id = txn_id or next_txn_id(self.user_id, room_id, event_type)
        reply = await self._request(
            "PUT",
            f"{_CLIENT}/rooms/{quote_segment(room_id)}/send/"
            f"{quote_segment(event_type)}/{quote_segment(txn_id)}",
            "/rooms/{roomId}/send/{eventType}/{txnId}",
            body=_content_json(content),
            query=_timestamp_query(timestamp),
        )
        return structure_reply(reply, SendEventResponse, "send").event_id

    async def send_state(
        self,
        room_id: str,
        event_type: str,
        content: Mapping[str, Any] | Any,
        state_key: str = "",
        *,
        timestamp: int | None = None,
    ) -> str:
        """Set a piece of room state and return the state event's ID."""
        reply = await self._request(
            "PUT",
            f"{_CLIENT}/rooms/{quote_segment(room_id)}/state/"
            f"{quote_segment(event_type)}/{quote_segment(state_key)}",
            "/rooms/{roomId}/state/{eventType}/{stateKey}",
            body=_content_json(content),
            query=_timestamp_query(timestamp),
        )
        return structure_reply(reply, SendEventResponse, "state").event_id

    async def send_text(
        self, room_id: str, text: str, *, html: str | None = None, timestamp: int | None = None
    ) -> str:
        """Send an ``m.text`` message (with an HTML ``formatted_body`` when ``html`` is given)."""
        content = TextMessage.plain(text) if html is None else TextMessage.html(text, html)
        return await self.send_event(room_id, "m.room.message", content, timestamp=timestamp)

    async def _request(
        self,
        method: str,
        path: str,
        endpoint: str,
        *,
        body: Any,
        query: Mapping[str, Any] | None = None,
        resend: bool = True,
    ) -> dict[str, Any]:
        # What may be resent after it possibly reached the homeserver (see
        # HomeserverClient.request): the profile and state PUTs set a value, so a
        # repeat sets the same one; send_event's PUT carries a txn ID the homeserver
        # deduplicates; join, leave and invite find the membership already made.
        # Only createRoom makes something new each time, so it passes resend=False.
        await self.ensure_registered()
        return await self.client.request(
            method,
            path,
            body=body,
            query=query,
            user_id=self.user_id,
            endpoint=_CLIENT + endpoint,
            resend=resend,
        )


def _content_json(content: Mapping[str, Any] | Any) -> Any:
    if attrs.has(type(content)):
        return converter.unstructure(content)
    if isinstance(content, Mapping):
        return dict(content)
    raise TypeError(f"event content must be a mapping or an attrs model, not {type(content)!r}")


def _timestamp_query(timestamp: int | None) -> dict[str, str]:
    return {} if timestamp is None else {"ts": str(int(timestamp))}

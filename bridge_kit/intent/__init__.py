"""Act as one puppet (or the appservice's bot) on the homeserver.

An :class:`Intent` sends client-server requests with the appservice's
``as_token`` and ``?user_id=`` identity assertion. Before its first request
it makes sure its puppet is registered, once::

    puppet = Intent(client, "@_bridge_alice:example.org", ensure_registered=register_alice)
    await puppet.set_displayname("Alice")
    room_id = await puppet.join_room("#lobby:example.org")
    event_id = await puppet.send_text(room_id, "hello")
    await puppet.edit_message(room_id, event_id, "hello, world")

The calls are grouped by topic in helper modules (:mod:`.messages`,
:mod:`.membership`, :mod:`.rooms`, :mod:`.media`, :mod:`.devices`);
:class:`Intent`'s methods delegate to them. ``intent.with_device(device_id)``
acts as one of the user's devices (MSC4190), for keys and to-device messages.
What may be sent again after a lost reply follows one rule: reads, PUTs that
set a value or carry a transaction ID, and changes a repeat finds already made
are resent; ``createRoom`` is not, and neither is an upload from an iterable.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from bridge_kit._deprecated import renamed
from bridge_kit.client.homeserver import HomeserverClient
from bridge_kit.intent import convenience, devices, media, membership, messages, rooms
from bridge_kit.intent._actor import OutgoingEncryption, device_query
from bridge_kit.intent.media import MediaSource
from bridge_kit.intent.state_store import RoomStateStore
from bridge_kit.types.devices import Device
from bridge_kit.types.events import Event
from bridge_kit.types.keys import DeviceKeys, KeysClaimResponse, KeysQueryResponse, KeyValue
from bridge_kit.types.media import MediaConfig, MediaInfo
from bridge_kit.types.messages import Presence
from bridge_kit.types.room import (
    AvatarUrlUpdate,
    CreateRoomRequest,
    DisplaynameUpdate,
    MessageType,
    RoomVisibility,
)
from bridge_kit.types.room_state import (
    Member,
    PowerLevels,
    ResolvedAlias,
    RoomAvatar,
    RoomName,
    RoomTopic,
)

__all__ = ["Intent", "MediaSource", "RoomStateStore"]

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
        room_state: RoomStateStore[Intent] | None = None,
        *,
        device_management: bool | None = None,
    ) -> None:
        self.client = client
        self.user_id = user_id
        # Told of this intent's successful changes, and asked by ensure_joined and the
        # profile setters; None (an Intent built by hand) keeps no state.
        self.room_state = room_state
        #: Whether the registration has io.element.msc4190 (False: create_device and
        #: delete_device refuse at once); None when unknown, to let the homeserver decide.
        self.device_management = device_management
        #: Encrypts what this intent sends into encrypted rooms; set by the AppService
        #: when ``encryption.enabled`` (see :mod:`bridge_kit.crypto.bridge`).
        self.encryption: OutgoingEncryption | None = None
        self._device_id: str | None = None
        self._register = ensure_registered
        self._registered = ensure_registered is None
        self._register_lock = asyncio.Lock()

    def __repr__(self) -> str:
        device = "" if self._device_id is None else f" device {self._device_id}"
        return f"<Intent {self.user_id}{device}>"

    @property
    def device_id(self) -> str | None:
        """The device this intent acts as (see :meth:`with_device`); ``None`` for none."""
        return self._device_id

    def with_device(self, device_id: str | None) -> Intent:
        """This user acting as its device ``device_id`` (``None``: as no device).

        Every request of the returned intent carries ``device_id`` (key uploads and
        to-device messages also MSC3202's ``org.matrix.msc3202.device_id``, for
        homeservers from before spec v1.17): key uploads, to-device messages and
        everything else then come from that device, which must exist (see
        :meth:`create_device`); otherwise the homeserver answers
        :class:`~bridge_kit.errors.UnknownDevice`.
        """
        if device_id is not None:
            devices.checked_device_id(device_id)
        if device_id == self._device_id:
            return self
        # The twin registers through this intent, so the user is registered once for both.
        twin = Intent(self.client, self.user_id, self.ensure_registered, self.room_state)
        twin.device_management = self.device_management
        twin._device_id = device_id
        twin._registered = self._registered
        twin.encryption = self.encryption
        return twin

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
        """Set (or with ``None`` remove) the user's display name.

        With a room-state store, nothing is sent when the store says this bridge
        already set the same name (a change made outside the bridge goes unseen).
        """
        await convenience.set_profile(self, "displayname", DisplaynameUpdate(name))

    async def set_avatar_url(self, mxc: str) -> None:
        """Set the user's avatar to an ``mxc://`` URI (nothing is sent when the store
        says it is set already, as for :meth:`set_displayname`)."""
        await convenience.set_profile(self, "avatar_url", AvatarUrlUpdate(mxc))

    async def ensure_joined(self, room_id: str, *, unban: bool = False) -> None:
        """Make sure this user is in the room: no request when the room-state store
        says it is joined; otherwise join. If the join is refused (403), the
        appservice's bot looks at why: a user with no membership in a room entered
        by invite is invited and joins again; a banned one raises
        :class:`~bridge_kit.errors.Banned` (room, banner, reason), since moderators
        decide who is in a room, unless ``unban=True`` (the bot then lifts the ban);
        any other refusal (a server ACL, a spam checker) is raised as it came.
        """
        await convenience.ensure_joined(self, self.room_state, room_id, unban)

    async def ensure_power_level(self, room_id: str, user_id: str, level: int) -> None:
        """Give ``user_id`` power ``level`` unless the room's power levels already do
        (read from the room-state store when there is one). A room creator (room
        version 12+) ranks above every level and is left alone."""
        await convenience.ensure_power_level(self, self.room_state, room_id, user_id, level)

    async def join_room(
        self, room_id_or_alias: str, *, via: Sequence[str] = (), reason: str | None = None
    ) -> str:
        """Join a room by ID or alias and return its room ID.

        ``via`` names servers to join through, for a room this homeserver is not in.
        """
        return await membership.join_room(self, room_id_or_alias, via, reason)

    async def leave_room(self, room_id: str, reason: str | None = None) -> None:
        """Leave a room (or reject an invite to it)."""
        await membership.leave_room(self, room_id, reason)

    async def invite(self, room_id: str, user_id: str, reason: str | None = None) -> None:
        """Invite ``user_id`` to a room."""
        await membership.invite(self, room_id, user_id, reason)

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
        return await rooms.create_room(self, request, fields)

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
        that runs again posts nothing twice (see :mod:`bridge_kit.inbox.delivery`);
        outside a handler it is random. ``timestamp`` (ms since the epoch) sets
        ``origin_server_ts``, for bridging history.
        """
        return await messages.send_event(self, room_id, event_type, content, txn_id, timestamp)

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
        return await messages.send_state(self, room_id, event_type, content, state_key, timestamp)

    # -- messaging ----------------------------------------------------------------

    async def send_text(
        self,
        room_id: str,
        text: str,
        *,
        html: str | None = None,
        reply_to: str | None = None,
        timestamp: int | None = None,
    ) -> str:
        """Send an ``m.text`` message and return its event ID.

        ``html`` adds an HTML ``formatted_body`` (``text`` is its plain fallback);
        ``reply_to`` (an event ID) makes it a reply (``m.in_reply_to``).
        """
        return await messages.send_message(
            self, room_id, text, MessageType.TEXT, html=html, reply_to=reply_to, timestamp=timestamp
        )

    async def send_notice(
        self,
        room_id: str,
        text: str,
        *,
        html: str | None = None,
        reply_to: str | None = None,
        timestamp: int | None = None,
    ) -> str:
        """Send an ``m.notice`` (a message from a bot: clients never answer it automatically)."""
        return await messages.send_message(
            self,
            room_id,
            text,
            MessageType.NOTICE,
            html=html,
            reply_to=reply_to,
            timestamp=timestamp,
        )

    async def send_emote(
        self,
        room_id: str,
        text: str,
        *,
        html: str | None = None,
        reply_to: str | None = None,
        timestamp: int | None = None,
    ) -> str:
        """Send an ``m.emote`` (``/me waves``: ``text`` is ``"waves"``)."""
        return await messages.send_message(
            self,
            room_id,
            text,
            MessageType.EMOTE,
            html=html,
            reply_to=reply_to,
            timestamp=timestamp,
        )

    async def send_reaction(self, room_id: str, event_id: str, key: str) -> str:
        """React to ``event_id`` with ``key`` (an emoji, usually): an ``m.annotation``."""
        return await messages.send_reaction(self, room_id, event_id, key)

    async def edit_message(
        self,
        room_id: str,
        event_id: str,
        new_text: str,
        html: str | None = None,
        *,
        msgtype: MessageType = MessageType.TEXT,
    ) -> str:
        """Replace the text of ``event_id`` (an ``m.replace``) and return the edit's event ID.

        The new text travels in ``m.new_content``; the event's own ``body`` is the
        fallback for clients without edits: the new text prefixed with ``* ``.
        """
        return await messages.edit_message(self, room_id, event_id, new_text, html, msgtype)

    async def redact(
        self, room_id: str, event_id: str, reason: str | None = None, *, txn_id: str | None = None
    ) -> str:
        """Redact (delete) ``event_id`` and return the redaction's event ID.

        Like :meth:`send_event`, the transaction ID is derived from the inbox
        event being handled unless given, so a repeat redacts once.
        """
        return await messages.redact(self, room_id, event_id, reason, txn_id)

    async def send_image(
        self,
        room_id: str,
        mxc: str,
        info: MediaInfo | Mapping[str, Any] | None = None,
        *,
        body: str | None = None,
        filename: str | None = None,
    ) -> str:
        """Send an uploaded image (``m.image``); ``info`` has ``mimetype``, ``size``, ``w``, ``h``.

        ``body`` is a caption (default: ``filename``, else ``"image"``).
        """
        return await media.send_media(self, room_id, "m.image", mxc, info, body, filename)

    async def send_file(
        self,
        room_id: str,
        mxc: str,
        info: MediaInfo | Mapping[str, Any] | None = None,
        *,
        body: str | None = None,
        filename: str | None = None,
    ) -> str:
        """Send an uploaded file (``m.file``); ``info`` has ``mimetype`` and ``size``.

        ``body`` is a caption (default: ``filename``, else ``"file"``).
        """
        return await media.send_media(self, room_id, "m.file", mxc, info, body, filename)

    # -- ephemeral ----------------------------------------------------------------

    async def set_typing(self, room_id: str, timeout_ms: int | bool) -> None:
        """Show the user as typing for ``timeout_ms`` ms (``True``: 30 s); ``False`` or 0 stops."""
        await messages.set_typing(self, room_id, timeout_ms)

    async def mark_read(self, room_id: str, event_id: str, private: bool = False) -> None:
        """Move the read receipt (``m.read``, or ``m.read.private``) and ``m.fully_read``
        to ``event_id``."""
        await messages.mark_read(self, room_id, event_id, private)

    async def set_presence(self, presence: Presence | str, status_msg: str | None = None) -> None:
        """Set the user's presence (``online``, ``unavailable``, ``offline``) and status."""
        await messages.set_presence(self, presence, status_msg)

    # -- membership ---------------------------------------------------------------

    async def kick(self, room_id: str, user_id: str, reason: str | None = None) -> None:
        """Kick ``user_id`` out of a room (they may join again)."""
        await membership.change(self, "kick", room_id, user_id, reason)

    async def ban(self, room_id: str, user_id: str, reason: str | None = None) -> None:
        """Ban ``user_id`` from a room (kicking them if they are in it)."""
        await membership.change(self, "ban", room_id, user_id, reason)

    async def unban(self, room_id: str, user_id: str, reason: str | None = None) -> None:
        """Lift the ban on ``user_id`` (they are then out of the room, free to join)."""
        await membership.change(self, "unban", room_id, user_id, reason)

    async def get_joined_members(self, room_id: str) -> dict[str, Member]:
        """The joined members of a room, by user ID, with display name and avatar."""
        return await rooms.get_joined_members(self, room_id)

    async def get_members(self, room_id: str, membership: str | None = None) -> dict[str, Member]:
        """Every member of a room by user ID, or those with ``membership`` (``"invite"``...).

        Each :class:`~bridge_kit.types.room_state.Member` carries its ``membership``.
        """
        return await rooms.get_members(self, room_id, membership)

    async def joined_rooms(self) -> list[str]:
        """The IDs of the rooms this user is joined to."""
        return await rooms.joined_rooms(self)

    # -- state --------------------------------------------------------------------

    async def get_state_event(
        self, room_id: str, event_type: str, state_key: str = ""
    ) -> dict[str, Any]:
        """The content of one state event; :class:`~bridge_kit.errors.NotFound` when absent."""
        return await rooms.get_state_event(self, room_id, event_type, state_key)

    async def get_state(self, room_id: str) -> list[Event]:
        """Every current state event of a room."""
        return await rooms.get_state(self, room_id)

    async def get_power_levels(self, room_id: str) -> PowerLevels:
        """The room's ``m.room.power_levels``, with the spec's defaults for absent keys."""
        return await rooms.get_power_levels(self, room_id)

    async def set_power_level(self, room_id: str, user_id: str, level: int) -> str:
        """Set one user's power level (read, change, write back ``m.room.power_levels``).

        Returns the new power-levels event's ID. Writers in this process take
        turns per room, whatever their client (double puppets included); after
        writing, the power levels are read back, and the change is written again
        (three times at most, then :class:`~bridge_kit.errors.PowerLevelConflict`)
        if another writer put back the user's level from before. A level another
        writer gave the user after ours stands: ``PowerLevelConflict`` at once.
        Raises :class:`~bridge_kit.errors.PowerLevelRefused`, sending nothing, for
        a change the spec's rules forbid this user: a level above its own, a user
        at or above its own level, or a room creator (room version 12+).
        """
        return await rooms.set_power_level(self, room_id, user_id, level)

    async def set_room_name(self, room_id: str, name: str) -> str:
        """Set ``m.room.name``; returns the state event's ID."""
        return await self.send_state(room_id, "m.room.name", RoomName(name))

    async def set_room_topic(self, room_id: str, topic: str) -> str:
        """Set ``m.room.topic``; returns the state event's ID."""
        return await self.send_state(room_id, "m.room.topic", RoomTopic(topic))

    async def set_room_avatar(
        self, room_id: str, mxc: str, info: Mapping[str, Any] | None = None
    ) -> str:
        """Set ``m.room.avatar`` to an ``mxc://`` URI; returns the state event's ID."""
        media.parse_mxc(mxc)
        avatar = RoomAvatar(mxc, None if info is None else dict(info))
        return await self.send_state(room_id, "m.room.avatar", avatar)

    # -- aliases and the room directory -------------------------------------------

    async def create_alias(self, alias: str, room_id: str) -> None:
        """Point ``#alias:server`` at a room.

        Done already (the alias points at this room) counts as success, so a
        repeat is harmless; an alias taken by another room raises the 409
        :class:`~bridge_kit.errors.MatrixRequestError`.
        """
        await rooms.create_alias(self, alias, room_id)

    async def delete_alias(self, alias: str) -> None:
        """Remove an alias; :class:`~bridge_kit.errors.NotFound` if it does not exist."""
        await rooms.delete_alias(self, alias)

    async def resolve_alias(self, alias: str) -> ResolvedAlias:
        """The room an alias points at, and servers to join it through."""
        return await rooms.resolve_alias(self, alias)

    async def set_room_directory_visibility(
        self, room_id: str, visibility: RoomVisibility | str
    ) -> None:
        """List the room in the public room directory (``"public"``) or not (``"private"``)."""
        await rooms.set_directory_visibility(self, room_id, visibility)

    # -- account data and tags ----------------------------------------------------

    async def get_account_data(self, event_type: str, room_id: str | None = None) -> dict[str, Any]:
        """The user's account data of a type (per room with ``room_id``); ``NotFound`` if unset."""
        return await rooms.get_account_data(self, event_type, room_id)

    async def set_account_data(
        self, event_type: str, content: Mapping[str, Any] | Any, room_id: str | None = None
    ) -> None:
        """Set the user's account data of a type (per room with ``room_id``)."""
        await rooms.set_account_data(self, event_type, content, room_id)

    async def set_room_tag(self, room_id: str, tag: str, order: float | None = None) -> None:
        """Tag a room for the user (``m.favourite``, ``m.lowpriority``, ``u.custom``...)."""
        await rooms.set_room_tag(self, room_id, tag, order)

    async def remove_room_tag(self, room_id: str, tag: str) -> None:
        """Remove a tag from a room."""
        await rooms.remove_room_tag(self, room_id, tag)

    # -- media --------------------------------------------------------------------

    async def media_config(self) -> MediaConfig:
        """The homeserver's media config (upload size limit), fetched once per client."""
        return await media.media_config(self)

    async def upload_media(
        self,
        data: MediaSource,
        content_type: str,
        filename: str | None = None,
        *,
        size: int | None = None,
    ) -> str:
        """Upload media and return its ``mxc://`` URI.

        ``data`` is bytes, a file path (streamed in chunks, never read whole) or
        an async iterable of chunks. An iterable with its ``size`` is streamed as
        it comes and sent once only; without ``size`` it is first spooled to a
        temporary file, since the homeserver needs the length up front.
        Raises :class:`~bridge_kit.errors.MediaTooLarge`, sending nothing, when
        the size is over the homeserver's ``m.upload.size``.
        """
        return await media.upload_media(self, data, content_type, filename, size)

    async def download_media(self, mxc: str) -> bytes:
        """Download media whole (for small files; see :meth:`download_media_stream`)."""
        return await media.download_media(self, mxc)

    def download_media_stream(self, mxc: str) -> AsyncGenerator[bytes, None]:
        """Download media as an async iterator of chunks, for large files.

        ``async for chunk in intent.download_media_stream(mxc): ...``; a transfer
        that breaks off raises :class:`~bridge_kit.errors.HomeserverUnreachable`.
        """
        return media.download_media_stream(self, mxc)

    # -- devices (MSC4190), keys and to-device messages --------------------------

    async def create_device(self, device_id: str, display_name: str | None = None) -> None:
        """Create (or rename) this user's device ``device_id``, as the appservice (MSC4190).

        Idempotent: a repeat finds the device there (and without a name keeps its
        name). The store remembers it (see
        :meth:`~bridge_kit.store.DeviceStore.known_devices`). Raises
        :class:`~bridge_kit.errors.DevicesUnavailable`, naming what to set, when the
        registration lacks ``io.element.msc4190: true`` or the homeserver refuses.
        """
        await devices.create_device(self, device_id, display_name)

    async def delete_device(self, device_id: str) -> None:
        """Delete this user's device ``device_id`` (no interactive auth under MSC4190)."""
        await devices.delete_device(self, device_id)

    async def list_devices(self) -> list[Device]:
        """Every device of this user, with its display name and last-seen data."""
        return await devices.list_devices(self)

    async def keys_upload(
        self,
        device_keys: DeviceKeys | Mapping[str, Any] | None = None,
        one_time_keys: Mapping[str, KeyValue | Mapping[str, Any]] | None = None,
        fallback_keys: Mapping[str, KeyValue | Mapping[str, Any]] | None = None,
    ) -> dict[str, int]:
        """Upload keys for :attr:`device_id` (use :meth:`with_device`); returns how many
        unclaimed one-time keys the device has, per algorithm."""
        return await devices.keys_upload(self, device_keys, one_time_keys, fallback_keys)

    async def keys_query(
        self,
        user_ids: Iterable[str] | Mapping[str, Sequence[str]],
        *,
        timeout_ms: int | None = None,
    ) -> KeysQueryResponse:
        """The device keys of these users (of every device, or of the devices mapped)."""
        return await devices.keys_query(self, user_ids, timeout_ms)

    async def keys_claim(
        self, claims: Mapping[str, Mapping[str, str]], *, timeout_ms: int | None = None
    ) -> KeysClaimResponse:
        """Claim one-time keys: ``{user_id: {device_id: algorithm}}``."""
        return await devices.keys_claim(self, claims, timeout_ms)

    async def upload_signing_keys(self, body: Mapping[str, Any]) -> None:
        """Upload this user's cross-signing keys (``/keys/device_signing/upload``:
        ``master_key``, ``self_signing_key``, ``user_signing_key``, signed JSON)."""
        await devices.upload_signing_keys(self, body)

    async def upload_signatures(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """Upload signatures of keys (``/keys/signatures/upload``); the reply, with
        ``failures`` by user and key."""
        return await devices.upload_signatures(self, body)

    async def send_to_device(
        self,
        event_type: str,
        messages: Mapping[str, Mapping[str, Mapping[str, Any] | Any]],
        txn_id: str | None = None,
    ) -> None:
        """Send to-device messages: ``{user_id: {device_id: content}}`` (``"*"``: every
        device). The transaction ID is derived as for :meth:`send_event`."""
        await devices.send_to_device(self, event_type, messages, txn_id)

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
            query={**(query or {}), **device_query(self._device_id, endpoint)},
            user_id=self.user_id,
            endpoint=_CLIENT + endpoint,
            resend=resend,
        )


# Deprecated (see CHANGELOG): the old name of RoomStateStore, one of three "states".
__getattr__ = renamed(__name__, {"RoomState": ("RoomStateStore", RoomStateStore)})
if TYPE_CHECKING:
    RoomState = RoomStateStore

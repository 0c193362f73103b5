"""Remote -> Matrix: what each remote event does, run from the portal's inbox lane.

Each handler is safe to run twice (the inbox retries after a failure or crash):
a message already in the message map is not posted again, and every send's
transaction ID derives from the inbox item, so a send repeated before the map
was written is deduplicated by the homeserver.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import attrs

from bridge_kit.app.service import AppService
from bridge_kit.bridge.events import (
    Membership,
    RemoteChatInfoChange,
    RemoteEdit,
    RemoteEvent,
    RemoteMembership,
    RemoteMessage,
    RemoteProfileChange,
    RemoteReaction,
    RemoteReactionRemove,
    RemoteRedaction,
    event_from_payload,
)
from bridge_kit.bridge.ghosts import Ghosts
from bridge_kit.bridge.media import upload_url
from bridge_kit.bridge.portals import Portals
from bridge_kit.bridge.records import MessageRecord, PortalRecord, ReactionRecord
from bridge_kit.errors import (
    Banned,
    LimitExceeded,
    MatrixRequestError,
    MediaError,
    UnknownChat,
)
from bridge_kit.inbox.items import RemoteItem

__all__ = ["RemoteHandler", "message_content"]

log = logging.getLogger(__name__)

HTML = "org.matrix.custom.html"


def message_content(
    event: RemoteMessage | RemoteEdit, reply_to: str | None = None
) -> dict[str, Any]:
    """The ``m.room.message`` content of a remote message (without media)."""
    kind = event.kind.value if isinstance(event, RemoteMessage) else "m.text"
    content: dict[str, Any] = {"msgtype": kind, "body": event.text}
    if event.html:
        content |= {"format": HTML, "formatted_body": event.html}
    if reply_to is not None:
        content["m.relates_to"] = {"m.in_reply_to": {"event_id": reply_to}}
    if isinstance(event, RemoteMessage) and event.mentions:
        content["m.mentions"] = {"user_ids": list(event.mentions)}
    return content


class RemoteHandler:
    """The inbox handler of :attr:`~bridge_kit.inbox.records.ItemKind.REMOTE` items."""

    def __init__(self, app: AppService, portals: Portals, ghosts: Ghosts) -> None:
        self.app = app
        self.portals = portals
        self.ghosts = ghosts

    async def __call__(self, item: RemoteItem) -> None:
        event = event_from_payload(item.type, item.content)
        try:
            await self._handle(event)
        except UnknownChat as exc:
            log.warning("remote %s %s dropped: %s", event.type, event.id or "(no id)", exc)
        except Banned as exc:
            # Moderators win: the ghost stays out, its event is dropped, the network hears.
            log.info("remote %s %s dropped: %s", event.type, event.id or "(no id)", exc)
            await self.portals.ghost_banned(event.portal, exc)
        except MatrixRequestError as exc:
            # A 4xx other than 429 comes again however often it is sent (the ghost
            # may not speak, the room is gone): the event is done with.
            if isinstance(exc, LimitExceeded) or not 400 <= exc.status < 500:
                raise
            log.warning(
                "could not act on remote %s %s in %s: %s",
                event.type, event.id or "(no id)", event.portal, exc,
            )  # fmt: skip

    async def _handle(self, event: RemoteEvent) -> None:
        if isinstance(event, RemoteMessage):
            await self.message(event)
            return
        if isinstance(event, RemoteProfileChange):
            await self.ghosts.set_profile(event.sender.id, event.name, _mxc(event.avatar_url))
            return
        portal = await self.portals.get(event.portal)
        if portal is None or portal.room_id is None:
            log.debug("no room for portal %s: %s dropped", event.portal, event.type)
            return
        await self._in_room(event, portal, portal.room_id)

    async def _in_room(self, event: RemoteEvent, portal: PortalRecord, room_id: str) -> None:
        if isinstance(event, RemoteEdit):
            await self.edit(event, room_id)
        elif isinstance(event, RemoteReaction):
            await self.reaction(event, room_id)
        elif isinstance(event, RemoteReactionRemove):
            await self.reaction_remove(event)
        elif isinstance(event, RemoteRedaction):
            await self.redaction(event)
        elif isinstance(event, RemoteMembership):
            await self.membership(event, portal, room_id)
        elif isinstance(event, RemoteChatInfoChange):
            await self.chat_info(event, portal, room_id)

    async def _ghost_in_room(self, event: RemoteEvent, room_id: str) -> Any:
        intent = self.ghosts.intent(event.sender.id)
        # Both reads at once: a known ghost in the room (nearly every message) costs
        # one round trip to the store, not two.
        (_, changed), member = await asyncio.gather(
            self.ghosts.changes([event.sender]), self.app.store.membership(room_id, intent.user_id)
        )
        if changed:
            await self.ghosts.sync(changed)
        if member is None or member.membership != "join":
            await intent.ensure_joined(room_id)
        return intent

    async def message(self, event: RemoteMessage) -> None:
        # The two reads at once: a portal's lane sends one message after the other,
        # so each store round trip it waits for is on every message's path.
        bridged, portal = await asyncio.gather(self._bridged(event), self.portals.get(event.portal))
        if bridged:
            return  # bridged before: the message map is the long-term dedup
        if portal is None or portal.room_id is None:
            # Members in the background: a big chat takes longer than a handler may run.
            portal = await self.portals.ensure_room(event.portal, members_later=True)
            if await self._bridged(event):
                return  # a new room's backfill brought it just now
        room_id = portal.room_id
        assert room_id is not None  # ensure_room made it
        intent = await self._ghost_in_room(event, room_id)
        reply_to = await self._event_of(event, event.reply_to)
        content = message_content(event, reply_to)
        if event.media is not None:
            content = await self._media_content(intent, event, content)
        event_id = await intent.send_event(
            room_id, "m.room.message", content, timestamp=_ms(event.timestamp)
        )
        if event.id:
            record = MessageRecord(
                event.portal,
                event.id,
                event_id,
                room_id,
                sender=event.sender.id,
                timestamp=event.timestamp or time.time(),
            )
            await self.app.store.put_messages([record])

    async def _bridged(self, event: RemoteMessage) -> bool:
        return bool(event.id) and bool(await self.app.store.messages(event.portal, event.id))

    async def _media_content(
        self, intent: Any, event: RemoteMessage, content: dict[str, Any]
    ) -> dict[str, Any]:
        media = event.media
        assert media is not None
        mxc, mimetype, size = media.url, media.mimetype, media.size
        if not mxc.startswith("mxc://"):
            try:
                uploaded = await upload_url(
                    intent, media.url, content_type=media.mimetype, filename=media.name
                )
            except MediaError as exc:
                # Too large, or gone: the link still says what was sent.
                log.info("remote file %s not uploaded: %s", media.url, exc)
                text = f"{event.text}\n{media.url}" if event.text else media.url
                return {"msgtype": "m.text", "body": text}
            mxc, mimetype, size = uploaded.mxc, uploaded.content_type, uploaded.size
        info: dict[str, Any] = {}
        if mimetype:
            info["mimetype"] = mimetype
        if size is not None:
            info["size"] = size
        body = event.text or media.name
        return content | {"body": body, "url": mxc, "info": info, "filename": media.name}

    async def _event_of(self, event: RemoteEvent, remote_id: str | None) -> str | None:
        if not remote_id:
            return None
        parts = await self.app.store.messages(event.portal, remote_id)
        return parts[0].event_id if parts else None

    async def edit(self, event: RemoteEdit, room_id: str) -> None:
        target = await self._event_of(event, event.target)
        if target is None:
            log.debug("edit of an unknown message %s in %s dropped", event.target, event.portal)
            return
        intent = await self._ghost_in_room(event, room_id)
        await intent.edit_message(room_id, target, event.text, event.html)

    async def reaction(self, event: RemoteReaction, room_id: str) -> None:
        store = self.app.store
        parts = await store.messages(event.portal, event.target)
        if not parts:
            return
        part = parts[0]
        if await store.reaction(event.portal, event.target, part.part, event.sender.id, event.key):
            return
        intent = await self._ghost_in_room(event, room_id)
        event_id = await intent.send_reaction(room_id, part.event_id, event.key)
        await store.put_reaction(
            ReactionRecord(
                event.portal,
                event.target,
                event.sender.id,
                event.key,
                event_id,
                room_id,
                part=part.part,
                timestamp=event.timestamp or time.time(),
            )
        )

    async def reaction_remove(self, event: RemoteReactionRemove) -> None:
        store = self.app.store
        parts = await store.messages(event.portal, event.target)
        part = parts[0].part if parts else ""
        reaction = await store.reaction(
            event.portal, event.target, part, event.sender.id, event.key
        )
        if reaction is None:
            return
        await self._redact(event, reaction.room_id, reaction.event_id)
        await store.delete_reaction(reaction.event_id)

    async def redaction(self, event: RemoteRedaction) -> None:
        store = self.app.store
        parts = await store.messages(event.portal, event.target)
        for part in parts:
            await self._redact(event, part.room_id, part.event_id, event.reason or None)
        if parts:
            await store.delete_messages(event.portal, event.target)

    async def _redact(
        self, event: RemoteEvent, room_id: str, event_id: str, reason: str | None = None
    ) -> None:
        """Redact as the sender's ghost; as the bot when the ghost may not (another's
        message, without power)."""
        try:
            await self.ghosts.intent(event.sender.id).redact(room_id, event_id, reason)
        except MatrixRequestError as exc:
            if exc.status != 403:
                raise
            await self.app.bot.redact(room_id, event_id, reason)

    async def membership(self, event: RemoteMembership, portal: PortalRecord, room_id: str) -> None:
        target = event.target
        reason = event.reason or None
        if event.membership is Membership.JOIN:
            await self.portals.sync_members(portal, [target])
            return
        user_id = self.ghosts.user_id(target.id)
        if not await self.app.room_state.is_joined(room_id, user_id):
            return  # not in the room: nothing to mirror
        if event.membership is Membership.LEAVE:
            await self.ghosts.intent(target.id).leave_room(room_id, reason)
        elif event.membership is Membership.KICK:
            await self.app.bot.kick(room_id, user_id, _by(event, reason))
        else:
            await self.app.bot.ban(room_id, user_id, _by(event, reason))

    async def chat_info(
        self, event: RemoteChatInfoChange, portal: PortalRecord, room_id: str
    ) -> None:
        bot = self.app.bot
        changes: dict[str, Any] = {}
        if event.name is not None and event.name != portal.name:
            await bot.set_room_name(room_id, event.name)
            changes["name"] = event.name
        if event.topic is not None and event.topic != portal.topic:
            await bot.set_room_topic(room_id, event.topic)
            changes["topic"] = event.topic
        avatar = _mxc(event.avatar_url)
        if avatar is not None and avatar != portal.avatar_mxc:
            await bot.set_room_avatar(room_id, avatar)
            changes["avatar_mxc"] = avatar
        if changes:
            await self.app.store.put_portal(attrs.evolve(portal, **changes))


def _by(event: RemoteMembership, reason: str | None) -> str:
    who = event.sender.name or event.sender.id
    return f"by {who}: {reason}" if reason else f"by {who}"


def _ms(seconds: float) -> int | None:
    return int(seconds * 1000) if seconds else None


def _mxc(url: str | None) -> str | None:
    return url if url and url.startswith("mxc://") else None

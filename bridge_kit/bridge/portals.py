"""Portals: a remote chat and its room, created on demand, never twice.

A portal's room is made by the bridge's bot with the chat's name, topic and
``m.bridge`` / ``uk.half-shot.bridge`` state (MSC2346); its members' ghosts
join in bulk (``join_many``), each one's profile set right before its join, so
each join event carries the right name and the joins do not wait for all the
profiles.

Two guards keep one room per chat, across restarts and across daemons sharing a
PostgreSQL store: the store's ``claim_portal_room`` (the first room claimed wins;
a loser leaves the room it made), and for a portal with an alias the alias
itself (the homeserver refuses a second room with it: M_ROOM_IN_USE, and the
alias names the winner's room).

A crash (or a cancelled alias query) between ``createRoom`` and the claim would
leave a room nobody knows, and make a second one next time. So the portal is
marked first (:data:`CREATING_ROOM` in its metadata, written only while it has no
room); a portal found so marked is looked for among the bot's rooms first: one
the bot created with this portal's ``m.bridge`` state is claimed, not made again
(after :data:`ADOPTION_GRACE`, in which a live daemon that made it claims it).
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import attrs

from bridge_kit.app.service import AppService
from bridge_kit.bridge.connector import ChatInfo, NetworkConnector
from bridge_kit.bridge.events import Sender
from bridge_kit.bridge.ghosts import Ghosts
from bridge_kit.bridge.records import PortalKey, PortalRecord
from bridge_kit.errors import Banned, MatrixRequestError, NotFound, UnknownChat
from bridge_kit.puppets.results import Ban
from bridge_kit.types.room import CreateRoomRequest, RoomPreset, StateEventInput
from bridge_kit.types.room_state import Member

__all__ = ["ADOPTION_GRACE", "BRIDGE_STATE_TYPES", "CREATING_ROOM", "Portals", "UnknownChat"]

log = logging.getLogger(__name__)

#: The bridge-info state types: MSC2346's, and the one clients read before it settled.
BRIDGE_STATE_TYPES = ("m.bridge", "uk.half-shot.bridge")
#: The metadata key of a portal whose room is being made (the time it began).
CREATING_ROOM = "bridge_kit.creating_room"
#: Seconds a room found for a marked portal is left to a daemon that may be
#: claiming it right now, before this one adopts it (after a crash: once).
ADOPTION_GRACE = 2.0


class Portals:
    """The portals of one bridge."""

    def __init__(self, app: AppService, connector: NetworkConnector, ghosts: Ghosts) -> None:
        self.app = app
        self.connector = connector
        self.ghosts = ghosts
        # One creation per portal at a time in this process; the store and the alias
        # guard against other processes. A lock goes when nobody holds or awaits it.
        self._locks: weakref.WeakValueDictionary[PortalKey, asyncio.Lock] = (
            weakref.WeakValueDictionary()
        )
        self._background: set[asyncio.Task[None]] = set()
        self.on_created: list[Callable[[PortalRecord], Awaitable[None]]] = []
        """Awaited when this process made a portal's room, before its members join
        (the first messages' backfill); one that fails is logged."""

    async def get(self, key: PortalKey) -> PortalRecord | None:
        return await self.app.store.portal(key)

    async def by_room(self, room_id: str) -> PortalRecord | None:
        return await self.app.store.portal_by_room(room_id)

    def alias(self, key: PortalKey) -> str | None:
        localpart = self.connector.alias_localpart(key)
        return None if localpart is None else f"#{localpart}:{self.app.puppets.domain}"

    async def ensure_room(
        self, key: PortalKey, info: ChatInfo | None = None, *, members_later: bool = False
    ) -> PortalRecord:
        """The portal of ``key`` with its room, created (with its members) if needed.

        ``members_later``: return once the room exists, and join the members in
        the background (an alias query must be answered soon).
        Raises :class:`UnknownChat` when the connector has no info on the chat.
        """
        record = await self.get(key)
        if record is not None and record.room_id is not None:
            return record
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = asyncio.Lock()
        async with lock:
            record = await self.get(key)
            if record is not None and record.room_id is not None:
                return record
            if info is None:
                info = await self.connector.get_chat_info(key)
            if info is None:
                raise UnknownChat(f"the {self.connector.display_name} chat {key} is not known")
            return await self._create(key, info, record, members_later)

    async def _create(
        self, key: PortalKey, info: ChatInfo, old: PortalRecord | None, members_later: bool
    ) -> PortalRecord:
        # No alias lookup first: the alias is in the bridge's own namespace, so the
        # homeserver would ask this very bridge about it (an alias query, which
        # waits for this very creation). A taken alias shows up as M_ROOM_IN_USE
        # instead, and is resolved then (it exists: the homeserver does not ask).
        room_id, made = await self._room_for(key, info, old)
        won = await self.app.store.claim_portal_room(key, room_id)
        if won != room_id and made:
            log.info("portal %s: another daemon made its room first; leaving %s", key, room_id)
            await self.app.bot.leave_room(room_id)
        base = old or PortalRecord(key)
        record = attrs.evolve(
            base,
            metadata=_without_mark(base.metadata),
            room_id=won,
            name=info.name,
            topic=info.topic,
            avatar_mxc=_mxc(info.avatar_url),
            is_direct=info.is_direct,
        )
        await self.app.store.put_portal(record)
        fresh = won == room_id and made
        if fresh:
            log.info("portal %s: created room %s", key, won)
            # Its first messages before anything else (also before the message that
            # made the room, which its caller sends next): history reads in order.
            await self._created(record)
        if members_later:
            task = asyncio.create_task(self._sync_in_background(record, info.members))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        else:
            await self.sync_members(record, info.members)
        return record

    async def _created(self, portal: PortalRecord) -> None:
        for hook in self.on_created:
            try:
                await hook(portal)
            except Exception:
                log.exception("portal %s: a hook on its new room failed", portal.key)

    async def _sync_in_background(self, portal: PortalRecord, members: Sequence[Sender]) -> None:
        try:
            await self.sync_members(portal, members)
        except Exception as exc:  # logged: the next sync command or message tries again
            log.warning("portal %s: joining its members failed: %s", portal.key, exc)

    async def close(self) -> None:
        """Cancel member syncs still running in the background."""
        tasks, self._background = self._background, set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _room_for(
        self, key: PortalKey, info: ChatInfo, old: PortalRecord | None
    ) -> tuple[str, bool]:
        """The room made before a crash, or a new one: ``(room, made by us)``."""
        if old is not None and CREATING_ROOM in old.metadata:
            found = await self._room_made_before(key)
            if found is not None:
                # The mark may be a live daemon's, which claims the room it made
                # moments after making it: then the room is its, not ours to adopt.
                await asyncio.sleep(ADOPTION_GRACE)
                claimed = await self.get(key)
                if claimed is not None and claimed.room_id is not None:
                    return claimed.room_id, False
                log.info("portal %s: found its room %s, made before a restart", key, found)
                return found, True
        base = old or PortalRecord(key)
        marked = attrs.evolve(base, metadata={**base.metadata, CREATING_ROOM: time.time()})
        if not await self.app.store.put_roomless_portal(marked):
            claimed = await self.get(key)  # another daemon's room, claimed meanwhile
            if claimed is not None and claimed.room_id is not None:
                return claimed.room_id, False
        try:
            return await self._create_room(key, info)
        except MatrixRequestError as exc:
            if 400 <= exc.status < 500:
                # Refused: no room was made, so the next try need not look for one.
                unmarked = attrs.evolve(base, metadata=_without_mark(base.metadata))
                await self.app.store.put_roomless_portal(unmarked)
            raise

    async def _room_made_before(self, key: PortalKey) -> str | None:
        """A room of the bot's that no portal has, made by the bot for ``key``
        (rooms looked at a few at a time: a big bridge's bot has many)."""
        state_key = self._state_key(key)
        candidates = [
            room_id
            for room_id in await self.app.bot.joined_rooms()
            if await self.by_room(room_id) is None
        ]
        limit = asyncio.Semaphore(self.app.config.puppets.concurrency)

        async def made_for(room_id: str) -> bool:
            async with limit:
                return await self._made_for(room_id, state_key)

        found = await asyncio.gather(*(made_for(room_id) for room_id in candidates))
        return next((room_id for room_id, ok in zip(candidates, found, strict=True) if ok), None)

    async def _made_for(self, room_id: str, state_key: str) -> bool:
        bot = self.app.bot
        try:
            # Most rooms lack the state: one small request each says so.
            await bot.get_state_event(room_id, BRIDGE_STATE_TYPES[0], state_key)
            state = await bot.get_state(room_id)
        except MatrixRequestError as exc:  # NotFound included: not this portal's room
            log.debug("portal room search: %s is not it: %s", room_id, exc)
            return False
        # Made by the bot, not merely joined: anyone may invite the bot to a room
        # with such state, and a room they made is theirs to control.
        return any(e.type == "m.room.create" and e.sender == bot.user_id for e in state)

    async def _existing_alias_room(self, key: PortalKey) -> str | None:
        alias = self.alias(key)
        if alias is None:
            return None
        try:
            return (await self.app.bot.resolve_alias(alias)).room_id
        except NotFound:
            return None

    async def _create_room(self, key: PortalKey, info: ChatInfo) -> tuple[str, bool]:
        """Make the room; ``(room, True)``, or the alias's room and False when the
        alias was taken meanwhile (another daemon made it first)."""
        localpart = self.connector.alias_localpart(key)
        request = CreateRoomRequest(
            preset=RoomPreset.PRIVATE_CHAT if localpart is None else RoomPreset.PUBLIC_CHAT,
            name=info.name or None,
            topic=info.topic or None,
            invite=list(info.invite),
            is_direct=info.is_direct,
            room_alias_name=localpart,
            initial_state=self._bridge_state(key, info),
        )
        try:
            return await self.app.bot.create_room(request), True
        except MatrixRequestError as exc:
            # M_ROOM_IN_USE: the alias was taken before; 409: while Synapse made
            # our room (which it leaves without the alias: nobody is in it but the bot).
            taken = exc.errcode == "M_ROOM_IN_USE" or exc.status == 409
            if not taken or localpart is None:
                raise
        room_id = await self._existing_alias_room(key)
        if room_id is None:
            raise UnknownChat(f"the alias of portal {key} is taken but names no room")
        return room_id, False

    def _bridge_state(self, key: PortalKey, info: ChatInfo) -> list[StateEventInput]:
        content = self.bridge_info(key, info.name)
        state_key = self._state_key(key)
        return [StateEventInput(kind, content, state_key) for kind in BRIDGE_STATE_TYPES]

    def _state_key(self, key: PortalKey) -> str:
        return f"bridge_kit://{self.connector.network_id}/{key}"

    def bridge_info(self, key: PortalKey, name: str | None) -> dict[str, Any]:
        """The ``m.bridge`` content of a portal (MSC2346)."""
        bot = self.app.bot.user_id
        channel: dict[str, Any] = {"id": str(key)}
        if name:
            channel["displayname"] = name
        return {
            "bridgebot": bot,
            "creator": bot,
            "protocol": {
                "id": self.connector.network_id,
                "displayname": self.connector.display_name,
            },
            "channel": channel,
        }

    async def sync_info(self, portal: PortalRecord, info: ChatInfo) -> PortalRecord:
        """Give the room the chat's name and topic where they differ (the bot sets them)."""
        room_id = portal.room_id
        if room_id is None:
            return portal
        changed = portal
        if info.name is not None and info.name != portal.name:
            await self.app.bot.set_room_name(room_id, info.name)
            changed = attrs.evolve(changed, name=info.name)
        if info.topic is not None and info.topic != portal.topic:
            await self.app.bot.set_room_topic(room_id, info.topic)
            changed = attrs.evolve(changed, topic=info.topic)
        if changed != portal:
            await self.app.store.put_portal(changed)
        return changed

    async def sync_members(
        self, portal: PortalRecord, members: Sequence[Sender], *, exclusive: bool = False
    ) -> None:
        """Make the ghosts of ``members`` (profiles first) and join them to the room;
        with ``exclusive``, the room's other ghosts leave (the chat's full member list
        after a reconnect: who left meanwhile)."""
        room_id = portal.room_id
        if room_id is None:
            return
        if exclusive:
            await self._leave_others(portal, room_id, members)
        if not members:
            return
        _, changed = await self.ghosts.changes(members)
        # A new or renamed ghost's profile is set in the same bulk run as the joins,
        # each ghost's right before its join (not all profiles before the first join),
        # and its join carries the name too. Before, not after: a profile change of a
        # member makes the homeserver "join" it again, which brings back a ghost that
        # left meanwhile.
        named = {self.ghosts.localpart(r.id): Member(r.name, r.avatar_mxc) for r in changed}
        pairs = [(self.ghosts.localpart(member.id), room_id) for member in members]
        result = await self.app.puppets.join_many(
            pairs, concurrency=self.app.config.puppets.concurrency, member_profiles=named
        )
        if changed:
            # Stores the records. What the run set costs no request; a ghost in the room
            # already (renamed) gets its profile here, and a refused one is tried again.
            await self.ghosts.sync(changed)
        for ban in result.bans:
            await self._report_ban(portal.key, ban)
        if result.failed:
            log.warning(
                "portal %s: %d of %d members did not join: %s",
                portal.key, result.failed, len(pairs), result.failures,
            )  # fmt: skip

    async def ghost_banned(self, portal: PortalKey, banned: Banned) -> None:
        """Tell the connector that a ghost was found banned from ``portal``'s room."""
        ban = Ban(banned.room_id, banned.user_id, banned.banner, banned.reason)
        await self._report_ban(portal, ban)

    async def _report_ban(self, portal: PortalKey, ban: Ban) -> None:
        ghost_id = self.connector.ghost_for_localpart(ban.user_id[1:].partition(":")[0])
        if ghost_id is None:
            return
        try:
            await self.connector.ghost_banned(portal, ghost_id, ban)
        except Exception:
            # The connector's reaction is its own: the ban holds whatever it does.
            log.exception("portal %s: the connector failed on the ban of %s", portal, ghost_id)

    async def _leave_others(
        self, portal: PortalRecord, room_id: str, members: Sequence[Sender]
    ) -> None:
        staying = {self.ghosts.user_id(member.id) for member in members}
        joined = await self.app.room_state.get_members(room_id)
        bot = self.app.bot.user_id
        leaving = [
            user_id
            for user_id in joined
            if user_id not in staying and user_id != bot and self.ghosts.is_ghost(user_id)
        ]
        limit = asyncio.Semaphore(self.app.config.puppets.concurrency)

        async def leave(user_id: str) -> None:
            remote_id = self.connector.ghost_for_localpart(user_id[1:].partition(":")[0])
            if remote_id is None:
                return
            async with limit:
                await self.ghosts.intent(remote_id).leave_room(room_id)

        await asyncio.gather(*(leave(user_id) for user_id in leaving))
        if leaving:
            log.info("portal %s: %d ghosts left (gone from the chat)", portal.key, len(leaving))


def _without_mark(metadata: dict[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in metadata.items() if name != CREATING_ROOM}


def _mxc(url: str | None) -> str | None:
    return url if url and url.startswith("mxc://") else None

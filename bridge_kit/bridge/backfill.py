"""Backfill: the history a room lacks, from a connector that can fetch it.

A portal's new room gets the chat's last ``bridge.backfill_initial`` messages,
sent before its members join (:meth:`Backfill.new_room`).

When a login connects (or reconnects), :class:`Backfill` asks a connector that
keeps history (:class:`FetchesHistory`) for each portal's latest messages (but
another login's private chats), at most ``bridge.backfill_max_catchup``, and
hands the ones the room lacks to the portal's lane, oldest first: they are
bridged in order, each with its remote timestamp as ``origin_server_ts``
(``ts`` on ``PUT /send``, for appservices).
A message the message map already has is skipped, and one already accepted
(by the live path or a catch-up running beside) is dropped by the lane's
deduplication, so a second catch-up sends nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol, runtime_checkable

from bridge_kit.bridge.connector import LoginHandle
from bridge_kit.bridge.events import RemoteEvent, RemoteMessage
from bridge_kit.bridge.records import PortalKey, PortalRecord
from bridge_kit.store import Store

__all__ = ["Backfill", "FetchesHistory"]

log = logging.getLogger(__name__)


@runtime_checkable
class FetchesHistory(Protocol):
    """A connector whose network keeps history the bridge can fetch."""

    async def fetch_messages(
        self, portal: PortalKey, login: LoginHandle | None, limit: int
    ) -> Sequence[RemoteMessage]:
        """The latest ``limit`` messages of ``portal`` that ``login`` can see,
        oldest first, each with its ``id`` and ``timestamp`` (``[]``: none, or a
        chat this login is not in). ``login`` is ``None`` for a portal's new room:
        what the bridge itself can see (e.g. through a relay connection)."""
        ...


class Backfill:
    """Catch-up for each login that connects, over every portal that has a room.

    ``handle_remote`` is the bridge's door for remote events (durable, in order
    per portal, deduplicated by id). ``max_catchup`` 0 turns catching up off.
    """

    def __init__(
        self,
        store: Store,
        connector: object,
        handle_remote: Callable[[RemoteEvent], Awaitable[bool]],
        *,
        max_catchup: int,
        initial: int = 0,
    ) -> None:
        self.store = store
        self.connector = connector if isinstance(connector, FetchesHistory) else None
        self.handle_remote = handle_remote
        self.max_catchup = max_catchup
        self.initial = initial
        self._running: set[asyncio.Task[int]] = set()

    @property
    def enabled(self) -> bool:
        return self.connector is not None and self.max_catchup > 0

    def start_catch_up(self, login: LoginHandle) -> None:
        """Catch up for ``login`` in the background (it just connected)."""
        if not self.enabled:
            return
        task = asyncio.create_task(self._logged(login), name=f"catch-up {login.id}")
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def catch_up(self, login: LoginHandle) -> int:
        """Hand every portal's missing messages to its lane; how many were new."""
        if not self.enabled:
            return 0
        sent = 0
        for portal in await self.store.portals():
            # Another login's private chat is not this login's to read.
            theirs = portal.key.receiver and portal.key.receiver != login.id
            if portal.room_id is not None and not theirs:
                sent += await self.portal(portal.key, login)
        return sent

    async def portal(self, key: PortalKey, login: LoginHandle) -> int:
        """Catch up one portal; how many of its messages were new."""
        assert self.connector is not None
        fetched = await self.connector.fetch_messages(key, login, self.max_catchup)
        sent = 0
        for message in list(fetched)[-self.max_catchup :]:
            if message.portal != key or not message.id:
                continue  # another chat's; or no id, which cannot be deduplicated
            if await self.store.messages(key, message.id):
                continue  # in the room already
            if await self.handle_remote(message):
                sent += 1
        if sent:
            log.info("portal %s: %d missed message(s) caught up through %s", key, sent, login.id)
        return sent

    async def new_room(
        self, portal: PortalRecord, send: Callable[[RemoteMessage], Awaitable[None]]
    ) -> int:
        """Bridge a new room's last ``initial`` messages now, oldest first, through
        ``send`` (the bridge's remote-message handler), before its members join."""
        if self.connector is None or self.initial <= 0:
            return 0
        fetched = await self.connector.fetch_messages(portal.key, None, self.initial)
        sent = 0
        for message in list(fetched)[-self.initial :]:
            if message.portal != portal.key or not message.id:
                continue
            await send(message)
            sent += 1
        if sent:
            log.info("portal %s: its new room got its last %d message(s)", portal.key, sent)
        return sent

    async def close(self) -> None:
        """Cancel the catch-ups under way (the bridge stops; the next start does them)."""
        tasks, self._running = self._running, set()
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)

    async def _logged(self, login: LoginHandle) -> int:
        try:
            return await self.catch_up(login)
        except Exception:
            # The next connect tries again; live messages go on meanwhile.
            log.exception("catching up for login %s failed", login.id)
            return 0

"""Ghosts: remote users as puppets, their profiles kept in step.

A ghost's localpart comes from the connector's template
(:meth:`~bridge_kit.bridge.connector.NetworkConnector.ghost_localpart`). Profiles
go through the bulk engine's ``sync_profiles``, which sends nothing for a value
the store says is set already, so a known ghost costs no request.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from bridge_kit.app.service import AppService
from bridge_kit.bridge.connector import NetworkConnector
from bridge_kit.bridge.events import Sender
from bridge_kit.bridge.records import GhostRecord
from bridge_kit.errors import HomeserverError
from bridge_kit.intent import Intent

__all__ = ["Ghosts"]

log = logging.getLogger(__name__)


class Ghosts:
    """The ghosts of one bridge."""

    def __init__(self, app: AppService, connector: NetworkConnector) -> None:
        self.app = app
        self.connector = connector

    def localpart(self, remote_id: str) -> str:
        return self.connector.ghost_localpart(remote_id)

    def user_id(self, remote_id: str) -> str:
        return self.app.puppets.user_id(self.localpart(remote_id))

    def intent(self, remote_id: str) -> Intent:
        return self.app.intent(self.localpart(remote_id))

    def is_ghost(self, user_id: str) -> bool:
        """Whether ``user_id`` is one of this bridge's ghosts (or its bot)."""
        if user_id == self.app.bot.user_id:
            return True
        localpart, _, domain = user_id[1:].partition(":")
        if domain != self.app.puppets.domain:
            return False
        # Only in our exclusive namespace: a loose template never takes a real user.
        if not self.app.registration.is_user_in_namespace(user_id, exclusive_only=True):
            return False
        return self.connector.ghost_for_localpart(localpart) is not None

    async def ensure(self, senders: Iterable[Sender]) -> dict[str, GhostRecord]:
        """The ghosts of ``senders``, registered and with their profiles set.

        A sender without a ``name`` whose ghost is new is looked up with the
        connector's ``get_user_info`` once. Only new ghosts and changed names
        are sent to the homeserver, in one bulk run.
        """
        known, changed = await self.changes(senders)
        if changed:
            await self.sync(changed)
            known |= {record.id: record for record in changed}
        return known

    async def changes(
        self, senders: Iterable[Sender]
    ) -> tuple[dict[str, GhostRecord], list[GhostRecord]]:
        """The stored ghosts of ``senders``, and the records of those that are new or
        renamed, not sent yet (:meth:`sync` sends and stores them)."""
        wanted = {sender.id: sender for sender in senders}
        known = await self.app.store.ghosts_among(wanted)
        changed: list[GhostRecord] = []
        for remote_id, sender in wanted.items():
            record = known.get(remote_id)
            update = await self._update(remote_id, sender, record)
            if update is not None:
                changed.append(update)
        return known, changed

    async def _update(
        self, remote_id: str, sender: Sender, record: GhostRecord | None
    ) -> GhostRecord | None:
        name = sender.name
        avatar: str | None = None
        if record is None and name is None:
            info = await self.connector.get_user_info(remote_id)
            name = remote_id if info is None else info.name
            if info is not None and info.avatar_url and info.avatar_url.startswith("mxc://"):
                avatar = info.avatar_url
        if record is not None and (name is None or name == record.name):
            return None
        return GhostRecord(
            remote_id,
            self.user_id(remote_id),
            name=name,
            avatar_mxc=avatar or (record.avatar_mxc if record else None),
            metadata=record.metadata if record else {},
        )

    async def set_profile(self, remote_id: str, name: str | None, avatar_mxc: str | None) -> None:
        """Give a ghost a new name and/or avatar (``None``: unchanged)."""
        known = await self.app.store.ghosts_among([remote_id])
        record = known.get(remote_id) or GhostRecord(remote_id, self.user_id(remote_id))
        new = GhostRecord(
            remote_id,
            record.user_id,
            name=record.name if name is None else name,
            avatar_mxc=record.avatar_mxc if avatar_mxc is None else avatar_mxc,
            metadata=record.metadata,
        )
        if new != record or remote_id not in known:
            await self.sync([new])

    async def sync(self, records: list[GhostRecord]) -> None:
        """Register the ghosts and set their profiles (what the store says is set
        already costs no request); then store the records."""
        items = [(self.localpart(r.id), r.name, r.avatar_mxc) for r in records]
        result = await self.app.puppets.sync_profiles(items)
        if result.failed:
            # A refused profile is retried with the event (the store knows what was set).
            raise HomeserverError(f"could not set ghost profiles: {result.failures}")
        await self.app.store.put_ghosts(records)

"""The store hooks whose SQL both backends share (room state, profiles, devices and
crypto state), written once over :class:`~bridge_kit.store._sql.Query`: each backend
gives :meth:`SharedSQLHooks._query` and :meth:`SharedSQLHooks._query_in_transaction`
for its database."""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable
from typing import TypeVar

from bridge_kit.store import _devices_sql, _state_sql
from bridge_kit.store._sql import Query
from bridge_kit.store.state_records import MemberRow, StateRow
from bridge_kit.types.events import Event
from bridge_kit.types.room_state import Member

_T = TypeVar("_T")


class SharedSQLHooks(abc.ABC):
    """A mixin of :class:`~bridge_kit.store.Store`'s SQL backends, before ``Store`` in
    their bases so that its hooks are the ones the store's methods call."""

    @abc.abstractmethod
    async def _query(self, operation: Callable[[Query], Awaitable[_T]]) -> _T:
        """Run ``operation`` on the database (each statement commits on its own)."""

    @abc.abstractmethod
    async def _query_in_transaction(self, operation: Callable[[Query], Awaitable[_T]]) -> _T:
        """Run ``operation`` on the database in one transaction."""

    async def _apply_state(
        self, members: list[MemberRow], states: list[StateRow], known: str | None
    ) -> None:
        await self._query_in_transaction(lambda q: _state_sql.apply(q, members, states, known))

    async def _membership(self, room_id: str, user_id: str) -> Member | None:
        return await self._query(lambda q: _state_sql.membership(q, room_id, user_id))

    async def _members(self, room_id: str, membership: str) -> dict[str, Member]:
        return await self._query(lambda q: _state_sql.members(q, room_id, membership))

    async def _state_event(self, room_id: str, event_type: str) -> Event | None:
        return await self._query(lambda q: _state_sql.state_event(q, room_id, event_type))

    async def _room_state_known(self, room_id: str) -> bool:
        return await self._query(lambda q: _state_sql.room_known(q, room_id))

    async def _profile(self, user_id: str) -> dict[str, str | None]:
        return await self._query(lambda q: _state_sql.profile(q, user_id))

    async def _set_profiles(self, rows: list[tuple[str, str, str | None]]) -> None:
        await self._query_in_transaction(lambda q: _state_sql.set_profiles(q, rows))

    async def _remember_device(
        self, user_id: str, device_id: str, display_name: str | None
    ) -> None:
        await self._query(
            lambda q: _devices_sql.remember_device(q, user_id, device_id, display_name)
        )

    async def _forget_device(self, user_id: str, device_id: str) -> None:
        await self._query(lambda q: _devices_sql.forget_device(q, user_id, device_id))

    async def _known_devices(self, user_id: str) -> dict[str, str | None]:
        return await self._query(lambda q: _devices_sql.known_devices(q, user_id))

    async def _crypto_get(self, owner: str, kind: str, key: str) -> bytes | None:
        return await self._query(lambda q: _devices_sql.crypto_get(q, owner, kind, key))

    async def _crypto_items(self, owner: str, kind: str) -> dict[str, bytes]:
        return await self._query(lambda q: _devices_sql.crypto_items(q, owner, kind))

    async def _crypto_delete(self, owner: str, kind: str, key: str) -> None:
        await self._query(lambda q: _devices_sql.crypto_delete(q, owner, kind, key))

    async def _crypto_delete_many(self, owner: str, kind: str, keys: list[str]) -> None:
        await self._query_in_transaction(
            lambda q: _devices_sql.crypto_delete_many(q, owner, kind, keys)
        )
